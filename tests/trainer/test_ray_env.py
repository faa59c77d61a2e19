"""The Ray Train extras kubetune turns off in its own processes, unless the environment says otherwise."""

from __future__ import annotations

import os

import pytest

from kubetune_trainer.config import RAY_TRAIN_ENV, use_ray_train_env


def test_the_defaults_apply_and_a_users_own_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in RAY_TRAIN_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_TRAIN_METRICS_ENABLED", "1")  # someone who wants Ray Train's own metrics

    use_ray_train_env()

    assert os.environ["RAY_TRAIN_METRICS_ENABLED"] == "1"
    assert os.environ["RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION"] == "0"
    assert all(name in os.environ for name in RAY_TRAIN_ENV)
