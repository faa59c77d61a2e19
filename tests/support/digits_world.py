"""Real data for the trainer tests: scikit-learn's digits as 32x32 PNGs in a moto S3, and small models.

world = DigitsWorld(endpoint)
world.upload_digits()      # s3://datasets/digits-hi/{train,val}/<digit>/<n>.png  (digits 5-9)
world.data_pack(SRC, DEST) # `kubetune data pack`: the data: values it printed
world.pretrain()           # test_resnet trained on digits 0-4 → s3://models/digits-0-4/...safetensors
world.job(...)             # a FineTuneJob manifest for `kubetune run FILE --local`
world.kubetune_run(path)   # the console script, as a user runs it
"""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import tarfile
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import numpy as np
import yaml
from PIL import Image

from tests.support.pretraining import torch_threads, train_plainly

if TYPE_CHECKING:
    from kubetune_trainer.config import TrainerConfig

ARCH = "test_resnet"
IMAGE_SIZE = 32
REGION = "us-east-1"
DATA_BUCKET = "datasets"
MODEL_BUCKET = "models"
OUT_BUCKET = "results"
HI_TRAIN = f"s3://{DATA_BUCKET}/digits-hi/train"
HI_VAL = f"s3://{DATA_BUCKET}/digits-hi/val"
SMALL_TRAIN = f"s3://{DATA_BUCKET}/digits-small"
PRETRAINED = f"s3://{MODEL_BUCKET}/digits-0-4/{ARCH}.safetensors"
RANDOM_INIT = f"s3://{MODEL_BUCKET}/random/{ARCH}.safetensors"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "kubetune-test",
    "AWS_SECRET_ACCESS_KEY": "kubetune-test-secret",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_EC2_METADATA_DISABLED": "true",
}
KUBETUNE = Path(sys.executable).parent / "kubetune"


def digit_png(pixels: np.ndarray) -> bytes:
    """An 8x8 digit (0-16) as a 32x32 RGB PNG."""
    gray = Image.fromarray((pixels * (255 / 16)).astype(np.uint8), mode="L")
    buffer = io.BytesIO()
    gray.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A tar file of regular members (name, bytes), in order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, body in members:
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return buffer.getvalue()


def split_uri(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


class DigitsWorld:
    def __init__(self, endpoint: str, workdir: Path, cache_dir: Path) -> None:
        self.endpoint = endpoint
        self.workdir = workdir
        self.cache_dir = cache_dir
        self.s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name=REGION,
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        )
        for bucket in (DATA_BUCKET, MODEL_BUCKET, OUT_BUCKET):
            self.s3.create_bucket(Bucket=bucket)

    # -- S3 helpers -----------------------------------------------------------------------------

    def put(self, uri: str, body: bytes) -> None:
        bucket, key = split_uri(uri)
        self.s3.put_object(Bucket=bucket, Key=key, Body=body)

    def get(self, uri: str) -> bytes:
        bucket, key = split_uri(uri)
        body: bytes = self.s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        return body

    def keys(self, uri: str) -> list[str]:
        bucket, key = split_uri(uri)
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key.rstrip("/") + "/")
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def put_many(self, items: Mapping[str, bytes]) -> None:
        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(lambda kv: self.put(*kv), items.items()))

    # -- data and models --------------------------------------------------------------------------

    def digits(self, labels: range) -> list[tuple[np.ndarray, int]]:
        from sklearn.datasets import load_digits

        data = load_digits()
        return [(img, int(t)) for img, t in zip(data.images, data.target, strict=True) if int(t) in labels]

    def upload_digits(self) -> None:
        """Digits 5-9: 80% under HI_TRAIN, 20% under HI_VAL, one folder per digit."""
        items: dict[str, bytes] = {}
        rng = random.Random(7)
        for n, (pixels, label) in enumerate(self.digits(range(5, 10))):
            prefix = HI_VAL if rng.random() < 0.2 else HI_TRAIN
            items[f"{prefix}/{label}/{n:04d}.png"] = digit_png(pixels)
        self.put_many(items)

    def upload_folder(self, prefix: str, per_class: int, labels: range = range(5, 10), skip: int = 0) -> list[str]:
        """A small ImageFolder of `per_class` images per digit (after the first `skip` of each); returns the
        keys' URIs."""
        items: dict[str, bytes] = {}
        counts: dict[int, int] = {}
        for n, (pixels, label) in enumerate(self.digits(labels)):
            counts[label] = counts.get(label, 0) + 1
            if skip < counts[label] <= skip + per_class:
                items[f"{prefix}/{label}/{n:04d}.png"] = digit_png(pixels)
        self.put_many(items)
        return sorted(items)

    def upload_shards(self, prefix: str, per_class: int, shards: int, labels: range = range(5, 10)) -> str:
        """The same digits as WebDataset shards (`<n>.png` with `<n>.cls` holding the digit), dealt
        round-robin into `shards` tar files; returns the brace pattern that names them."""
        members: list[list[tuple[str, bytes]]] = [[] for _ in range(shards)]
        counts: dict[int, int] = {}
        for n, (pixels, label) in enumerate(self.digits(labels)):
            if counts.get(label, 0) < per_class:
                counts[label] = counts.get(label, 0) + 1
                members[n % shards] += [(f"{n:04d}.png", digit_png(pixels)), (f"{n:04d}.cls", str(label).encode())]
        self.put_many({f"{prefix}/train-{i:03d}.tar": tar_bytes(m) for i, m in enumerate(members)})
        return f"{prefix}/train-{{000..{shards - 1:03d}}}.tar"

    def write_folder(self, root: Path, per_class: int, labels: range = range(5, 10)) -> Path:
        """A local ImageFolder of `per_class` images per digit (`root/<digit>/<n>.png`), as a team has one."""
        counts: dict[int, int] = {}
        for n, (pixels, label) in enumerate(self.digits(labels)):
            counts[label] = counts.get(label, 0) + 1
            if counts[label] <= per_class:
                (root / str(label)).mkdir(parents=True, exist_ok=True)
                (root / str(label) / f"{n:04d}.png").write_bytes(digit_png(pixels))
        return root

    def data_pack(self, *args: str) -> dict[str, Any]:
        """`kubetune data pack ARGS` through the console script, on this S3; the data: values it printed."""
        done = subprocess.run(
            [str(KUBETUNE), "data", "pack", *args, "--s3-endpoint", self.endpoint],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        values: dict[str, Any] = yaml.safe_load(done.stdout)["data"]
        return values

    def upload_manifest(self, uri: str, per_class: int, labels: range = range(5, 10)) -> str:
        """The same digits as loose images under `<uri>.images/<digit>/`, and a `uri,label` CSV manifest
        at `uri` naming them by s3:// URI (labels as class names: `digit-5`)."""
        images = self.upload_folder(f"{uri.rsplit('/', 1)[0]}/loose-images", per_class, labels)
        rows = ["uri,label", *(f"{image},digit-{image.rsplit('/', 2)[1]}" for image in images)]
        self.put(uri, "\n".join(rows).encode())
        return uri

    def pretrain(self) -> None:
        """test_resnet trained on digits 0-4 with plain torch, saved as safetensors; also a random init."""
        import timm
        import torch
        from safetensors.torch import save_model

        torch.manual_seed(0)
        model = timm.create_model(ARCH, num_classes=5)
        cfg = timm.data.resolve_data_config({"input_size": (3, IMAGE_SIZE, IMAGE_SIZE)}, model=model)
        transform = timm.data.create_transform(**cfg, is_training=False)
        samples = self.digits(range(0, 5))
        x = torch.stack([transform(Image.open(io.BytesIO(digit_png(p)))) for p, _ in samples])
        y = torch.tensor([t for _, t in samples])
        with torch_threads(2):
            train_plainly(
                model,
                lambda chosen: torch.nn.functional.cross_entropy(model(x[chosen]), y[chosen]),
                len(x),
                epochs=3,
                batch=32,
                learning_rate=3e-3,
                weight_decay=0.05,
                seed=0,
            )
        path = self.workdir / "pretrained.safetensors"
        save_model(model, str(path))
        self.put(PRETRAINED, path.read_bytes())
        torch.manual_seed(1)
        save_model(timm.create_model(ARCH, num_classes=5), str(path))
        self.put(RANDOM_INIT, path.read_bytes())

    # -- jobs -------------------------------------------------------------------------------------

    def job(self, name: str, **spec: Any) -> Path:
        """A FineTuneJob manifest file (see `manifest` for the knobs)."""
        path = self.workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(self.manifest(name, **spec), sort_keys=False))
        return path

    def config(self, name: str, **spec: Any) -> TrainerConfig:
        """The trainer config `kubetune run --local` derives from the same manifest."""
        from kubetune_operator.spec import FineTuneJob
        from kubetune_operator.trainer_config import trainer_config

        return trainer_config(FineTuneJob.model_validate(self.manifest(name, **spec)))

    def run_uri(self, name: str, **spec: Any) -> str:
        """Where the run of the job `name` keeps its checkpoints: <output>/checkpoints/<run name>."""
        return f"{spec['output']}/checkpoints/{self.config(name, **spec).run_name}"

    def manifest(
        self,
        name: str,
        *,
        output: str,
        checkpoint: str = PRETRAINED,
        train: str = HI_TRAIN,
        validation: str | None = HI_VAL,
        epochs: int = 3,
        strategy: str = "partial",
        trainable_layers: int | None = 1,
        learning_rate: float = 0.01,
        batch_size: int = 32,
        max_retries: int = 1,
        workers: int = 1,
        cpus_per_worker: int = 2,
        augment: bool = False,
        checkpoint_every: str = "epoch",
        run_policy: dict[str, Any] | None = None,
        resume: str = "auto",
        data_format: str | None = None,
        training: dict[str, Any] | None = None,
        cache: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """A FineTuneJob of test_resnet on digits; `training` adds fields to spec.training (its options)."""
        model: dict[str, Any] = {"architecture": ARCH, "checkpoint": checkpoint, "strategy": strategy, "resume": resume}
        if trainable_layers is not None:
            model["trainableLayers"] = trainable_layers
        data: dict[str, Any] = {"train": train, "imageSize": IMAGE_SIZE, "augment": "light" if augment else "none"}
        if validation:
            data["validation"] = validation
        if data_format:
            data["format"] = data_format
        if cache:
            data["cache"] = cache
        manifest = {
            "apiVersion": "kubetune.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": name},
            "spec": {
                "model": model,
                "data": data,
                "training": {
                    "epochs": epochs,
                    "batchSize": batch_size,
                    "learningRate": learning_rate,
                    "weightDecay": 0.05,
                    "seed": 42,
                    "checkpointEvery": checkpoint_every,
                    **(training or {}),
                },
                "output": {"path": output, "checkpointsToKeep": 2},
                "resources": {"workers": workers, "gpusPerWorker": 0, "cpusPerWorker": cpus_per_worker},
                "runPolicy": {"maxRetries": max_retries, **(run_policy or {})},
            },
        }
        return manifest

    def accuracy_outside_kubetune(self, out: str, workdir: Path) -> tuple[float, int, dict[str, Any]]:
        """The model exported under `out` loaded with timm and safetensors alone, from model.json's recipe,
        judged on HI_VAL: (accuracy, images, the card)."""
        import safetensors.torch
        import timm
        import torch

        card = json.loads(self.get(f"{out}/model.json"))
        weights = workdir / "model.safetensors"
        weights.write_bytes(self.get(f"{out}/model.safetensors"))
        model = timm.create_model(card["architecture"], num_classes=card["numClasses"])
        safetensors.torch.load_model(model, str(weights))
        model.eval()
        transform = timm.data.create_transform(**card["dataConfig"], is_training=False)
        bucket, prefix = HI_VAL.removeprefix("s3://").split("/", 1)
        correct = total = 0
        with torch.no_grad():
            for key in self.keys(HI_VAL):
                label = card["classNames"].index(key.removeprefix(prefix + "/").split("/")[0])
                image = Image.open(io.BytesIO(self.get(f"s3://{bucket}/{key}"))).convert("RGB")
                correct += int(model(transform(image).unsqueeze(0)).argmax(1).item() == label)
                total += 1
        return correct / total, total, card

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            **os.environ,
            **CREDENTIALS,
            "KUBETUNE_CACHE_DIR": str(self.cache_dir),
            "RAY_USAGE_STATS_ENABLED": "0",
            **extra,
        }
        env.pop("RAY_ADDRESS", None)
        env.pop("AWS_ENDPOINT_URL", None)
        return env

    def kubetune_run(self, manifest: Path, timeout: float = 300, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(KUBETUNE), "run", str(manifest), "--local", "--s3-endpoint", self.endpoint],
            env=self.env(**env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def kubetune_popen(self, manifest: Path, **env: str) -> subprocess.Popen[str]:
        """The run in its own process group, so the whole local Ray instance can be killed with it."""
        return subprocess.Popen(
            [str(KUBETUNE), "run", str(manifest), "--local", "--s3-endpoint", self.endpoint],
            env=self.env(**env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
