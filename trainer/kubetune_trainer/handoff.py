"""The hand-off to a model registry: an MLflow run for the job, and a registered model version.

Only when `output.mlflow` is set, and only then imported (MLflow is the optional `mlflow` extra). After
the export, the driver logs to the tracking server: the job's settings as parameters, every epoch's
figures as metrics (step = epoch) and the evaluation's headline figures, the report and its data as
artifacts, and the exported files under `model/`; with `registeredModel`, that folder becomes a new
version of it. A run already logged for this job (tag `kubetune.runName`) is not logged again, so a
restarted driver does not add a second version.

The hand-off never fails the job: the model is under output.path either way. What went wrong is a
warning and the last line of the run's summary.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kubetune_trainer.config import MlflowSpec, TrainerConfig
from kubetune_trainer.errors import first_line
from kubetune_trainer.storage import S3Store, S3Uri

log = logging.getLogger(__name__)

RUN_TAG = "kubetune.runName"
REPORT_FILES = ("report.html", "evaluation.json", "history.json", "training-curves.png", "model.json")
MODEL_FILES = ("model.safetensors", "model.json")
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a parameter's value


def flatten(prefix: str, value: Any) -> dict[str, str]:
    """Nested settings as MLflow parameters: `training.learningRate` → "0.003"."""
    if isinstance(value, Mapping):
        out: dict[str, str] = {}
        for key, inner in value.items():
            out.update(flatten(f"{prefix}.{key}" if prefix else str(key), inner))
        return out
    return {prefix: str(value)[:MAX_PARAM_LENGTH]}


def parameters(config: TrainerConfig) -> dict[str, str]:
    """What the job asked for (never the storage's credentials: none are in the config)."""
    return flatten(
        "",
        {
            "task": config.task,
            "model": config.model.wire(),
            "data": config.data.wire(),
            "training": config.training.wire(),
        },
    )


def metrics(history: Sequence[Mapping[str, Any]], card: Mapping[str, Any]) -> list[tuple[str, float, int]]:
    """(key, value, step): each epoch's figures at its epoch, the evaluation's at the exported epoch."""
    out = [
        (key, float(value), int(entry["epoch"]))
        for entry in history
        for key, value in entry.items()
        if key != "epoch" and isinstance(value, int | float) and not isinstance(value, bool)
    ]
    evaluation = card.get("evaluation") or {}
    split, epoch = evaluation.get("split", "test"), int(card.get("epoch") or 0)
    out += [(f"{split}.{key}", float(value), epoch) for key, value in (evaluation.get("metrics") or {}).items()]
    return out


def fetch_outputs(store: S3Store, output: S3Uri, card: Mapping[str, Any], folder: Path) -> None:
    """The report and its data into `folder`/report, the model's files (the card names the formats that
    were made) into `folder`/model."""
    made = [facts["file"] for facts in (card.get("exports") or {}).values() if facts.get("file")]
    for part, names in (("report", REPORT_FILES), ("model", (*MODEL_FILES, *made))):
        for name in names:
            store.download_file(output.join(name), folder / part / name)


def existing_run(client: Any, experiment_id: str, run_name: str) -> Any | None:
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{run_name}'", max_results=1)
    return runs[0] if runs else None


def log_run(
    client: Any,
    spec: MlflowSpec,
    config: TrainerConfig,
    store: S3Store,
    output: S3Uri,
    card: Mapping[str, Any],
    history: Sequence[Mapping[str, Any]],
) -> str:
    """Log the run and register the model; a line saying what was done."""
    from mlflow.entities import Metric, Param

    experiment = client.get_experiment_by_name(spec.experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(spec.experiment)
    found = existing_run(client, experiment_id, config.run_name)
    if found is not None:
        return f"run {found.info.run_id} in experiment {spec.experiment!r} already has this job's model"
    run = client.create_run(
        experiment_id, run_name=config.job_name, tags={RUN_TAG: config.run_name, "kubetune.output": str(output)}
    )
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        params=[Param(k, v) for k, v in parameters(config).items()],
        metrics=[Metric(key, value, now, step) for key, value, step in metrics(history, card)],
    )
    with tempfile.TemporaryDirectory(prefix="kubetune-mlflow-") as tmp:
        fetch_outputs(store, output, card, Path(tmp))
        client.log_artifacts(run_id, str(Path(tmp) / "report"), "report")
        client.log_artifacts(run_id, str(Path(tmp) / "model"), "model")
    client.set_terminated(run_id)
    done = f"run {run_id} in experiment {spec.experiment!r}"
    if spec.registered_model:
        version = register(client, spec.registered_model, f"{run.info.artifact_uri}/model", run_id, config)
        done += f", registered as {spec.registered_model!r} version {version}"
    return done


def register(client: Any, name: str, source: str, run_id: str, config: TrainerConfig) -> str:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(name, source, run_id=run_id, tags={RUN_TAG: config.run_name})
    return str(version.version)


def hand_off(
    config: TrainerConfig, store: S3Store, output: S3Uri, card: Mapping[str, Any], history: Sequence[Mapping[str, Any]]
) -> str:
    """Log the run to output.mlflow's server; a line for the summary (what was done, or why not)."""
    spec = config.output.mlflow
    if spec is None:
        return ""
    try:
        from mlflow import MlflowClient
    except ImportError:
        message = "not logged: MLflow is not installed (pip install 'kubetune[mlflow]')"
        log.warning("output.mlflow: %s", message)
        return message
    try:
        done = log_run(MlflowClient(tracking_uri=spec.tracking_uri), spec, config, store, output, card, history)
    except Exception as error:
        line = first_line(error)
        log.warning("output.mlflow: could not log the run to %s: %s", spec.tracking_uri, line)
        return f"not logged to {spec.tracking_uri}: {line}"
    log.info("MLflow: %s", done)
    return done
