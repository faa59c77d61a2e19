"""FineTuneJob → TrainerConfig: the one function that derives what the trainer is given."""

from __future__ import annotations

from kubetune_operator.spec import FineTuneJob
from kubetune_trainer.config import ProgressTarget, ScalingSpec, TrainerConfig


def trainer_config(job: FineTuneJob, progress: ProgressTarget | None = None) -> TrainerConfig:
    """The trainer's config for `job`; used by the operator, `kubetune render` and `kubetune run --local`.

    The run name is the job's uid so that a driver restarted by KubeRay, or a later resume, finds the
    same Ray Train run and continues from its last checkpoint; a manifest not yet stored by the API
    server has no uid, and then the name stands in.
    """
    spec = job.spec
    resources = spec.resources
    return TrainerConfig(
        job_name=job.metadata.name,
        namespace=job.metadata.namespace,
        task=spec.task,
        run_name=job.metadata.uid or job.metadata.name,
        model=spec.model,
        data=spec.data,
        training=spec.training,
        output=spec.output,
        storage=spec.storage,
        scaling=ScalingSpec(
            workers=resources.workers,
            gpus_per_worker=resources.gpus_per_worker,
            cpus_per_worker=float(resources.cpus_per_worker),
        ),
        max_failures=spec.run_policy.max_retries,
        progress=progress,
    )
