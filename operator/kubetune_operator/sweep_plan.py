"""What a sweep (spec.sweep) will take, before it runs: the plan `kubetune render` prints (pure).

The figures come from the spec alone: the trials, how many train at once (`FineTuneJobSpec.concurrent_trials`),
the Ray cluster that holds them (`FineTuneJobSpec.cluster_workers`, which the RayJob's worker group is built
from), and an upper bound of the GPU time: every trial training all its epochs, as with the fifo scheduler
(ASHA stops poor trials early, so a sweep with it takes less).
"""

from __future__ import annotations

from dataclasses import dataclass

from kubetune_operator.spec import FineTuneJob

COMMENT = "# "


@dataclass(frozen=True)
class SweepPlan:
    """A sweep's resources: per trial, for the whole Ray cluster, and its GPU budget."""

    trials: int
    concurrent_trials: int
    workers_per_trial: int
    gpus_per_worker: int
    cluster_workers: int
    epochs: int
    scheduler: str

    @property
    def gpus_per_trial(self) -> int:
        return self.workers_per_trial * self.gpus_per_worker

    @property
    def cluster_gpus(self) -> int:
        return self.cluster_workers * self.gpus_per_worker

    @property
    def gpu_epochs(self) -> int:
        """At most this many GPU-epochs: every trial trains every epoch on all its GPUs."""
        return self.trials * self.epochs * self.gpus_per_trial


def sweep_plan(job: FineTuneJob) -> SweepPlan | None:
    """The plan of `job`'s sweep; None when it sweeps nothing."""
    spec = job.spec
    sweep = spec.sweep
    if sweep is None:
        return None
    scheduler = sweep.scheduler
    how = (
        f"asha (gracePeriod {scheduler.grace_period}, reductionFactor {scheduler.reduction_factor}): poor trials "
        "stop early"
        if scheduler.type == "asha"
        else "fifo: every trial trains all its epochs"
    )
    return SweepPlan(
        trials=sweep.trials,
        concurrent_trials=spec.concurrent_trials,
        workers_per_trial=spec.resources.workers.min,
        gpus_per_worker=spec.resources.gpus_per_worker,
        cluster_workers=spec.cluster_workers.max,
        epochs=spec.training.epochs,
        scheduler=how,
    )


def _gpus(count: int) -> str:
    return f"{count} GPU{'' if count == 1 else 's'}"


def plan_lines(job: FineTuneJob) -> list[str]:
    """The plan as YAML comment lines (a YAML stream stays one that kubectl applies); none without a sweep."""
    plan = sweep_plan(job)
    if plan is None:
        return []
    where = f"{job.metadata.namespace or 'default'}/{job.metadata.name}"
    per_trial = f"{plan.workers_per_trial} worker(s) x {_gpus(plan.gpus_per_worker)}"
    if plan.gpus_per_worker == 0:
        budget = "CPU only (resources.gpusPerWorker 0): no GPU time"
    else:
        budget = (
            f"at most {plan.gpu_epochs} GPU-epochs ({plan.trials} trials x {plan.epochs} epochs x "
            f"{_gpus(plan.gpus_per_trial)} per trial)"
        )
    lines = [
        f"sweep plan of {where}: {plan.trials} trials, {plan.concurrent_trials} at once",
        f"  per trial: {per_trial} = {_gpus(plan.gpus_per_trial)}",
        f"  Ray cluster: {plan.cluster_workers} worker(s), {_gpus(plan.cluster_gpus)} "
        "(resources.workers x trials at once)",
        f"  GPU budget: {budget}",
        f"  scheduler: {plan.scheduler}",
    ]
    return [COMMENT + line for line in lines]
