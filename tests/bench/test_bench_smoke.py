"""Each benchmark runs end to end in a tiny configuration and yields well-formed result rows.

No timing is asserted (figures on a shared machine prove nothing in a test); what is checked is what a
reader of bench/results.md relies on: every figure has samples of kubetune and, where it claims one, of
its baseline, a finite ratio, a target it can be checked against, and a line in the table.
"""

from __future__ import annotations

import math
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType

import pytest

from bench import (
    checkpoint_blocking,
    checkpoint_storage,
    control_plane,
    first_step,
    input_pipeline,
    progress_fanin,
    quality,
    streaming,
    trainer_overhead,
)
from bench.__main__ import render, run_all
from bench.common import Row, Stat, host_facts, markdown_table
from tests.support.paths import REPO


def check_rows(rows: list[Row], benchmark: str) -> None:
    assert rows, f"{benchmark} produced no figures"
    table = markdown_table(rows).splitlines()
    assert len(table) == len(rows) + 2
    for row, line in zip(rows, table[2:], strict=True):
        assert row.benchmark == benchmark
        assert row.product and all(math.isfinite(v) and v >= 0 for v in row.product), row
        assert all(math.isfinite(v) and v >= 0 for v in row.baseline), row
        if row.baseline and row.baseline_stat and row.baseline_stat.median > 0:
            assert row.ratio is not None and math.isfinite(row.ratio)
        if row.goal is not None:
            assert row.met in (True, False)
            assert row.target_text() in line
        assert line.startswith(f"| {benchmark} | {row.figure} |")


def run_tiny(module: ModuleType, tmp_path: Path) -> list[Row]:
    rows: list[Row] = module.run(module.Config.tiny(), tmp_path)
    check_rows(rows, module.NAME)
    return rows


def test_checkpoint_storage_compares_save_and_load_with_boto3(tmp_path: Path) -> None:
    rows = run_tiny(checkpoint_storage, tmp_path)
    assert {r.figure for r in rows} >= {"save (upload)", "load (download)"}
    assert all(r.baseline for r in rows)


def test_checkpoint_blocking_compares_the_async_upload_with_a_synchronous_one(tmp_path: Path) -> None:
    rows = run_tiny(checkpoint_blocking, tmp_path)
    blocked = next(r for r in rows if r.figure.startswith("steps blocked by checkpoints"))
    assert blocked.absolute and blocked.goal == ("<=", checkpoint_blocking.TARGET_PERCENT)
    assert all(0 <= share <= 100 for share in blocked.product + blocked.baseline)


def test_input_pipeline_compares_cold_and_warm_epochs_with_local_disk(tmp_path: Path) -> None:
    rows = run_tiny(input_pipeline, tmp_path)
    assert len(rows) == 4 and all(r.baseline for r in rows)
    # The cold first epoch is held against the best any S3 path could do (raw GETs, then a local epoch).
    cold = next(r for r in rows if r.figure.startswith("first epoch, cold node vs raw"))
    assert cold.goal == (">=", 0.8)


def test_streaming_holds_a_stream_epoch_against_raw_shard_gets_and_its_disk_against_the_limit(tmp_path: Path) -> None:
    rows = run_tiny(streaming, tmp_path)
    by_figure = {r.figure: r for r in rows}
    assert by_figure["stream epoch vs raw shard GETs (floor)"].goal == (">=", 0.8)
    disk = by_figure["peak disk of the stream folder / sizeLimit"]
    # The stream folder was really sampled (something was on disk), and the window kept it within the limit.
    assert disk.goal == ("<=", 1.0) and all(0 < share <= 1.0 for share in disk.product)


def test_control_plane_measures_both_operators_as_processes(tmp_path: Path) -> None:
    rows = run_tiny(control_plane, tmp_path)
    by_figure = {r.figure: r for r in rows}
    assert by_figure["operator peak RSS"].absolute
    assert all(len(r.product) == len(r.baseline) == 1 for r in rows)
    # The larger burst (--burst-jobs) has its own rows: the time target at every size, RSS at the largest.
    assert by_figure["8 jobs: all RayJobs exist after"].goal == ("<=", 1.2)
    assert by_figure["5 jobs: all RayJobs exist after"].goal == ("<=", 1.2)  # issue #22's target at every size
    assert "8 jobs: all RayJobs exist after (same API work)" in by_figure
    assert by_figure["operator peak RSS, 8 jobs"].goal == ("<", 400.0)
    assert "operator peak RSS, 5 jobs" in by_figure
    # Every operator really ran, as a process of its own, and logged to the run's folder.
    assert sorted(p.name for p in tmp_path.glob("operator-*.log")) == [
        "operator-bare-5-0.log",
        "operator-bare-8-0.log",
        "operator-bare-same-work-5-0.log",
        "operator-bare-same-work-8-0.log",
        "operator-kubetune-5-0.log",
        "operator-kubetune-8-0.log",
    ]


def test_progress_fan_in_drives_the_operators_endpoint_and_a_bare_one(tmp_path: Path) -> None:
    rows = run_tiny(progress_fanin, tmp_path)
    by_figure = {r.figure: r for r in rows}
    # Pushes as far apart as the write interval: lag target < 2 s; faster ones: coalesced to one write per 5 s.
    assert by_figure["3 jobs every 2s: status lag p99"].goal == ("<", 6.0)
    per_interval = (
        "2 jobs every 1.1s: status writes of one job per 5s of pushes, the most of any job (last step left out)"
    )
    assert by_figure[per_interval].goal == ("<=", 1.0)
    # Fewer writes than updates is the coalescing's behaviour, which test_progress_writes checks on a fake clock:
    # here, on a loaded machine, pushes may come slower than the interval and coalesce nothing.
    assert "2 jobs every 1.1s: status writes per accepted update" in by_figure
    assert sorted(p.name for p in tmp_path.glob("endpoint-*.log")) == [
        "endpoint-bare-2-1.1.log",
        "endpoint-bare-3-2.log",
        "endpoint-kubetune-2-1.1.log",
        "endpoint-kubetune-3-2.log",
    ]


@pytest.mark.slow
def test_trainer_overhead_runs_the_trainer_through_ray(tmp_path: Path) -> None:
    rows = run_tiny(trainer_overhead, tmp_path)
    assert len(rows) == 1 and rows[0].baseline


def test_results_page_states_host_versions_and_every_figure(tmp_path: Path) -> None:
    rows = [
        Row("Demo", "speed", "images/s", [9.0, 10.0, 11.0], [10.0, 10.0, 12.0], (">=", 0.95), "a note"),
        Row("Demo", "memory", "MB", [120.0], [100.0], ("<", 250.0), absolute=True),
    ]
    page = render(
        rows,
        {"broken": "RuntimeError: boom"},
        {"demo": 3.0},
        quick=True,
        host=host_facts(),
        started=datetime(2026, 1, 2, 3, 4, tzinfo=UTC),
        findings="## Findings\n\nby hand",
    )
    assert "2026-01-02 03:04 UTC" in page and "quick" in page
    assert "cores" in page and "torch " in page
    assert (
        "| Demo | speed | 10.0 (9.00–11.0) images/s | 10.0 (10.0–12.0) images/s | 1.00 | ratio ≥ 0.95 | yes |"  # noqa: RUF001
        in page
    )
    assert "| Demo | memory | 120 MB | 100 MB | 1.20 | < 250 MB | yes |" in page
    assert "- broken: RuntimeError: boom" in page
    assert page.rstrip().endswith("by hand")


def test_the_page_can_be_written_again_from_a_runs_raw_samples(tmp_path: Path) -> None:
    import json

    from bench.__main__ import main

    row = Row("Demo", "speed", "images/s", [9.0, 11.0], [10.0, 10.0], (">=", 0.95), "a note")
    raw = tmp_path / "results.json"
    raw.write_text(
        json.dumps(
            {
                "started": "2026-01-02T03:04:00+00:00",
                "quick": False,
                "seconds": {"demo": 60.0},
                "host": host_facts(),
                "rows": [row.as_dict()],
                "failures": {},
            }
        )
    )
    page = tmp_path / "results.md"
    assert main(["--render", str(raw), "--results", str(page)]) == 0
    assert "| Demo | speed | 10.0 (9.00–11.0) images/s | 10.0 (10.0–10.0) images/s | 1.00 |" in page.read_text()  # noqa: RUF001
    assert "2026-01-02 03:04 UTC; mode: full; took 1.0 min" in page.read_text()


def test_a_failing_benchmark_is_reported_and_the_others_still_run(tmp_path: Path) -> None:
    calls: list[str] = []

    def config_for(module: ModuleType) -> object:
        calls.append(module.NAME)
        return None  # each run() rejects it: every benchmark fails, and each is still tried

    rows, failures, seconds = run_all(["storage", "pipeline"], True, tmp_path, config_for)
    assert rows == [] and set(failures) == {"storage", "pipeline"} and set(seconds) == {"storage", "pipeline"}
    assert calls == [checkpoint_storage.NAME, input_pipeline.NAME]


def test_median_and_range_are_of_the_samples() -> None:
    stat = Stat.of([3.0, 1.0, 2.0, 10.0])
    assert (stat.median, stat.low, stat.high, stat.n) == (2.5, 1.0, 10.0, 4)


@pytest.mark.parametrize(
    "task_args",
    [
        ["--model", "test_resnet"],
        ["--task", "detection", "--model", "ssdlite320_mobilenet_v3_large", "--image-size", "64"],
    ],
    ids=["classification", "detection"],
)
def test_gpu_script_runs_standalone_on_cpu_with_a_tiny_model(tmp_path: Path, task_args: list[str]) -> None:
    import json
    import subprocess
    import sys

    script = REPO / "bench" / "gpu.py"
    out = tmp_path / "gpu.json"
    args = [*task_args, "--device", "cpu", "--steps", "1", "--repeats", "1", "--json", str(out)]
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "CPU (no CUDA): kubetune" in done.stdout and "ratio" in done.stdout
    result = json.loads(out.read_text())
    assert result["device"] == "CPU (no CUDA)" and result["ratio"] > 0
    assert len(result["images_per_second"]["kubetune"]) == len(result["images_per_second"]["plain"]) == 1
    assert result["task"] == ("detection" if "detection" in task_args else "classification")


@pytest.mark.parametrize(
    ("task_args", "workers"),
    [
        (["--model", "test_resnet"], "0,1"),
        # Loader processes cost a detector's smoke ~45 s on two cores, none ~5 s: the classification one
        # covers them.
        (["--task", "detection", "--model", "ssdlite320_mobilenet_v3_large", "--image-size", "64"], "0"),
    ],
    ids=["classification", "detection"],
)
def test_gpu_script_feeds_the_step_from_jpeg_files_through_both_decode_paths(
    tmp_path: Path, task_args: list[str], workers: str
) -> None:
    import json
    import subprocess
    import sys

    script = REPO / "bench" / "gpu.py"
    out = tmp_path / "gpu-jpeg.json"
    args = ["--input", "jpeg", *task_args, "--device", "cpu", "--steps", "1", "--repeats", "1"]
    args += ["--loader-workers", workers, "--cache-dir", str(tmp_path), "--json", str(out)]
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "ratio to synthetic" in done.stdout
    result = json.loads(out.read_text())
    assert result["device"] == "CPU (no CUDA)" and result["synthetic_median"] > 0
    assert result["task"] == ("detection" if "detection" in task_args else "classification")
    # Both real paths, with and without the step, at each loader worker count, each against the ceiling.
    assert set(result["images_per_second"]) == {
        "gpu decode",
        "gpu decode, input only",
        "gpu decode, thread",
        "cpu decode",
        "cpu decode, input only",
    }
    assert all(set(by_workers) == set(workers.split(",")) for by_workers in result["images_per_second"].values())
    assert all(ratio > 0 for by in result["ratio_to_synthetic"].values() for ratio in by.values())
    assert result["cpu_cores_usable"] >= 1 and set(result["loader_workers_for_target"]) == {
        "gpu decode",
        "gpu decode, thread",
        "cpu decode",
    }
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # the JPEGs' folder is removed


def test_a_partial_run_keeps_the_other_benchmarks_rows_and_set_ups() -> None:
    """`python -m bench --only quality` rewrites the Quality rows and keeps what the page had for the rest."""
    from bench.__main__ import carry_over

    def page(rows: list[Row], day: int) -> str:
        started = datetime(2026, 1, day, 3, 4, tzinfo=UTC)
        findings = "## Findings\n\nkept\n\n| Figure | Before |\n| --- | --- |\n| a table of the findings | 1 |"
        return render(rows, {}, {"x": 1.0}, quick=False, host=host_facts(), started=started, findings=findings)

    old = page(
        [
            Row(trainer_overhead.NAME, "throughput", "images/s", [10.0], [10.0], (">=", 0.95), "trainer set-up"),
            Row(quality.NAME, "far: accuracy", "accuracy", [0.5], [0.6], (">=", 1.0), "old quality"),
        ],
        1,
    )
    new = page([Row(quality.NAME, "far: accuracy", "accuracy", [0.9], [0.6], (">=", 1.0), "new quality")], 2)
    merged = carry_over(old, new, {quality.NAME})
    table = [line for line in merged.split("## Set-ups")[0].splitlines() if line.startswith("| ")]
    assert table[2].startswith(f"| {trainer_overhead.NAME} | throughput | 10.0 images/s |")
    assert table[3].startswith(f"| {quality.NAME} | far: accuracy | 0.900 accuracy |") and len(table) == 4
    assert "2026-01-02 03:04 UTC" in merged and f"Rows of {trainer_overhead.NAME}: carried over" in merged
    assert "2026-01-01 03:04 UTC" in merged
    assert "- trainer set-up" in merged and "- new quality" in merged and "old quality" not in merged
    assert merged.index(f"### {trainer_overhead.NAME}") < merged.index(f"### {quality.NAME}")
    assert merged.rstrip().endswith("| a table of the findings | 1 |") and "kept" in merged


def test_quality_targets_read_against_the_plain_loop_at_one_rate_and_the_best_of_the_grid() -> None:
    samples = quality.Samples(
        kubetune=[0.90, 0.92, 0.95],
        chosen_lrs=[3e-3, 4e-3, 5e-3],
        grid={1e-3: [0.60, 0.70, 0.80], 3e-3: [0.91, 0.93, 0.94]},
        random=[0.3, 0.3, 0.3],
    )
    at_one_rate, against_the_best, from_random = quality.rows(quality.TASKS["far"], samples, quality.Config())
    assert (at_one_rate.figure, at_one_rate.met) == ("far: accuracy vs plain loop at lr 0.001", True)
    assert against_the_best.figure == "far: accuracy vs plain loop's best lr (0.003)"
    # 0.92 - 0.93 is within the 2-point margin; the table shows the difference, not a ratio.
    assert against_the_best.met and against_the_best.compared == pytest.approx(-0.01)
    assert "| -0.010 | difference ≥ -0.02 | yes |" in markdown_table([against_the_best])
    assert from_random.goal is None


def test_time_to_first_step_is_cut_at_the_trainers_start_up_marks() -> None:
    applied = datetime(2026, 12, 3, 23, 59, 59, 500000, tzinfo=UTC)
    lines = [
        f"(RayTrainWorker pid=1) kubetune: start-up: {ends} at 00:00:{second:02d}.250Z"
        for second, (_, _, ends) in enumerate(first_step.PHASES[2:-1], start=1)
    ]
    # The node preparation and the worker's timm import, beside Ray Train's worker group start (4.25 → 5.25).
    lines += [
        "kubetune: start-up: node task started at 00:00:04.500Z",
        "(node_task pid=2) kubetune: start-up: node task imports done at 00:00:04.600Z",
        "(node_task pid=2) kubetune: start-up: base weights loaded at 00:00:04.800Z",
        "(node_task pid=2) kubetune: start-up: data cache filled at 00:00:04.900Z",
        "kubetune: start-up: node prepared at 00:00:05.000Z",
        "kubetune: start-up: model imports started at 00:00:04.750Z",
        "kubetune: start-up: model imports done at 00:00:06.250Z",
        "kubetune: start-up: first step at 00:00:59.000Z",
    ]
    # Ray forwards the worker's lines a moment after its first step shows in the status: the bench reads
    # the log again until it has every mark.
    without_first_step = [line for line in lines if "first step" not in line]
    logs = iter(["\n".join(without_first_step), "\n".join(lines)])
    marks = first_step.marks_with_all(lambda: next(logs), applied)
    assert marks["driver started"] == datetime(2026, 12, 4, 0, 0, 1, 250000, tzinfo=UTC)  # past midnight
    assert marks["first step"] == datetime(2026, 12, 4, 0, 0, 9, 250000, tzinfo=UTC)  # the first of each
    api = {"rayjob": applied + timedelta(seconds=0.1), "running": applied + timedelta(seconds=1.5)}
    api["status"] = marks["first step"] + timedelta(seconds=0.5)
    seconds = first_step.phases(applied, {**marks, **api})
    assert seconds["operator launch: apply → RayJob created"] == pytest.approx(0.1)
    assert sum(seconds.values()) == pytest.approx(10.25)
    rows = first_step.rows([seconds | first_step.beside(marks)])
    check_rows(rows, first_step.NAME)
    figures = {row.figure: row for row in rows}
    own = figures["operator's and trainer's own shares together"]
    assert own.goal == ("<", 5.0)
    # What ran beside Ray's phases has its own row, in neither share nor the total.
    (import_beside,) = (row for row in rows if row.figure.startswith("timm import on the worker"))
    assert import_beside.product == [pytest.approx(1.5)]
    (preparation,) = (row for row in rows if row.figure.startswith("the node preparation"))
    assert preparation.product == [pytest.approx(0.75)]
    # Ray's: its head 1.4 s, the connection 1.0 s, the worker group 1.0 s; the rest is the own shares.
    assert own.product == [pytest.approx(10.25 - 1.4 - 1.0 - 1.0)]
    assert figures["apply → first step in status.progress"].product == [pytest.approx(10.25)]


def test_the_few_shot_task_has_ten_images_a_class_and_five_seeds() -> None:
    train, validation = quality.classification_data("few")
    assert sorted(Counter(train.labels).values()) == [10] * 5 and len(validation) > 400
    assert not {image.tobytes() for image in train.images} & {image.tobytes() for image in validation.images}
    full = quality.Config.full()
    assert quality.TASKS["few"].seeds(full) == (0, 1, 2, 3, 4)
    assert (quality.TASKS["far"].seeds(full), quality.TASKS["detection"].seeds(full)) == ((0, 1, 2), (0, 1))


def test_the_near_task_runs_seven_seeds() -> None:
    # At its ceiling (179 validation images) a seed moves the figure by one to three images: three seeds
    # left the median to chance (bench/findings.md, "Quality"). Both sides run every seed of the task.
    assert quality.TASKS["near"].seeds(quality.Config.full()) == tuple(range(7))


def test_quick_runs_one_seed_a_task() -> None:
    # `python -m bench --quick` must finish in minutes (issue #22): the full run's seven near seeds made its
    # Quality section alone 12 minutes.
    quick = quality.Config.quick()
    assert {name: task.seeds(quick) for name, task in quality.TASKS.items()} == dict.fromkeys(quality.TASKS, (0,))
