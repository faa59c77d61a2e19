"""Fixtures of the trainer tests: one digits dataset and one pretrained model per session.

- `trainer_env` (autouse): test credentials and the session's node cache in the environment, for the
  code under test that runs in this process (and the Ray processes it starts); restored after each test.
- `world` (session): a `DigitsWorld` (tests.support.digits_world) with the buckets made, on the session's
  moto server (`moto_endpoint`, tests/conftest.py); `digits` adds the digits 5-9 dataset and `pretrained`
  the test_resnet weights trained on digits 0-4, `small_digits` a 300-image ImageFolder (each built once,
  on first use).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.digits_world import CREDENTIALS, SMALL_TRAIN, DigitsWorld


@pytest.fixture(scope="session")
def node_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("node-cache")


@pytest.fixture(autouse=True)
def trainer_env(monkeypatch: pytest.MonkeyPatch, node_cache: Path) -> None:
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("KUBETUNE_CACHE_DIR", str(node_cache))
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)


@pytest.fixture(scope="session")
def world(moto_endpoint: str, tmp_path_factory: pytest.TempPathFactory, node_cache: Path) -> DigitsWorld:
    return DigitsWorld(moto_endpoint, tmp_path_factory.mktemp("digits"), node_cache)


@pytest.fixture(scope="session")
def digits(world: DigitsWorld) -> DigitsWorld:
    world.upload_digits()
    return world


@pytest.fixture(scope="session")
def pretrained(digits: DigitsWorld) -> DigitsWorld:
    digits.pretrain()
    return digits


@pytest.fixture(scope="session")
def small_digits(pretrained: DigitsWorld) -> str:
    """60 images of each digit 5-9 in one ImageFolder (split by the trainer): quick epochs."""
    pretrained.upload_folder(SMALL_TRAIN, per_class=60)
    return SMALL_TRAIN
