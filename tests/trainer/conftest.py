"""Fixtures of the trainer tests: one moto S3 server, one digits dataset and one pretrained model per session.

- `trainer_env` (session, autouse): test credentials and a private node cache in the environment.
- `s3_endpoint` (session): moto's S3 server over real HTTP.
- `world` (session): a `DigitsWorld` with the buckets made; `digits` adds the digits 5-9 dataset and
  `pretrained` the test_resnet weights trained on digits 0-4 (each built once, on first use).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from digits_world import CREDENTIALS, DigitsWorld
from moto.server import ThreadedMotoServer


@pytest.fixture(scope="session", autouse=True)
def trainer_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        for key, value in CREDENTIALS.items():
            patch.setenv(key, value)
        patch.setenv("KUBETUNE_CACHE_DIR", str(tmp_path_factory.mktemp("node-cache")))
        patch.setenv("RAY_USAGE_STATS_ENABLED", "0")
        patch.delenv("RAY_ADDRESS", raising=False)
        patch.delenv("AWS_ENDPOINT_URL", raising=False)
        yield


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="session")
def world(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> DigitsWorld:
    return DigitsWorld(s3_endpoint, tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="session")
def digits(world: DigitsWorld) -> DigitsWorld:
    world.upload_digits()
    return world


@pytest.fixture(scope="session")
def pretrained(digits: DigitsWorld) -> DigitsWorld:
    digits.pretrain()
    return digits


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path
