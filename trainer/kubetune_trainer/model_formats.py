"""Deployable copies of the exported model (`output.formats`) and what a server must do to feed it.

- `onnx`: `model.onnx` (opset 17, torch's TorchScript-based exporter, the one torchvision's detectors
  support), then checked with onnxruntime alone on the validation images: a classifier must give the
  same top-1 on every image (the largest absolute logit difference is recorded), a detector the same
  boxes above its score threshold. A copy that fails the check is not published; model.json says why.
- `torchscript`: `model.torchscript.pt` (a classifier traced, a detector scripted), loadable with
  `torch.jit.load` without kubetune, timm or torchvision.

onnx and onnxruntime are imported only when `onnx` is asked for. A format a model cannot be exported
to is a line in model.json (`exports.<format>.error`) and a warning, never a failed run: the
safetensors weights are there either way.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kubetune_trainer.errors import first_line

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
TORCHSCRIPT_FILE = "model.torchscript.pt"
OPSET = 17
CHECK_IMAGES = 256  # validation images the ONNX copy is checked on, at most
BOX_TOLERANCE = 1.0  # pixels


def _guarded(name: str, build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """One format's export; an exception becomes its `error` in model.json and a warning."""
    try:
        return build()
    except Exception as error:
        message = f"could not export {name}: {first_line(error)}"
        log.warning("%s", message)
        return {"error": message}


def _check_images(dataset: Any) -> list[int]:
    return list(range(min(CHECK_IMAGES, len(dataset))))


# -- classifiers ------------------------------------------------------------------------------------


def classifier_onnx(model: nn.Module, dataset: Any, folder: Path, size: int) -> dict[str, Any]:
    """model.onnx of a classifier (input `image` N x 3 x size x size, output `logits`), checked."""
    import onnxruntime

    path = folder / ONNX_FILE
    example = torch.zeros(1, 3, size, size)
    axes = {"image": {0: "batch"}, "logits": {0: "batch"}}
    torch.onnx.export(
        model, (example,), str(path), input_names=["image"], output_names=["logits"],
        dynamic_axes=axes, opset_version=OPSET, dynamo=False,
    )  # fmt: skip
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, _check_images(dataset)), batch_size=32)
    agree = total = 0
    largest = 0.0
    with torch.no_grad():
        for images, _ in loader:
            reference = model(images).numpy()
            logits = session.run(["logits"], {"image": images.numpy()})[0]
            largest = max(largest, float(np.abs(logits - reference).max()))
            agree += int((logits.argmax(1) == reference.argmax(1)).sum())
            total += len(images)
    check = {"images": total, "sameTop1": agree, "maxAbsLogitDifference": largest, "runtime": "onnxruntime"}
    if agree != total:
        path.unlink()
        raise ValueError(f"the ONNX model's top-1 differs on {total - agree} of {total} validation images")
    return {"file": ONNX_FILE, "opset": OPSET, "input": "image", "output": "logits", "check": check}


def classifier_torchscript(model: nn.Module, folder: Path, size: int) -> dict[str, Any]:
    traced = torch.jit.trace(model, torch.zeros(1, 3, size, size))
    traced.save(str(folder / TORCHSCRIPT_FILE))
    return {"file": TORCHSCRIPT_FILE, "how": "traced: torch.jit.load(file)(images N x 3 x H x W) gives logits"}


def export_classifier(
    model: nn.Module, formats: Sequence[str], dataset: Any, folder: Path, size: int
) -> dict[str, dict[str, Any]]:
    """The asked formats beyond safetensors, into `folder`; what each holds (or why it could not be made)."""
    cpu = copy.deepcopy(model).cpu().eval().to(memory_format=torch.contiguous_format)
    out: dict[str, dict[str, Any]] = {}
    if "onnx" in formats:
        out["onnx"] = _guarded("onnx", lambda: classifier_onnx(cpu, dataset, folder, size))
    if "torchscript" in formats:
        out["torchscript"] = _guarded("torchscript", lambda: classifier_torchscript(cpu, folder, size))
    return out


# -- detectors --------------------------------------------------------------------------------------


def _kept(output: dict[str, Any], threshold: float) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(output["scores"])
    keep = scores >= threshold
    return np.asarray(output["boxes"])[keep], np.asarray(output["labels"])[keep]


def _covered(these: tuple[np.ndarray, np.ndarray], those: tuple[np.ndarray, np.ndarray]) -> bool:
    """Every box of `these` has one of `those` with its label within BOX_TOLERANCE pixels (in any order:
    boxes of equal score come in either order)."""
    for box, label in zip(*these, strict=True):
        candidates = those[0][those[1] == label]
        if not len(candidates) or float(np.abs(candidates - box).max(axis=1).min()) > BOX_TOLERANCE:
            return False
    return True


def same_detections(mine: tuple[np.ndarray, np.ndarray], theirs: tuple[np.ndarray, np.ndarray]) -> bool:
    return len(mine[0]) == len(theirs[0]) and _covered(mine, theirs) and _covered(theirs, mine)


def detector_onnx(model: nn.Module, dataset: Any, folder: Path, threshold: float) -> dict[str, Any]:
    """model.onnx of a detector (input `images`: one float RGB image 3 x H x W in [0, 1]; outputs named as
    the model's own: boxes, labels and scores, in its order), checked: the same boxes (within a pixel) and
    labels above `threshold`."""
    import onnxruntime

    path = folder / ONNX_FILE
    example = dataset[0][0] if len(dataset) else torch.rand(3, 64, 64)
    with torch.no_grad():  # the outputs are the model's dict's values, in its order (SSD: boxes, scores, labels)
        names = list(model([example])[0])
    torch.onnx.export(
        model, ([example],), str(path), input_names=["images"], output_names=names,
        dynamic_axes={"images": {1: "height", 2: "width"}}, opset_version=OPSET, dynamo=False,
    )  # fmt: skip
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    same = 0
    indices = _check_images(dataset)
    with torch.no_grad():
        for i in indices:
            image = dataset[i][0]
            reference = {k: v.numpy() for k, v in model([image])[0].items()}
            outputs = dict(zip(names, session.run(names, {"images": image.numpy()}), strict=True))
            mine, theirs = _kept(reference, threshold), _kept(outputs, threshold)
            same += int(same_detections(mine, theirs))
    check = {"images": len(indices), "sameDetections": same, "scoreThreshold": threshold, "runtime": "onnxruntime"}
    if same != len(indices):
        path.unlink()
        raise ValueError(
            f"the ONNX model's detections differ on {len(indices) - same} of {len(indices)} validation images"
        )
    return {
        "file": ONNX_FILE,
        "opset": OPSET,
        "input": "images",
        "outputs": names,
        "check": check,
    }


def detector_torchscript(model: nn.Module, folder: Path) -> dict[str, Any]:
    torch.jit.script(model).save(str(folder / TORCHSCRIPT_FILE))
    return {
        "file": TORCHSCRIPT_FILE,
        "how": "scripted: torch.jit.load(file)([image]) gives (losses, [{boxes, labels, scores}])",
    }


def export_detector(
    model: nn.Module, formats: Sequence[str], dataset: Any, folder: Path, threshold: float
) -> dict[str, dict[str, Any]]:
    cpu = copy.deepcopy(model).cpu().eval()
    out: dict[str, dict[str, Any]] = {}
    if "onnx" in formats:
        out["onnx"] = _guarded("onnx", lambda: detector_onnx(cpu, dataset, folder, threshold))
    if "torchscript" in formats:
        out["torchscript"] = _guarded("torchscript", lambda: detector_torchscript(cpu, folder))
    return out


# -- what a server does -----------------------------------------------------------------------------


def _step(transform: Any) -> dict[str, Any]:
    """One torchvision transform as plain facts."""
    name = type(transform).__name__
    if name == "Resize":
        size = transform.size
        return {
            "op": "resize",
            "size": size,
            "meaning": "the shorter side to this many pixels, keeping the aspect ratio"
            if isinstance(size, int) or len(size) == 1
            else "to exactly (height, width)",
            "interpolation": str(getattr(transform.interpolation, "value", transform.interpolation)),
            "antialias": bool(getattr(transform, "antialias", True)),
        }
    if name == "CenterCrop":
        return {"op": "centerCrop", "size": list(transform.size)}
    if name in ("ToTensor", "MaybeToTensor", "PILToTensor"):
        return {"op": "toTensor", "meaning": "HWC uint8 0-255 to CHW float32 0-1 (divide by 255)"}
    if name == "Normalize":
        return {"op": "normalize", "mean": [float(v) for v in transform.mean], "std": [float(v) for v in transform.std]}
    return {"op": name}


def classifier_preprocessing(eval_transform: Any) -> dict[str, Any]:
    """The exact steps from an image file to the model's input, as timm's eval transform does them."""
    steps = [_step(t) for t in getattr(eval_transform, "transforms", [eval_transform])]
    return {
        "steps": [{"op": "decode", "meaning": "the image file to RGB (PIL: Image.open(f).convert('RGB'))"}, *steps],
        "input": {"layout": "NCHW", "channels": "RGB", "dtype": "float32"},
        "output": "logits, one per class in classNames order; softmax gives probabilities",
    }
