"""The driver: check inputs, prepare once, run Ray Train, export the model.

1. Checks that need no worker (`check_inputs`): architecture known, base weights and output bucket
   reachable, the dataset listed and split (detection: the COCO files read, sanitised and matched to
   the listed images). Each failure is a TrainerError naming the field or URI.
2. `prepare_node`: base weights and images into the node cache, images decode-checked, base weights
   loaded into the architecture. It runs on a node that will host workers — this process for a local
   run, a Ray task with one worker's resources on a cluster — so deterministic failures (an unsafe
   pickle, too many corrupt images) end the run at once instead of being retried as worker failures.
3. `train`: TorchTrainer with S3 storage `<output.path>/checkpoints`, run name = the job's uid: a new
   driver with the same name resumes the run from its latest checkpoint, and FailureConfig restarts
   failed workers from it.
4. `export_model` writes model.safetensors, model.json, history.json and training-curves.png (and, for
   detection, detections.png).

Classification and detection share every step; the task decides the index, the model and the card.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubetune_trainer.cache import cached_object
from kubetune_trainer.config import TrainerConfig, use_ray_train_env
from kubetune_trainer.data import DatasetIndex, build_index, check_corrupt, prepare_images
from kubetune_trainer.detection_data import DetectionIndex, build_detection_index
from kubetune_trainer.detection_eval import SCORE_THRESHOLD
from kubetune_trainer.detection_model import (
    apply_detection_strategy,
    build_detector,
    check_detection_architecture,
    transform_config,
)
from kubetune_trainer.errors import TrainerError
from kubetune_trainer.export import (
    CLASSIFICATION_PANELS,
    DETECTION_PANELS,
    DETECTIONS_FILE,
    classification_card,
    detection_card,
    export_model,
    read_final_progress,
)
from kubetune_trainer.loop import RunPlan, fault_from_env, train_loop
from kubetune_trainer.model import WeightsReport, apply_strategy, build_model, check_architecture, data_config
from kubetune_trainer.relay import Relay, driver_reporters, run_events
from kubetune_trainer.reporting import ProgressReporter
from kubetune_trainer.storage import ObjectInfo, S3Store, S3Uri

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"


@dataclass
class Inputs:
    """What the driver found in S3 before anything heavy ran."""

    index: DatasetIndex
    weights: ObjectInfo
    # Detection: the boxes of each image (`index` then lists the same images, for the node cache).
    detection: DetectionIndex | None = None


@dataclass
class Prepared:
    """What preparing a node found: the base weights' fit, preprocessing, unreadable images."""

    index: DatasetIndex
    weights: ObjectInfo
    weights_report: WeightsReport
    data_config: dict[str, Any]
    trainable_parameters: int
    total_parameters: int
    stages: tuple[int, int]
    detection: DetectionIndex | None = None


@dataclass
class Outcome:
    output: S3Uri
    metrics: dict[str, Any]
    epochs: int


def store_for(config: TrainerConfig) -> S3Store:
    return S3Store(config.storage.endpoint, config.storage.region)


def check_inputs(config: TrainerConfig, store: S3Store) -> Inputs:
    detection = config.task == "detection"
    if detection:
        check_detection_architecture(config.model.architecture)
    else:
        check_architecture(config.model.architecture)
    weights = store.head(S3Uri.parse(config.model.checkpoint))
    store.check_bucket(S3Uri.parse(config.output.path), "write the model to")
    if detection:
        boxes, images = build_detection_index(store, config.data, config.model.num_classes)
        return Inputs(images, weights, boxes)
    index = build_index(store, config.data, config.model.num_classes, config.training.seed)
    return Inputs(index, weights)


def prepare_node(config_wire: Mapping[str, Any], index_wire: Mapping[str, Any], weights: ObjectInfo) -> dict[str, Any]:
    """Fill this node's cache and load the base weights once; the result is plain data (crosses Ray)."""
    config = TrainerConfig.model_validate(config_wire)
    index = DatasetIndex.from_wire(index_wire)
    store = store_for(config)
    path = cached_object(store, S3Uri.parse(config.model.checkpoint), weights)
    spec = config.model
    if config.task == "detection":
        model, report = build_detector(
            spec.architecture, len(index.class_names), path, spec.checkpoint, config.data.image_size
        )
        plan = apply_detection_strategy(model, spec.strategy, spec.trainable_layers)
        preprocessing = transform_config(model)
    else:
        model, report = build_model(spec.architecture, len(index.class_names), path, spec.checkpoint)
        plan = apply_strategy(model, spec.strategy, spec.trainable_layers)
        preprocessing = data_config(model, config.data.image_size)
    _, corrupt = prepare_images(store, index)
    check_corrupt(index, corrupt)
    params = dict(model.named_parameters())
    return {
        "weights": report.wire(),
        "dataConfig": preprocessing,
        "corrupt": corrupt,
        "trainable": sum(params[n].numel() for n in plan.trainable),
        "total": sum(p.numel() for p in params.values()),
        "stages": [plan.stages_trained, plan.stages_total],
    }


def prepare(config: TrainerConfig, inputs: Inputs, *, here: bool, cpus: float = 1, gpus: int = 0) -> Prepared:
    """prepare_node on this process (`here`) or as a Ray task with one worker's resources."""
    args = (config.wire(), inputs.index.wire(), inputs.weights)
    if here:
        found = prepare_node(*args)
    else:
        import ray

        task = ray.remote(prepare_node).options(num_cpus=cpus, num_gpus=gpus, max_retries=0)
        try:
            found = ray.get(task.remote(*args))
        except ray.exceptions.RayTaskError as error:
            raise failure_reason(error) or TrainerError(f"preparing a node failed: {_first_line(error)}") from None
    prepared = Prepared(
        index=inputs.index.without_corrupt(found["corrupt"]),
        weights=inputs.weights,
        weights_report=WeightsReport.from_wire(found["weights"]),
        data_config=found["dataConfig"],
        trainable_parameters=int(found["trainable"]),
        total_parameters=int(found["total"]),
        stages=(int(found["stages"][0]), int(found["stages"][1])),
        detection=inputs.detection.without_corrupt(found["corrupt"]) if inputs.detection else None,
    )
    for line in prepared.weights_report.log_lines():
        log.info("%s", line)
    index = prepared.index
    log.info(
        "data: %d classes, %d training and %d validation images%s",
        len(index.class_names),
        len(index.train),
        len(index.validation),
        f", {len(index.corrupt)} unreadable skipped" if index.corrupt else "",
    )
    if prepared.detection is not None:
        log.info("annotations: %s", annotation_summary(prepared.detection))
    log.info(
        "model: %s, strategy %s, %d of %d stages and the head train: %s of %s parameters",
        config.model.architecture,
        config.model.strategy,
        prepared.stages[0],
        prepared.stages[1],
        f"{prepared.trainable_parameters:,}",
        f"{prepared.total_parameters:,}",
    )
    return prepared


def annotation_summary(detection: DetectionIndex) -> str:
    """`train 48 images (6 without boxes), 96 boxes (2 clipped, 1 dropped); validation …` for the log."""
    parts = []
    for part, counts in detection.counts.items():
        dropped = sum(v for k, v in counts.items() if k.startswith("boxesDropped"))
        parts.append(
            f"{part} {counts.get('images', 0)} images ({counts.get('imagesWithoutBoxes', 0)} without boxes, "
            f"{counts.get('imagesMissing', 0)} missing, {counts.get('imagesCorrupt', 0)} unreadable), "
            f"{counts.get('boxes', 0)} boxes ({counts.get('boxesClipped', 0)} clipped, {dropped} malformed dropped)"
        )
    return "; ".join(parts)


def failure_reason(error: BaseException) -> TrainerError | None:
    """The TrainerError behind a Ray Train failure (worker or controller), if one caused it."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [error]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, TrainerError):
            return TrainerError(current.message)
        todo.extend(getattr(current, "worker_failures", {}).values())
        todo += [getattr(current, "controller_failure", None), getattr(current, "cause", None)]
        todo += [current.__cause__, current.__context__]
    return None


def train(
    config: TrainerConfig,
    prepared: Prepared,
    *,
    cpus_per_worker: float,
    use_gpu: bool,
    reporter: ProgressReporter | None = None,
) -> Outcome:
    """Run the training on the connected Ray cluster and export the model."""
    use_ray_train_env()  # read by Ray Train's controller as it starts, in this (the driver's) process
    import ray.train
    from ray.train.torch import TorchTrainer

    store = store_for(config)
    checkpoints = S3Uri.parse(config.output.path).join(CHECKPOINTS_DIR)
    threads = max(1, int(cpus_per_worker))
    relay = Relay(driver_reporters(config, reporter), config.max_failures)
    plan = RunPlan(
        index=prepared.index,
        data_config=prepared.data_config,
        weights=prepared.weights,
        threads=threads,
        # On CPU the decoding would take cores from the training threads; on GPU it must keep up.
        loader_workers=min(8, threads - 1) if use_gpu else 0,
        fault_after_epoch=fault_from_env(),
        relay=relay.queue,
        detection=prepared.detection.wire() if prepared.detection else None,
    )
    resources: dict[str, float] = {"CPU": cpus_per_worker}
    if use_gpu:
        resources["GPU"] = float(config.scaling.gpus_per_worker or 1)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=plan.loop_config(config),
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.scaling.workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=config.run_name,
            storage_path=checkpoints.fs_path,
            storage_filesystem=store.arrow_filesystem(),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.output.checkpoints_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            callbacks=[run_events(relay.queue)],
        ),  # type: ignore[call-arg]  # mypy sees Train V1's RunConfig; V2 (the default) is what runs
    )
    log.info("training run %s: checkpoints under %s/%s/", config.run_name, checkpoints, config.run_name)
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as error:
        reason = failure_reason(error)
        raise reason or TrainerError(f"training failed: {_first_line(error)}") from None
    finally:
        relay.close()
    if result.checkpoint is None:
        raise TrainerError(f"training finished without a checkpoint under {checkpoints}/{config.run_name}/")
    last = S3Uri.from_fs_path(result.checkpoint.path)
    progress = read_final_progress(store, last)
    history = list(progress["history"])
    if prepared.detection is not None:
        final = progress.get("final") or {}
        card = detection_card(
            config,
            prepared.detection,
            prepared.data_config,
            prepared.weights_report,
            history,
            datetime.now(UTC),
            score_threshold=float(final.get("scoreThreshold", SCORE_THRESHOLD)),
        )
        output = export_model(store, config, last, card, history, DETECTION_PANELS, extra_files=(DETECTIONS_FILE,))
    else:
        card = classification_card(
            config, prepared.index, prepared.data_config, prepared.weights_report, history, datetime.now(UTC)
        )
        output = export_model(store, config, last, card, history, CLASSIFICATION_PANELS)
    return Outcome(output=output, metrics=dict(history[-1]), epochs=len(history))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("Training failed due to")]
    return (lines[-1] if lines else type(error).__name__)[:300]
