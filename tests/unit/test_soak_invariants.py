"""The soak's invariants (kubetune_dev.soak.invariants) on crafted facts: each fails on the breakage it is
there to catch, and passes on a healthy job. Also: the soak's schedule is the same for the same seed."""

from __future__ import annotations

import pytest

from kubetune_dev.soak import invariants
from kubetune_dev.soak.schedule import FAULT_KINDS, plan

HISTORY = [
    {"epoch": 1, "trainLoss": 0.9, "valLoss": 0.8, "valAccuracy": 0.7, "seconds": 3.0},
    {"epoch": 2, "trainLoss": 0.5, "valLoss": 0.4, "valAccuracy": 0.9, "seconds": 3.1},
]
PROGRESS = {"epoch": 2, "step": 40, "metrics": {"trainLoss": 0.5, "valLoss": 0.4, "valAccuracy": 0.9}}


def test_final_phase_fails_a_job_that_did_not_end_as_expected() -> None:
    assert invariants.final_phase("j", "Succeeded", "Succeeded").passed
    assert invariants.final_phase("j", "Deleted", "Deleted").passed
    failed = invariants.final_phase("j", "Succeeded", "Failed", "TrainingFailed: boom")
    assert not failed.passed and "expected Succeeded" in failed.detail and "boom" in failed.detail
    assert not invariants.final_phase("j", "Deleted", "still there").passed


def test_one_rayjob_per_attempt_fails_a_second_rayjob_a_recreated_one_or_one_left_after_deletion() -> None:
    assert invariants.one_rayjob_per_attempt("j", ["u1"], 1, left=1, deleted=False).passed
    assert invariants.one_rayjob_per_attempt("j", ["u1"], 1, left=0, deleted=True).passed
    assert not invariants.one_rayjob_per_attempt("j", ["u1", "u2"], 1, left=1, deleted=False).passed  # a duplicate
    assert not invariants.one_rayjob_per_attempt("j", [], 1, left=0, deleted=False).passed  # none launched
    assert not invariants.one_rayjob_per_attempt("j", ["u1", "u1"], 1, left=1, deleted=False).passed
    left = invariants.one_rayjob_per_attempt("j", ["u1"], 1, left=1, deleted=True)
    assert not left.passed and "left after the deletion" in left.detail


def test_history_must_have_every_epoch_once_in_order() -> None:
    assert invariants.history_complete("j", HISTORY, 2).passed
    assert not invariants.history_complete("j", HISTORY[:1], 2).passed  # an entry dropped
    assert not invariants.history_complete("j", [*HISTORY, HISTORY[-1]], 2).passed  # an epoch doubled
    assert not invariants.history_complete("j", list(reversed(HISTORY)), 2).passed  # epochs going back
    assert not invariants.history_complete("j", None, 2).passed


def test_final_progress_must_equal_the_last_history_entry() -> None:
    assert invariants.progress_matches_history("j", PROGRESS, HISTORY).passed
    stale = {**PROGRESS, "epoch": 1}  # a status write skipped at the end
    assert not invariants.progress_matches_history("j", stale, HISTORY).passed
    other = {**PROGRESS, "metrics": {**PROGRESS["metrics"], "valAccuracy": 0.85}}
    assert "valAccuracy" in invariants.progress_matches_history("j", other, HISTORY).detail
    assert not invariants.progress_matches_history("j", {"epoch": 2}, HISTORY).passed  # no figures at all
    assert not invariants.progress_matches_history("j", PROGRESS, []).passed


def test_model_reloads_fails_weights_that_do_not_fit_the_card() -> None:
    from safetensors.torch import save

    from kubetune_trainer.model import create_model

    card = {"task": "classification", "architecture": "test_resnet", "numClasses": 5}
    state = {k: v.contiguous() for k, v in create_model("test_resnet", 5).state_dict().items()}
    assert invariants.model_reloads("j", card, save(state)).passed
    missing = dict(state)
    missing.pop(next(iter(missing)))
    assert not invariants.model_reloads("j", card, save(missing)).passed  # a tensor dropped
    assert not invariants.model_reloads("j", {**card, "numClasses": 7}, save(state)).passed  # the wrong head
    assert not invariants.model_reloads("j", card, b"not safetensors").passed
    assert not invariants.model_reloads("j", None, save(state)).passed


def test_no_orphans_names_what_was_left() -> None:
    assert invariants.no_orphans([], [], []).passed
    check = invariants.no_orphans(["process 12 (raylet)"], ["RayCluster soak-00-abc"], ["temp file /tmp/x"])
    assert not check.passed and "raylet" in check.detail and "soak-00-abc" in check.detail and "/tmp/x" in check.detail


@pytest.mark.parametrize(("last_mib", "passed"), [(100, True), (120, True), (200, False)])
def test_operator_rss_must_stay_flat_from_the_first_quarter_to_the_last(last_mib: int, passed: bool) -> None:
    mib = 1024**2
    samples = [(float(t), 100 * mib, 60.0 + t) for t in range(30)] + [
        (30.0 + t, last_mib * mib, 90.0 + t) for t in range(10)
    ]
    assert invariants.rss_flat(samples).passed is passed


def test_operator_rss_ignores_a_restarted_processs_start_up_and_wants_enough_samples() -> None:
    mib = 1024**2
    warm = [(float(t), 100 * mib, 60.0) for t in range(20)]
    starting = [(20.0, 10 * mib, 1.0), (21.0, 20 * mib, 2.0)]  # a restarted operator, still importing
    assert invariants.rss_flat(starting + warm).passed
    assert not invariants.rss_flat(warm[:4]).passed


def test_the_schedule_is_the_same_for_the_same_seed_and_holds_every_fault_kind() -> None:
    assert plan(23, 20, 8) == plan(23, 20, 8)
    assert plan(23, 20, 8) != plan(24, 20, 8)
    soak = plan(23, 20, 8)
    assert {fault.kind for fault in soak.faults} == set(FAULT_KINDS)
    assert all(0 < fault.at < 20 * 60 for fault in soak.faults)
    assert len(soak.jobs) == 8 and soak.jobs[0].action == "none" and soak.jobs[0].submit_at == 0
    assert {job.kind for job in soak.jobs} == {"classification", "detection"}
