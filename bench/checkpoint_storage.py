"""Checkpoint storage: a ~100 MB checkpoint saved to and loaded from S3 through the trainer's path, against
raw boto3 `upload_file`/`download_file` with a tuned TransferConfig, on the same moto server.

The checkpoint is what the trainer writes after an epoch (`checkpoint.write_checkpoint`): a resnet18's
weights and SGD momentum, its progress and RNG files. kubetune's save is `S3Store.upload_dir` (what the
`checkpoint_upload_fn` it hands to `ray.train.report` runs), its load `checkpoint.download_checkpoint`
(what a resumed worker runs). For reference, the same folder also goes through pyarrow's S3 filesystem,
the path Ray Train takes when no upload function is given.
"""

from __future__ import annotations

import dataclasses
import functools
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bench.common import REGION, MiB, Row, boto3_client, log, moto_server, s3_environment, timed

NAME = "Checkpoint storage"
BUCKET = "bench-checkpoints"


@dataclasses.dataclass(frozen=True)
class Config:
    architecture: str = "resnet18"
    repeats: int = 5
    with_pyarrow: bool = True

    @classmethod
    def full(cls) -> Config:
        return cls()

    @classmethod
    def quick(cls) -> Config:
        return cls(repeats=3, with_pyarrow=False)

    @classmethod
    def tiny(cls) -> Config:
        return cls(architecture="test_resnet", repeats=1, with_pyarrow=True)


def tuned_transfer_config() -> Any:
    """A tuned boto3 TransferConfig, chosen apart from the trainer's: 8 MiB parts, 16 at a time."""
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=8 * MiB, multipart_chunksize=8 * MiB, max_concurrency=16, use_threads=True
    )


def make_checkpoint(folder: Path, architecture: str) -> int:
    """A real trainer checkpoint of `architecture` with SGD momentum; its size in bytes."""
    import timm
    import torch

    from kubetune_trainer.checkpoint import write_checkpoint

    torch.manual_seed(0)
    model = timm.create_model(architecture, num_classes=1000)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for param in model.parameters():  # momentum buffers as one step would leave them, without the step's cost
        optimizer.state[param]["momentum_buffer"] = torch.randn_like(param)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    progress = {"epoch": 1, "step": 100, "history": [{"epoch": 1, "trainLoss": 1.0}]}
    write_checkpoint(
        folder, rank=0, model=model, optimizer=optimizer, scheduler=scheduler, scaler=None, progress=progress
    )
    return sum(p.stat().st_size for p in folder.iterdir())


def run(config: Config, workdir: Path) -> list[Row]:
    from kubetune_trainer.checkpoint import download_checkpoint
    from kubetune_trainer.storage import S3Store, S3Uri, arrow_filesystem

    folder = workdir / "checkpoint"
    size = make_checkpoint(folder, config.architecture)
    files = sorted(p for p in folder.iterdir() if p.is_file())
    mb = size / 1e6
    log(f"{NAME}: {mb:.0f} MB in {len(files)} files, {config.repeats} repeats")

    samples: dict[str, list[float]] = {
        k: [] for k in ("save", "save_base", "load", "load_base", "save_arrow", "load_arrow")
    }
    with s3_environment(), moto_server(workdir / "moto.log") as endpoint:
        store = S3Store(endpoint, REGION)
        client = boto3_client(endpoint)
        client.create_bucket(Bucket=BUCKET)
        transfer = tuned_transfer_config()

        def save_product(prefix: str) -> None:
            store.upload_dir(folder, S3Uri(BUCKET, prefix))

        def save_baseline(prefix: str) -> None:
            for path in files:
                client.upload_file(str(path), BUCKET, f"{prefix}/{path.name}", Config=transfer)

        def load_product(prefix: str, into: Path) -> None:
            download_checkpoint(store, SimpleNamespace(path=f"{BUCKET}/{prefix}"), into)

        def load_baseline(prefix: str, into: Path) -> None:
            for path in files:
                client.download_file(BUCKET, f"{prefix}/{path.name}", str(into / path.name), Config=transfer)

        def save_arrow(prefix: str) -> None:
            import pyarrow.fs

            pyarrow.fs.copy_files(
                str(folder),
                f"{BUCKET}/{prefix}",
                source_filesystem=pyarrow.fs.LocalFileSystem(),
                destination_filesystem=arrow_filesystem(endpoint, REGION),
            )

        def load_arrow(prefix: str, into: Path) -> None:
            import pyarrow.fs

            pyarrow.fs.copy_files(
                f"{BUCKET}/{prefix}",
                str(into),
                source_filesystem=arrow_filesystem(endpoint, REGION),
                destination_filesystem=pyarrow.fs.LocalFileSystem(),
            )

        pairs: list[tuple[str, Any, Any]] = [("", save_product, load_product), ("_base", save_baseline, load_baseline)]
        if config.with_pyarrow:
            pairs.append(("_arrow", save_arrow, load_arrow))
        for repeat in range(config.repeats):
            # Alternate the order, so neither path always runs on a warmer server.
            order = pairs if repeat % 2 == 0 else pairs[::-1]
            for suffix, save, load in order:
                prefix = f"run{repeat}{suffix}/epoch-0001"
                samples["save" + suffix].append(mb / timed(functools.partial(save, prefix)))
                into = Path(tempfile.mkdtemp(prefix="bench-load-", dir=workdir))
                samples["load" + suffix].append(mb / timed(functools.partial(load, prefix, into)))
                loaded = sum(p.stat().st_size for p in into.rglob("*") if p.is_file())
                if loaded != size:
                    raise RuntimeError(f"{suffix or 'kubetune'} load brought {loaded} bytes back, not {size}")
                shutil.rmtree(into)
                _delete_prefix(client, prefix)  # moto keeps objects in memory

    note = f"{mb:.0f} MB checkpoint ({config.architecture} + SGD state, {len(files)} files)"
    rows = [
        Row(NAME, "save (upload)", "MB/s", samples["save"], samples["save_base"], (">=", 0.9), note),
        Row(NAME, "load (download)", "MB/s", samples["load"], samples["load_base"], (">=", 0.9), note),
    ]
    if config.with_pyarrow:
        reference = "for reference: Ray's default pyarrow copy vs the same boto3 baseline"
        rows += [
            Row(
                NAME,
                "save via pyarrow (Ray default)",
                "MB/s",
                samples["save_arrow"],
                samples["save_base"],
                None,
                reference,
            ),
            Row(
                NAME,
                "load via pyarrow (Ray default)",
                "MB/s",
                samples["load_arrow"],
                samples["load_base"],
                None,
                reference,
            ),
        ]
    return rows


def _delete_prefix(client: Any, prefix: str) -> None:
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/")
    keys = [{"Key": item["Key"]} for item in listed.get("Contents", [])]
    if keys:
        client.delete_objects(Bucket=BUCKET, Delete={"Objects": keys})
