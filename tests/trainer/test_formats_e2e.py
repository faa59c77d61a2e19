"""data.format webdataset and manifest as users run them: `kubetune run job.yaml --local --s3-endpoint URL`
on the session's moto server, one tiny epoch each, both runs at once (each with its own local Ray).

Budget: 30 digits of each class 5-9 (150 images), test_resnet at 32 px, one epoch of batch 32, head
layer only, one worker of one CPU per run. The shards are what `kubetune data pack` makes of a local
ImageFolder (so a packed set trains, with every image of the source); one of them also holds a symbolic
link named like an image, which must be refused and counted, not followed. The manifest also names an
image whose key climbs out of the node cache (`../`): refused, counted and named, and written nowhere.
"""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from tests.support.digits_world import DATA_BUCKET, KUBETUNE, OUT_BUCKET, DigitsWorld

pytestmark = pytest.mark.slow

PER_CLASS = 30
SPEC: dict[str, Any] = {
    "epochs": 1,
    "validation": None,
    "strategy": "head",
    "trainable_layers": None,
    "cpus_per_worker": 1,
}


def add_symlink(world: DigitsWorld, shard: str) -> None:
    """The shard again, led by `evil.png` → /etc/passwd and its label."""
    with tarfile.open(fileobj=io.BytesIO(world.get(shard)), mode="r") as tar:
        members = [(info.name, tar.extractfile(info).read()) for info in tar]  # type: ignore[union-attr]
    body = io.BytesIO()
    with tarfile.open(fileobj=body, mode="w") as tar:
        link = tarfile.TarInfo("evil.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        for name, data in [("evil.cls", b"5"), *members]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    world.put(shard, body.getvalue())


def run(world: DigitsWorld, name: str, **spec: Any) -> subprocess.Popen[str]:
    manifest = world.job(name, output=f"s3://{OUT_BUCKET}/formats/{name}", **{**SPEC, **spec})
    return subprocess.Popen(
        [str(KUBETUNE), "run", str(manifest), "--local", "--s3-endpoint", world.endpoint],
        env=world.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_a_job_trains_from_webdataset_shards_and_from_a_manifest(pretrained: DigitsWorld, tmp_path: Path) -> None:
    world = pretrained
    # The shards as a team makes them: `kubetune data pack` of a local ImageFolder (tests/trainer/test_pack.py).
    folder = world.write_folder(tmp_path / "digits", per_class=PER_CLASS)
    shards = f"s3://{DATA_BUCKET}/digit-shards"
    pattern = world.data_pack(str(folder), shards, "--shard-size", str(2 * PER_CLASS))["train"]
    assert pattern == f"{shards}/train-{{000000..000002}}.tar"
    add_symlink(world, f"{shards}/train-000001.tar")
    manifest = world.upload_manifest(f"s3://{DATA_BUCKET}/digit-manifests/train.csv", per_class=PER_CLASS)
    # A line naming an image at a key that climbs out of the node cache (S3 keeps `..` as it is).
    climb = "../" * 8 + "escape.png"
    first_image = world.get(manifest).decode().splitlines()[1].split(",")[0]
    world.put(f"s3://{DATA_BUCKET}/digit-manifests/{climb}", world.get(first_image))
    world.put(manifest, world.get(manifest) + f"\n{climb},digit-5".encode())

    runs = {
        "webdataset": run(world, "from-shards", train=pattern, data_format="webdataset"),
        "manifest": run(world, "from-manifest", train=manifest, data_format="manifest"),
    }
    outputs = {name: proc.communicate(timeout=400)[0] for name, proc in runs.items()}
    for name, proc in runs.items():
        assert proc.returncode == 0, f"{name} run failed:\n{outputs[name]}"

    shards_card = json.loads(world.get(f"s3://{OUT_BUCKET}/formats/from-shards/model.json"))
    assert shards_card["classNames"] == ["5", "6", "7", "8", "9"]
    assert shards_card["data"]["format"] == "webdataset"
    assert shards_card["data"]["trainImages"] + shards_card["data"]["validationImages"] == 5 * PER_CLASS
    assert shards_card["data"]["corruptImages"] == 1
    assert (
        "digit-shards/train-000001.tar/evil.png (refused: the tar member is a symbolic link)" in outputs["webdataset"]
    )

    manifest_card = json.loads(world.get(f"s3://{OUT_BUCKET}/formats/from-manifest/model.json"))
    assert manifest_card["classNames"] == [f"digit-{d}" for d in range(5, 10)]
    assert manifest_card["data"]["format"] == "manifest"
    assert manifest_card["data"]["trainImages"] + manifest_card["data"]["validationImages"] == 5 * PER_CLASS
    assert manifest_card["data"]["corruptImages"] == 1
    assert f"digit-manifests/{climb} (refused: the key has a '..' path segment)" in outputs["manifest"]
    below = Path(world.cache_dir).parent  # the session's folder, the cache's and the runs' own among them
    assert not [
        *below.rglob("escape.png"),
        *(p / "escape.png" for p in (Path("/tmp"), Path.cwd(), Path.home()) if (p / "escape.png").exists()),
    ]
    for card in (shards_card, manifest_card):
        assert card["epochs"] == 1 and 0.0 <= card["metrics"]["valAccuracy"] <= 1.0
