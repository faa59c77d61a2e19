"""FineTuneJob → TrainerConfig: the one function that derives what the trainer is given."""

from __future__ import annotations

from kubetune_operator.spec import FineTuneJob
from kubetune_trainer.config import ProgressTarget, ScalingSpec, TrainerConfig, run_digest, run_name


def job_run_name(job: FineTuneJob) -> str:
    """The Ray Train run of `job`: its namespace, name and the digest of its run-shaping spec
    (`config.run_name`), so that a driver restarted by KubeRay, a suspended job resumed, and the same job
    deleted and applied again all continue from the run's last committed checkpoint. With
    `model.resume: never` the job's uid is added: only this job object continues that run.
    """
    spec, meta = job.spec, job.metadata
    digest = run_digest(spec.task, spec.model, spec.data, spec.training)
    uid = meta.uid if spec.model.resume == "never" else None
    return run_name(meta.namespace or "default", meta.name, digest, uid)


def trainer_config(job: FineTuneJob, progress: ProgressTarget | None = None) -> TrainerConfig:
    """The trainer's config for `job`; used by the operator, `kubetune render` and `kubetune run --local`."""
    spec = job.spec
    resources = spec.resources
    policy = spec.run_policy
    return TrainerConfig(
        job_name=job.metadata.name,
        namespace=job.metadata.namespace,
        task=spec.task,
        run_name=job_run_name(job),
        model=spec.model,
        data=spec.data,
        training=spec.training,
        output=spec.output,
        storage=spec.storage,
        scaling=ScalingSpec(
            workers=resources.workers.min,
            max_workers=resources.workers.max if resources.workers.elastic else None,
            resize_interval_s=float(resources.workers.resize_interval_seconds),
            gpus_per_worker=resources.gpus_per_worker,
            cpus_per_worker=float(resources.cpus_per_worker),
        ),
        max_failures=policy.max_retries,
        max_preemptions=policy.max_preemptions,
        preemption_grace_seconds=policy.preemption_grace_seconds,
        progress=progress,
        sweep=spec.sweep,
    )
