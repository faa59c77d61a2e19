"""storage.addressingStyle and storage.caBundle as the trainer's S3 clients see them."""

from __future__ import annotations

import pickle

import pytest

from kubetune_trainer.config import CA_BUNDLE_ENV, StorageSpec
from kubetune_trainer.storage import S3Store, arrow_filesystem


@pytest.mark.parametrize(
    ("storage", "style"),
    [
        ({}, "auto"),
        ({"endpoint": "https://minio.example:9000"}, "path"),
        ({"endpoint": "https://s3.example", "addressingStyle": "virtual"}, "virtual"),
        ({"addressingStyle": "path"}, "path"),
    ],
)
def test_the_addressing_style_reaches_boto3_and_survives_pickling(storage: dict[str, str], style: str) -> None:
    spec = StorageSpec.model_validate(storage)
    store = S3Store(spec.endpoint, spec.region, spec.boto_addressing_style())
    assert store.client.meta.config.s3 == {"addressing_style": style}
    copy = pickle.loads(pickle.dumps(store))
    assert copy.client.meta.config.s3 == {"addressing_style": style}


def test_pyarrow_gets_the_ca_bundle_boto3_reads_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    bundle = f"{tmp_path}/ca.crt"
    monkeypatch.setenv(CA_BUNDLE_ENV, bundle)
    store = S3Store("https://s3.example", "us-east-1", "virtual")
    assert store.client._endpoint.http_session._verify == bundle
    (settings,) = arrow_filesystem("https://s3.example", "us-east-1", "virtual").__reduce__()[1]
    assert (settings["tls_ca_file_path"], settings["force_virtual_addressing"]) == (bundle, True)
