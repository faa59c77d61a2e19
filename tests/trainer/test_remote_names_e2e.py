"""Remote names never leave their folder, as a user runs kubetune: `kubetune run job.yaml --local
--s3-endpoint URL` against a moto server whose dataset listing (ImageFolder and COCO) and checkpoint
folder hold keys crafted to land in the system temp folder, the working directory and the home folder.

Each crafted key climbs out of the node cache with ".." segments to one of those folders (far more ".."
than the cache is deep: the extra ones stay at "/"). A plain join writes the file there; the trainer
refuses the key: an image is skipped and counted like an unreadable one and named in the output, a
checkpoint file fails the run naming it.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest
import yaml

from tests.support.digits_world import DATA_BUCKET, KUBETUNE, MODEL_BUCKET, OUT_BUCKET, DigitsWorld, digit_png
from tests.support.shapes_world import DETECTOR, DETECTOR_SIZE, make_shapes, random_detector

pytestmark = pytest.mark.slow

UP = "../" * 40


def escaping_key(within: str, target: Path, name: str) -> str:
    """A key below `within` that a plain join onto any cache folder turns into `target/name`."""
    return f"{within}/{UP}{target.relative_to('/').as_posix()}/{name}"


class Escape:
    """The folders a crafted key aims at, a marker name per run, and a check that nothing landed."""

    def __init__(self, tmp_path: Path) -> None:
        self.marker = f"kubetune-escape-{uuid.uuid4().hex[:10]}"
        self.home = tmp_path / "home"
        self.cwd = tmp_path / "cwd"
        self.home.mkdir()
        self.cwd.mkdir()
        self.targets = {"tmp": Path(tempfile.gettempdir()), "cwd": self.cwd, "home": self.home}

    def keys(self, within: str, suffix: str) -> dict[str, str]:
        return {
            where: escaping_key(within, folder, f"{self.marker}-{where}{suffix}")
            for where, folder in self.targets.items()
        }

    def landed(self) -> list[Path]:
        """Files of this run's marker in the temp folder (directly: Ray's sessions are there too), and
        anywhere in the home and working folders."""
        return [
            *self.targets["tmp"].glob(f"{self.marker}*"),
            *self.home.rglob(f"{self.marker}*"),
            *self.cwd.rglob(f"{self.marker}*"),
        ]

    def run(self, world: DigitsWorld, manifest: Path) -> subprocess.CompletedProcess[str]:
        """The console script as a user runs it, from `cwd`, with HOME pointing at `home`."""
        return subprocess.run(
            [str(KUBETUNE), "run", str(manifest), "--local", "--s3-endpoint", world.endpoint],
            env=world.env(HOME=str(self.home)),
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=400,
        )


def test_crafted_image_and_checkpoint_keys_never_leave_the_cache(pretrained: DigitsWorld, tmp_path: Path) -> None:
    world, escape = pretrained, Escape(tmp_path)
    train = f"s3://{DATA_BUCKET}/escape/train"
    world.upload_folder(train, per_class=60)  # 300 images: the 3 crafted ones stay within the 1% allowed
    crafted = escape.keys("escape/train/5", ".png")
    world.put_many(
        {f"s3://{DATA_BUCKET}/{key}": digit_png(world.digits(range(5, 6))[0][0]) for key in crafted.values()}
    )
    assert set(crafted.values()) <= set(world.keys(train))  # the listing holds them verbatim
    output = f"s3://{OUT_BUCKET}/escape"
    manifest = world.job("escape", output=output, train=train, validation=None, epochs=1, max_retries=0)
    run = world.config("escape", output=output, train=train, validation=None, epochs=1).run_name

    done = escape.run(world, manifest)

    assert done.returncode == 0, done.stderr[-3000:]
    assert escape.landed() == []
    for key in crafted.values():
        assert f"s3://{DATA_BUCKET}/{key} (refused: the key has a '..' path segment)" in done.stderr
    card = json.loads(world.get(f"{output}/model.json"))
    assert (card["data"]["corruptImages"], card["data"]["trainImages"] + card["data"]["validationImages"]) == (3, 300)

    # The run's last checkpoint gets a planted file; running the job again (one more epoch: the same run,
    # config.run_digest) resumes from it.
    planted = escape.keys(f"escape/checkpoints/{run}/epoch-0001", ".txt")
    world.put_many({f"s3://{OUT_BUCKET}/{key}": b"planted" for key in planted.values()})
    assert world.keys(f"{output}/checkpoints/{run}/epoch-0001")  # the checkpoint the resume reads
    manifest = world.job("escape", output=output, train=train, validation=None, epochs=2, max_retries=0)

    resumed = escape.run(world, manifest)

    assert resumed.returncode == 1, resumed.stderr[-3000:]
    assert escape.landed() == []
    error = [line for line in resumed.stderr.splitlines() if line.startswith("kubetune: error:")]
    assert len(error) == 1 and "the name '../../" in error[0] and "has a '..' path segment" in error[0], error
    assert f"refused {output}/checkpoints/{run}/epoch-0001/../../" in error[0]


def test_crafted_coco_file_names_never_leave_the_cache(world: DigitsWorld, tmp_path: Path) -> None:
    escape = Escape(tmp_path)
    base = f"s3://{DATA_BUCKET}/escape-coco"
    shapes = make_shapes(["red", "green"], count=6, seed=9, size=DETECTOR_SIZE)
    pngs = shapes.pngs()
    coco = shapes.coco()
    crafted = {where: key.removeprefix("x/") for where, key in escape.keys("x", ".png").items()}
    for n, name in enumerate(crafted.values()):
        pngs[name] = next(iter(shapes.pngs().values()))
        coco["images"].append({"id": 100 + n, "file_name": name, "width": DETECTOR_SIZE, "height": DETECTOR_SIZE})
    world.put_many({f"{base}/images/{k}": v for k, v in pngs.items()})
    world.put(f"{base}/train.json", json.dumps(coco).encode())
    assert {f"escape-coco/images/{name}" for name in crafted.values()} <= set(world.keys(f"{base}/images"))
    weights = f"s3://{MODEL_BUCKET}/escape-coco/{DETECTOR}.safetensors"
    world.put(weights, random_detector(tmp_path / "base.safetensors").read_bytes())
    manifest = tmp_path / "escape-coco.yaml"
    manifest.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kubetune.dev/v1alpha1",
                "kind": "FineTuneJob",
                "metadata": {"name": "escape-coco"},
                "spec": {
                    "task": "detection",
                    "model": {"architecture": DETECTOR, "checkpoint": weights, "strategy": "head"},
                    "data": {
                        "train": f"{base}/images/",
                        "annotations": {"train": f"{base}/train.json", "validation": f"{base}/train.json"},
                        "imageSize": DETECTOR_SIZE,
                    },
                    "training": {"epochs": 1, "batchSize": 4},
                    "output": {"path": f"s3://{OUT_BUCKET}/escape-coco"},
                    "resources": {"workers": 1, "gpusPerWorker": 0, "cpusPerWorker": 1},
                },
            }
        )
    )

    # 3 refused of 9 images is far more than the 1% of unreadable images a run accepts: it ends before Ray.
    done = escape.run(world, manifest)

    assert done.returncode == 1, done.stderr[-3000:]
    assert escape.landed() == []
    assert "kubetune: error: 3 of 9 images (33.3%) are corrupt or unreadable" in done.stderr
    for name in crafted.values():
        assert f"{base}/images/{name} (refused: the file_name has a '..' path segment)" in done.stderr
