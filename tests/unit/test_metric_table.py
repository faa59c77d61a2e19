"""One metric table (`kubetune_trainer.progress_model.METRICS`) drives every place that lists metrics.

Each place lists exactly the table's metrics, and a row added to the table shows up in each of them: the
progress message and the status (and so the CRD), the Prometheus gauges, the printer columns, the console
line, history.json, model.json, the tasks' validation figures and `kubetune run --local`'s last line.
"""

from __future__ import annotations

from typing import get_args

import pydantic
import pytest

from kubetune_operator import crd as crd_module
from kubetune_operator import metrics as operator_metrics
from kubetune_operator.crd import openapi_schema, printer_columns
from kubetune_operator.metrics import OperatorMetrics
from kubetune_operator.spec import ProgressStatus, StatusModel
from kubetune_trainer import progress_model
from kubetune_trainer.config import LOWER_IS_BETTER, SELECT_BY, CamelModel, SelectBy
from kubetune_trainer.progress_model import (
    METRIC_KEYS,
    METRICS,
    TRIAL_STATES,
    Gauge,
    Metric,
    ProgressMetrics,
    SweepProgress,
    TrialEnd,
    card_metrics,
    console_parts,
    history_entry,
    metrics_model,
    summary_parts,
    validation_keys,
)
from tests.support.paths import REPO

NS = "vision"


def aliases(model: type[pydantic.BaseModel]) -> list[str]:
    return [info.alias or name for name, info in model.model_fields.items()]


def gauge_value(metrics: OperatorMetrics, gauge: str, name: str) -> float | None:
    return metrics.registry.get_sample_value(gauge, {"namespace": NS, "name": name})


# -- every place lists exactly the table's metrics --------------------------------------------------


def test_the_message_and_the_status_carry_exactly_the_tables_metrics() -> None:
    keys = [metric.key for metric in METRICS]
    assert aliases(ProgressMetrics) == keys
    status_metrics = ProgressStatus.model_fields["metrics"].annotation
    assert status_metrics is not None
    crd_metrics = openapi_schema()["properties"]["status"]["properties"]["progress"]["properties"]["metrics"]
    assert list(crd_metrics["properties"]) == keys
    for metric in METRICS:
        node = crd_metrics["properties"][metric.key]
        assert node["type"] == "number" and node["description"] == metric.description
        assert (node.get("minimum"), node.get("maximum")) == (metric.ge, metric.le), metric.key


def test_the_status_is_the_update_less_the_trainers_phase_plus_when_it_was_accepted() -> None:
    update = aliases(progress_model.ProgressUpdate)
    # A sweep's trials go to status.sweep, beside the progress (tests/operator/test_sweep_status.py).
    assert aliases(ProgressStatus) == [key for key in update if key not in ("phase", "sweep")] + ["updatedAt"]
    with pytest.raises(pydantic.ValidationError, match="less than or equal to 1000"):
        ProgressStatus.model_validate({"epoch": 1001})
    # Lenient on read, as the whole status: a key another operator version wrote is ignored, never an error.
    assert ProgressStatus.model_validate({"epoch": 2, "metrics": {"valAccuracy": 0.5, "valNew": 1}})


def test_each_metric_with_a_gauge_has_exactly_that_gauge_documented() -> None:
    metrics = OperatorMetrics(process_collectors=False)
    tabled = {metric.key: metric.gauge.name for metric in METRICS if metric.gauge}
    assert {key: gauge._name for key, gauge in metrics.job_metrics.items()} == tabled
    documented = (REPO / "docs" / "observability.md").read_text()
    for name in tabled.values():
        assert f"`{name}`" in documented, name


def test_the_printer_columns_are_the_tables() -> None:
    columns = {c["jsonPath"]: c["name"] for c in printer_columns() if ".metrics." in c["jsonPath"]}
    assert columns == {f".status.progress.metrics.{m.key}": m.column for m in METRICS if m.column}


def test_each_task_reports_the_tables_validation_figures() -> None:
    from kubetune_trainer.tasks import ClassificationTask, DetectionTask

    assert ClassificationTask.metric_keys == ("valLoss", "valAccuracy")
    assert DetectionTask.metric_keys == ("valMap", "valMap50")
    for task in (ClassificationTask, DetectionTask):
        for panel in task.panels:  # the curves plot only what history.json holds
            assert {key for key, _ in panel.series} <= METRIC_KEYS, panel.title


def test_the_figures_a_run_ranks_by_are_the_tables_validation_figures() -> None:
    """training.selectBy, earlyStopping.metric and sweep.metric (config.SELECT_BY, which the contract's
    config.py holds apart because progress_model imports it) name exactly the table's validation figures."""
    for task in ("classification", "detection"):
        assert set(SELECT_BY[task]) == set(validation_keys(task)), task
    assert set(get_args(SelectBy)) == {key for keys in SELECT_BY.values() for key in keys}
    assert LOWER_IS_BETTER <= METRIC_KEYS


def test_the_sweep_counts_a_trial_in_each_of_its_states_once() -> None:
    """status.sweep, the kubetune_job_sweep_trials series and sweep.json's states: progress_model's TRIAL_STATES."""
    counts = [name for name, info in SweepProgress.model_fields.items() if info.annotation is int and name != "trials"]
    assert counts == list(TRIAL_STATES)
    assert set(get_args(TrialEnd)) < set(TRIAL_STATES)


def test_history_and_the_card_take_only_the_tables_metrics() -> None:
    entry = history_entry(3, {"imagesPerSecond": 10.0, "valAccuracy": 0.9, "trainLoss": 0.5}, 12.0)
    assert list(entry) == ["epoch", "trainLoss", "valAccuracy", "imagesPerSecond", "seconds"]
    with pytest.raises(ValueError, match=r"\['valF1'\] are not in progress_model.METRICS"):
        history_entry(3, {"valF1": 0.5}, 1.0)
    # The learning rate is in the history, not in the card.
    assert card_metrics({**entry, "learningRate": 0.1}) == {
        "trainLoss": 0.5,
        "valAccuracy": 0.9,
        "imagesPerSecond": 10.0,
    }


# -- a row added to the table shows up in each place -------------------------------------------------

F1 = Metric(
    "val_f1",
    "Classification: macro F1 after the latest epoch, as a fraction (0-1).",
    tasks=("classification",),
    validation=True,
    ge=0,
    le=1,
    console="F1 {:.2f}",
    summary="F1 {:.1%}",
    gauge=Gauge("kubetune_job_validation_f1_ratio", "Latest macro F1 (0 to 1) reported by the run."),
    column="Val-F1",
)


@pytest.fixture
def with_f1(monkeypatch: pytest.MonkeyPatch) -> None:
    """The table with one more row, seen by every module that reads it."""
    table = (*METRICS, F1)
    for module in (progress_model, operator_metrics, crd_module):
        monkeypatch.setattr(module, "METRICS", table)
    monkeypatch.setattr(progress_model, "METRIC_KEYS", frozenset(m.key for m in table))


@pytest.mark.usefixtures("with_f1")
def test_a_new_row_is_a_field_with_its_bounds_in_the_message_and_the_status() -> None:
    message = metrics_model("ProgressMetrics", CamelModel, "")
    assert message.model_validate({"valF1": 0.5}).wire() == {"valF1": 0.5}
    with pytest.raises(pydantic.ValidationError, match="less than or equal to 1"):
        message.model_validate({"valF1": 1.5})
    status = metrics_model("ProgressMetrics", StatusModel, "")
    schema = crd_module.structural(status.model_json_schema(by_alias=True), {})
    assert schema["properties"]["valF1"]["description"] == F1.description


@pytest.mark.usefixtures("with_f1")
def test_a_new_row_is_on_the_console_in_history_in_the_card_and_in_the_summary() -> None:
    figures = metrics_model("ProgressMetrics", CamelModel, "").model_validate({"trainLoss": 0.25, "valF1": 0.5})
    assert console_parts(figures) == ["loss 0.2500", "F1 0.50"]
    assert validation_keys("classification") == ("valLoss", "valAccuracy", "valF1")
    assert validation_keys("detection") == ("valMap", "valMap50")
    entry = history_entry(1, {"trainLoss": 0.25, "valF1": 0.5, "learningRate": 0.1}, 3.0)
    assert list(entry) == ["epoch", "trainLoss", "learningRate", "valF1", "seconds"]
    assert card_metrics(entry) == {"trainLoss": 0.25, "valF1": 0.5}
    assert summary_parts({"valF1": 0.5}) == ["F1 50.0%"]


@pytest.mark.usefixtures("with_f1")
def test_a_new_row_is_a_gauge_and_a_printer_column() -> None:
    metrics = OperatorMetrics(process_collectors=False)
    metrics.observe_progress(NS, "cats", {"epoch": 1, "metrics": {"valF1": 0.75}})
    assert gauge_value(metrics, "kubetune_job_validation_f1_ratio", "cats") == 0.75
    metrics.forget_job(NS, "cats")
    assert gauge_value(metrics, "kubetune_job_validation_f1_ratio", "cats") is None
    column = next(
        c for c in crd_module.crd()["spec"]["versions"][0]["additionalPrinterColumns"] if c["name"] == "Val-F1"
    )
    assert column == {
        "name": "Val-F1",
        "type": "number",
        "jsonPath": ".status.progress.metrics.valF1",
        "description": F1.description,
    }
