"""`kubetune run FILE --local` and `python -m kubetune_trainer` outside a cluster: train on this machine.

A private local Ray instance (never an existing one that happens to be running), sized to this machine;
GPUs when CUDA is there, otherwise CPU with a warning. Exit 0 on success, 1 with a one-line reason on
failure, 130 when interrupted; the run resumes from its last checkpoint when started again.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TextIO

from kubetune_trainer.cache import CACHE_DIR_ENV, cache_root
from kubetune_trainer.config import TrainerConfig, use_ray_train_env
from kubetune_trainer.config import concurrent_trials as config_concurrent_trials
from kubetune_trainer.errors import PreemptedError, TrainerError
from kubetune_trainer.progress_model import summary_parts
from kubetune_trainer.reporting import ConsoleReporter, format_duration
from kubetune_trainer.storage import resolve_endpoint

if TYPE_CHECKING:  # run imports torch and Ray: only when a run starts
    from kubetune_trainer.run import Outcome

log = logging.getLogger("kubetune_trainer")

# Set to 1 to see the Ray workers' own logs on the console (they are always in /tmp/ray/session_*/logs).
RAY_LOGS_ENV = "KUBETUNE_RAY_LOGS"


class _Stderr(logging.StreamHandler[TextIO]):
    """Writes to whatever sys.stderr is when a record comes (pytest and notebooks swap it)."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


def setup_logging() -> None:
    if not log.handlers:
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("kubetune: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def with_endpoint(config: TrainerConfig, s3_endpoint: str | None) -> TrainerConfig:
    """The config with the endpoint every process must use written in (workers do not see our flags)."""
    endpoint = resolve_endpoint(config.storage.endpoint, s3_endpoint)
    return config.model_copy(update={"storage": config.storage.model_copy(update={"endpoint": endpoint})})


def local_resources(config: TrainerConfig, cpus: int, cuda: bool) -> tuple[float, bool]:
    """(CPUs per worker, use GPU) that this machine can give every worker at once (a sweep's: the workers
    of maxConcurrentTrials trials)."""
    workers = config.scaling.workers * concurrent_trials(config)
    per_worker = min(config.scaling.cpus_per_worker, max(1, cpus // workers))
    if per_worker < config.scaling.cpus_per_worker:
        log.warning(
            "this machine has %d CPUs: %d worker(s) get %g CPU(s) each instead of %g",
            cpus,
            workers,
            per_worker,
            config.scaling.cpus_per_worker,
        )
    use_gpu = config.scaling.gpus_per_worker > 0
    if use_gpu and not cuda:
        log.warning("no CUDA GPU on this machine: training on CPU (fp32), which is much slower")
        use_gpu = False
    return float(per_worker), use_gpu


def concurrent_trials(config: TrainerConfig) -> int:
    return config_concurrent_trials(config.sweep)


def guarded(action: Callable[[], int]) -> int:
    """Run `action`, turning the ways a run ends into an exit code and one line on stderr."""
    try:
        return action()
    except PreemptedError as error:
        print(f"kubetune: preempted: {error}", file=sys.stderr)
        return PreemptedError.exit_code
    except TrainerError as error:
        print(f"kubetune: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("kubetune: interrupted; run it again to resume from the last checkpoint", file=sys.stderr)
        return 130


def summary(started: float, outcome: Outcome) -> None:
    """The run's last lines: the exported (best) epoch's validation figures, where the model and its files
    are, then the judged split's figures, where the report is, and what the MLflow hand-off did."""
    parts = summary_parts(outcome.metrics)
    figures = "validation " + ", ".join(parts) if parts else ""
    took = format_duration(time.monotonic() - started)
    best = outcome.best_epoch
    chosen = f" (epoch {best}, the best)" if best and best != outcome.epochs else ""
    if outcome.sweep:
        print(f"kubetune: sweep: {outcome.sweep}")
    if outcome.stopped:
        print(f"kubetune: {stopped_line(outcome.stopped)}")
    print(f"kubetune: trained {outcome.epochs} epochs in {took}: {figures}{chosen}")
    print(f"kubetune: model at {outcome.model} ({', '.join(outcome.files)})")
    if outcome.evaluation:
        judged = ", ".join(f"{name} {value:.4f}" for name, value in outcome.evaluation["metrics"].items())
        print(f"kubetune: on the {outcome.evaluation['split']} set: {judged}")
    if outcome.report:
        print(f"kubetune: report at {outcome.report}")
    if outcome.mlflow:
        print(f"kubetune: MLflow: {outcome.mlflow}")


def stopped_line(stopped: Mapping[str, Any]) -> str:
    """Why training ended before its last epoch (model.json's `stopped`), in a line."""
    return (
        f"stopped early ({stopped['reason']}) after epoch {stopped['afterEpoch']} of {stopped['epochs']}: "
        f"{stopped['metric']} did not improve by more than {stopped['minDelta']:g} in {stopped['patience']} epochs"
    )


def run_local(config: TrainerConfig, *, s3_endpoint: str | None) -> int:
    """Train `config` on a private local Ray instance; the exit code for the CLI."""
    setup_logging()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    use_ray_train_env()  # before ray.init: the Ray processes it starts inherit it
    started = time.monotonic()
    config = with_endpoint(config, s3_endpoint)

    def run() -> int:
        import torch

        from kubetune_trainer.run import check_inputs, prepare, store_for, train

        cpus = os.cpu_count() or 1
        cpus_per_worker, use_gpu = local_resources(config, cpus, torch.cuda.is_available())
        inputs = check_inputs(config, store_for(config))
        # Same node as the workers: prepare here, and the workers find the cache filled.
        prepared = prepare(config, inputs, here=True)
        import ray  # only now: a run that cannot work fails without starting (or importing) Ray

        # Ray workers run in Ray's session folder: a relative cache path would miss the filled cache.
        os.environ[CACHE_DIR_ENV] = str(cache_root().resolve())

        started_ray = not ray.is_initialized()  # a notebook may have its own instance: use it, leave it
        if started_ray:
            ray.init(
                address="local",
                # A sweep's trials each reserve a sliver of a CPU besides their workers': one more in all.
                num_cpus=max(cpus, int(cpus_per_worker * config.scaling.workers * concurrent_trials(config)) + 1),
                num_gpus=torch.cuda.device_count() if use_gpu else 0,
                include_dashboard=False,
                log_to_driver=os.environ.get(RAY_LOGS_ENV) == "1",
                logging_level=logging.WARNING,
            )
        try:
            outcome = train(
                config, prepared, cpus_per_worker=cpus_per_worker, use_gpu=use_gpu, reporter=ConsoleReporter()
            )
        finally:
            if started_ray:
                ray.shutdown()
        summary(started, outcome)
        return 0

    return guarded(run)
