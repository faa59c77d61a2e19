"""`python -m kubetune_trainer [--config FILE]`: the entrypoint of the RayJob, and of local runs.

The TrainerConfig JSON comes from `--config FILE` or, without it, from the environment variable
KUBETUNE_TRAINER_CONFIG (how the operator's RayJob passes it to the driver on the Ray head).
Inside a Ray cluster (RAY_ADDRESS set, as for a RayJob's entrypoint) it connects to the cluster and
trains on its workers; elsewhere, or with --local, it starts a private local Ray instance.
Exit codes: 0 done, 1 the run failed (one line says why), 2 the config is missing or unusable.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from pydantic import ValidationError

from kubetune_trainer.config import CONFIG_ENV, TrainerConfig
from kubetune_trainer.local import concurrent_trials, guarded, run_local, setup_logging, summary, with_endpoint
from kubetune_trainer.reporting import ConsoleReporter
from kubetune_trainer.startup import mark


def warn_if_short(workers: int, cpus: float, gpus: int, have: dict[str, float]) -> None:
    """Say so when the cluster cannot place the workers yet (they wait, e.g. for the autoscaler)."""
    need_cpu, need_gpu = workers * cpus, workers * gpus
    if have.get("CPU", 0) < need_cpu or have.get("GPU", 0) < need_gpu:
        logging.getLogger("kubetune_trainer").warning(
            "the Ray cluster has %g CPUs and %g GPUs now; %d worker(s) need %g and %g: waiting for nodes",
            have.get("CPU", 0),
            have.get("GPU", 0),
            workers,
            need_cpu,
            need_gpu,
        )


def run_in_cluster(config: TrainerConfig, *, s3_endpoint: str | None) -> int:
    """Train on the Ray cluster this process runs in (the RayJob's driver on the head node)."""
    setup_logging()
    mark("driver started")
    started = time.monotonic()
    config = with_endpoint(config, s3_endpoint)

    def run() -> int:
        import ray

        from kubetune_trainer.run import check_inputs, prepare_in_cluster, store_for, train

        mark("driver imports done")
        ray.init()
        mark("connected to Ray")
        scaling = config.scaling
        workers = scaling.workers * concurrent_trials(config)  # a sweep's: every concurrent trial's workers
        warn_if_short(workers, scaling.cpus_per_worker, scaling.gpus_per_worker, ray.cluster_resources())
        inputs = check_inputs(config, store_for(config))
        mark("inputs checked")
        # Beside Ray Train's start-up where a worker's node is up (the workers wait for it), before it otherwise.
        prepared = prepare_in_cluster(config, inputs, cpus=scaling.cpus_per_worker, gpus=scaling.gpus_per_worker)
        outcome = train(
            config,
            prepared,
            cpus_per_worker=scaling.cpus_per_worker,
            use_gpu=scaling.gpus_per_worker > 0,
            reporter=ConsoleReporter(),
        )
        summary(started, outcome)
        return 0

    return guarded(run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubetune_trainer", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", type=Path, default=None, help=f"trainer config JSON (TrainerConfig); default: ${CONFIG_ENV}"
    )
    parser.add_argument("--s3-endpoint", default=None, help="S3 endpoint URL, overriding the config's")
    parser.add_argument("--local", action="store_true", help="train on a private local Ray even inside a cluster")
    args = parser.parse_args(argv)
    if args.config is None and not os.environ.get(CONFIG_ENV, "").strip():
        print(f"kubetune: error: no trainer config: pass --config FILE or set {CONFIG_ENV}", file=sys.stderr)
        return 2
    source = str(args.config) if args.config else f"${CONFIG_ENV}"
    try:
        text = args.config.read_text() if args.config else os.environ[CONFIG_ENV]
    except OSError as error:
        print(f"kubetune: error: cannot read {args.config}: {error.strerror}", file=sys.stderr)
        return 2
    try:
        config = TrainerConfig.model_validate_json(text)
    except ValidationError as error:
        for item in error.errors():
            where = ".".join(str(p) for p in item["loc"])
            at = f"{source}: {where}" if where else source  # invalid JSON has no field path
            print(f"kubetune: error: {at}: {item['msg']}", file=sys.stderr)
        return 2
    if os.environ.get("RAY_ADDRESS") and not args.local:
        return run_in_cluster(config, s3_endpoint=args.s3_endpoint)
    return run_local(config, s3_endpoint=args.s3_endpoint)


if __name__ == "__main__":
    sys.exit(main())
