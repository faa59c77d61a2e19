"""JPEGs decoded and augmented on the GPU: the loader processes only read file bytes, the training process
decodes each batch with one batched nvJPEG call (`torchvision.io.decode_jpeg(list, device="cuda")`) and
applies the training transform to it there.

Why: a ResNet-50 step on one GPU trains ~4,000 images a second (bench/gpu.py); PIL decoding and
augmenting that many JPEGs takes many CPU cores per GPU (bench/findings.md, "GPU input path").
torchvision's transforms (Resize, CenterCrop, RandomResizedCrop, RandomCrop, flips, ColorJitter,
Normalize) take tensors as they take PIL images, so the transforms `augment.build_transforms` makes run
on the GPU with their semantics. torchvision.io rather than DALI: torchvision is already a dependency
and its transforms are the ones the CPU path uses; DALI would bring a second, CUDA-versioned decode and
augment stack whose operators only approximate them, and its own loader beside the seeded, resumable
order of `loaders.EpochOrder`.

The rule, written once (`decodes_on_device`): on CUDA, when every step of the transform has a form here
(`device_steps`; timm's RandAugment works on PIL images only: such a run decodes on the CPU). Then per
image: an RGB or greyscale JPEG (as PIL reads its header, whatever its name) is decoded on the GPU; any
other image is decoded and transformed by the loader process as before; a JPEG nvJPEG refuses is
decoded by PIL in the training process, and one PIL cannot read either is left out of its batch and
counted unreadable by the loop, as stream mode does (`stream.Readable`).

Randomness: each image's draws are those of the CPU path. The loader process reads the image's size
from its header and draws each random step's parameters as that step would on an image of that size
(`draw`: torchvision's own `get_params`, on the generator `loaders.SeededSamples` seeded for the image);
the training process only applies them (`DeviceDecoder`) and draws nothing. Per image it runs the steps
that move pixels (crops, resizes, flips); on the batch, the conversion to floats, the colour jitter and
the normalisation.

The parts a task shares (detection: `detection_decode`): what a loader process hands over (`JpegItem`,
`read_item`) and a batch of them (`JpegBatch`), the batched decode with its fallbacks (`BatchDecoder.jpegs`),
the dataset kind the loop recognises (`DeviceDataset`: its collate function and its decoder), and the loop's
batches (`device_batches`, `decoded_ahead`).
"""

from __future__ import annotations

import contextlib
import io
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torchvision import transforms as tv
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import functional as tvf

from kubetune_trainer.data import ImageFiles, open_image
from kubetune_trainer.errors import DataError

# What nvJPEG decodes to RGB as PIL's convert("RGB") does (CMYK and YCCK JPEGs stay on the CPU).
DEVICE_JPEG_MODES = ("RGB", "L")
# The steps that move pixels, applied image by image. Normalize comes last on the batch: the ones after it
# in a transform must commute with it (light's reflect-padded shift).
GEOMETRY = (tv.Resize, tv.CenterCrop, tv.RandomResizedCrop, tv.RandomCrop, tv.RandomHorizontalFlip)
# Batches a thread decodes before the loop takes them (`decoded_ahead`); 0: each as it is taken, on the
# loop's thread. 0 until bench/gpu.py --input jpeg has measured the thread on a GPU (bench/findings.md).
DECODE_AHEAD = 0


@dataclass(frozen=True)
class DeviceSteps:
    """A transform as applied to a decoded uint8 image: `geometry` per image in order, then on the batch
    the conversion to [0, 1] floats, `jitter` (ColorJitter, if any) and `normalize`."""

    geometry: tuple[Any, ...]
    normalize: tv.Normalize
    jitter: tv.ColorJitter | None = None


def flat_steps(transform: Callable[[Any], Any]) -> list[Callable[[Any], Any]]:
    """The steps of `transform`, nested Compose opened."""
    if isinstance(transform, tv.Compose):
        return [step for inner in transform.transforms for step in flat_steps(inner)]
    return [transform]


def has_form_here(step: Any) -> bool:
    """Whether this step of a kind in GEOMETRY (or ColorJitter) takes the options `draw` and `apply` read."""
    if isinstance(step, tv.Resize):
        return step.max_size is None and (isinstance(step.size, int) or len(step.size) in (1, 2))
    if isinstance(step, tv.RandomCrop):
        return not step.pad_if_needed and (step.padding is None or isinstance(step.padding, int))
    if isinstance(step, tv.ColorJitter):
        return step.hue is None
    return True


def commutes_with_normalize(step: Any) -> bool:
    """A per-channel affine map commutes with moving pixels about, not with padding them with a constant."""
    if isinstance(step, tv.RandomCrop):
        return not step.padding or step.padding_mode != "constant"
    return isinstance(step, (tv.RandomHorizontalFlip, tv.CenterCrop))


def device_steps(transform: Callable[[Any], Any]) -> DeviceSteps | None:
    """`transform` in the order the GPU applies it (`DeviceSteps`), or None when that would change what it
    does, or a step has no form here."""
    geometry: list[Any] = []
    normalize: tv.Normalize | None = None
    jitter: tv.ColorJitter | None = None
    floats = False
    for step in flat_steps(transform):
        if not has_form_here(step):
            return None
        if isinstance(step, tv.ToTensor) and not floats:  # timm's MaybeToTensor is one too
            floats = True
        elif isinstance(step, tv.Normalize) and floats and normalize is None:
            normalize = step
        elif isinstance(step, tv.ColorJitter) and jitter is None and normalize is None:
            jitter = step
        elif isinstance(step, GEOMETRY) and jitter is None:
            if normalize is not None and not commutes_with_normalize(step):
                return None
            geometry.append(step)
        else:
            return None
    return DeviceSteps(tuple(geometry), normalize, jitter) if normalize is not None else None


def on_cuda(device: torch.device | None) -> bool:
    """Whether training runs on CUDA, where JPEGs are decoded on the GPU (for detection, always: its images
    are only flipped; `detection_decode`)."""
    return device is not None and device.type == "cuda"


def decodes_on_device(device: torch.device | None, transform: Callable[[Any], Any]) -> bool:
    """The rule: JPEGs are decoded and `transform`ed on the GPU when training runs on CUDA and every step of
    the transform has a form here (`device_steps`)."""
    return on_cuda(device) and device_steps(transform) is not None


def resized(height: int, width: int, size: int | Sequence[int]) -> tuple[int, int]:
    """The (height, width) Resize(size) gives (torchvision's rule: an int or one number sets the shorter side)."""
    if isinstance(size, int) or len(size) == 1:
        short = size if isinstance(size, int) else size[0]
        if width <= height:
            return int(short * height / width), short
        return short, int(short * width / height)
    return int(size[0]), int(size[1])


def draw(steps: DeviceSteps, height: int, width: int) -> list[Any]:
    """The random parameters of each random step, in order, drawn as the step draws them on an image of
    this size (torchvision's own `get_params`, on the global generator: `loaders.SeededSamples`)."""
    params: list[Any] = []
    for step in steps.geometry:
        shape = torch.empty(()).expand(3, height, width)  # an image's shape, no pixels
        if isinstance(step, tv.Resize):
            height, width = resized(height, width, step.size)
        elif isinstance(step, tv.CenterCrop):
            height, width = step.size
        elif isinstance(step, tv.RandomResizedCrop):
            params.append(step.get_params(shape, step.scale, step.ratio))
            height, width = step.size
        elif isinstance(step, tv.RandomCrop):
            pad = 2 * (step.padding or 0)
            padded = torch.empty(()).expand(3, height + pad, width + pad)
            params.append(step.get_params(padded, step.size)[:2])
            height, width = step.size
        else:  # RandomHorizontalFlip, as its forward draws
            params.append(bool(torch.rand(1) < step.p))
    if steps.jitter is not None:
        jitter = steps.jitter
        order, *factors = jitter.get_params(jitter.brightness, jitter.contrast, jitter.saturation, None)
        params.append((order.tolist(), factors[:3]))
    return params


def apply_geometry(image: torch.Tensor, steps: DeviceSteps, params: Sequence[Any]) -> torch.Tensor:
    """`steps.geometry` on one uint8 CHW image, with the parameters `draw` drew for it."""
    drawn = iter(params)
    for step in steps.geometry:
        if isinstance(step, tv.RandomResizedCrop):
            top, left, height, width = next(drawn)
            image = tvf.resized_crop(
                image, top, left, height, width, step.size, step.interpolation, antialias=step.antialias
            )
        elif isinstance(step, tv.RandomCrop):
            top, left = next(drawn)
            if step.padding:
                image = tvf.pad(image, step.padding, step.fill, step.padding_mode)
            image = tvf.crop(image, top, left, *step.size)
        elif isinstance(step, tv.RandomHorizontalFlip):
            image = tvf.hflip(image) if next(drawn) else image
        else:  # Resize, CenterCrop: nothing drawn
            image = step(image)
    return image


def blend(images: torch.Tensor, other: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """torchvision's `_blend` of float images, one factor per image."""
    ratio = factors.view(-1, 1, 1, 1)
    return (ratio * images + (1.0 - ratio) * other).clamp_(0.0, 1.0)


def grey(images: torch.Tensor) -> torch.Tensor:
    """torchvision's `rgb_to_grayscale` of a batch, kept one channel."""
    return (0.2989 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]).unsqueeze(1)


def jitter_batch(images: torch.Tensor, drawn: Sequence[tuple[list[int], list[float | None]]]) -> torch.Tensor:
    """ColorJitter's brightness, contrast and saturation on float images, each image its own order and
    factors (`draw`), as its forward applies them: the images taking the same adjustment at the same place
    in their order, together."""
    orders = torch.tensor([order for order, _ in drawn])
    factors = torch.tensor([[1.0 if f is None else f for f in values] for _, values in drawn], device=images.device)
    for place in range(orders.shape[1]):
        for adjustment in (0, 1, 2):  # brightness, contrast, saturation (3: hue, never drawn here)
            rows = (orders[:, place] == adjustment).nonzero().flatten().to(images.device)
            if not len(rows):
                continue
            part, factor = images[rows], factors[rows, adjustment]
            if adjustment == 0:
                other = torch.zeros_like(part)
            elif adjustment == 1:
                other = grey(part).mean(dim=(-3, -2, -1), keepdim=True)
            else:
                other = grey(part)
            images[rows] = blend(part, other, factor)
    return images


@dataclass
class JpegItem:
    """What a loader process hands over for one image: a JPEG's bytes and the parameters drawn for its
    transform, or the image it decoded and transformed itself (not a JPEG nvJPEG takes); its label (a class
    index, or a detector's target: `detection_decode`)."""

    label: Any
    data: bytes = b""
    params: list[Any] = field(default_factory=list)
    image: torch.Tensor | None = None


def read_item(
    path: Path,
    jpeg: Callable[[bytes, int, int], JpegItem],
    cpu_item: Callable[[Image.Image], tuple[torch.Tensor, Any]],
) -> JpegItem:
    """The item of the file at `path`: `jpeg(bytes, height, width)` for a JPEG the GPU decodes (as PIL reads
    its header, whatever its name), else the CPU path's (image, label) of its RGB pixels (`cpu_item`). The
    header is read as the CPU path reads it (`open_image`: format and pixel bound)."""
    data = Path(path).read_bytes()
    with open_image(io.BytesIO(data)) as image:
        if image.format == "JPEG" and image.mode in DEVICE_JPEG_MODES:
            return jpeg(data, image.height, image.width)
        rgb = image.convert("RGB")
    tensor, label = cpu_item(rgb)
    return JpegItem(label, image=tensor)


class DeviceDataset:
    """A dataset whose items are `JpegItem`s: the loader's collate function and the decoder that finishes
    its batches on a device (`device_collate`, `device_batches`)."""

    @staticmethod
    def collate_batch(items: Sequence[JpegItem]) -> JpegBatch:
        raise NotImplementedError

    def decoder(self, device: torch.device) -> Callable[[JpegBatch], tuple[Any, Any]]:
        raise NotImplementedError


class JpegFiles(ImageFiles, DeviceDataset):
    """`ImageFiles` whose JPEGs the training process decodes (`DeviceDecoder`): their items are bytes."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int], transform: Callable[[Any], Any]) -> None:
        super().__init__(paths, labels, transform)
        steps = device_steps(transform)
        if steps is None:
            raise ValueError(f"no form on the GPU for {transform}")
        self.steps = steps

    def __getitem__(self, i: int) -> JpegItem:  # type: ignore[override]
        def jpeg(data: bytes, height: int, width: int) -> JpegItem:
            return JpegItem(self.labels[i], data, draw(self.steps, height, width))

        return read_item(Path(self.paths[i]), jpeg, partial(self.item, i))

    @staticmethod
    def collate_batch(items: Sequence[JpegItem]) -> JpegBatch:
        return collate_jpegs(items)

    def decoder(self, device: torch.device) -> DeviceDecoder:
        return DeviceDecoder(self.steps, device)


@dataclass
class JpegBatch:
    """A batch of `JpegItem`s in a few tensors (each tensor crossing from a loader process costs a shared
    memory segment): the JPEGs' bytes end to end with their sizes (0: the image is in `images`), and the
    labels in batch order (a tensor of class indices, or a list of detectors' targets)."""

    data: torch.Tensor
    sizes: list[int]
    params: list[list[Any]]
    labels: Any
    images: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.sizes)

    def loader_decoded(self) -> list[int]:
        """The positions of the images the loader process decoded itself (in `images`, in this order)."""
        return [position for position, size in enumerate(self.sizes) if not size]


def jpeg_batch(items: Sequence[JpegItem], labels: Any) -> JpegBatch:
    """`items` as a `JpegBatch` with these `labels`."""
    data = b"".join(item.data for item in items)
    return JpegBatch(
        data=torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8),
        sizes=[len(item.data) for item in items],
        params=[item.params for item in items],
        labels=labels,
        images=[item.image for item in items if item.image is not None],
    )


def collate_jpegs(items: Sequence[JpegItem]) -> JpegBatch:
    return jpeg_batch(items, torch.tensor([item.label for item in items], dtype=torch.long))


def decode_all(chunks: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """Each JPEG decoded to RGB uint8 on `device`, in one batched call; when that fails, one by one, None
    for those that do not decode."""
    if not chunks:
        return []
    try:
        return list(decode_jpeg(list(chunks), mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        decoded: list[torch.Tensor | None] = []
        for chunk in chunks:
            try:
                decoded.append(decode_jpeg(chunk, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                decoded.append(None)
        return decoded


def decode_with_pil(chunk: torch.Tensor) -> torch.Tensor | None:
    """A JPEG nvJPEG refused, decoded by PIL to RGB uint8 CHW; None when PIL cannot read it either."""
    try:
        with open_image(io.BytesIO(chunk.numpy().tobytes())) as image:
            return tvf.pil_to_tensor(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError):  # what PIL raises for bad files (DecompressionBomb: an OSError)
        return None


def none_readable(batch: JpegBatch) -> DataError:
    return DataError(f"none of the {len(batch)} images of a batch could be read (see the unreadable count)")


def in_order(positions: Sequence[int]) -> list[int]:
    """The indexes that put items at these batch `positions` back in batch order."""
    return sorted(range(len(positions)), key=positions.__getitem__)


class BatchDecoder:
    """The JPEGs of a `JpegBatch` decoded on `device` (`jpegs`), for a task's decoder to finish."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def decoded(self, chunks: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
        """`decode_all` on a stream of its own. torchvision allocates the decoded images on the current
        stream and has nvJPEG write them from another without waiting for it (pytorch/vision#9606): on the
        training stream nvJPEG could overwrite memory the step's queued kernels still read. On its own
        stream, the only memory it gets back is its own earlier images, each held until the training
        stream is done with it (`record_stream`)."""
        if self.stream is None:
            return decode_all(chunks, self.device)
        training = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):
            decoded = decode_all(chunks, self.device)
        training.wait_stream(self.stream)
        for image in decoded:
            if image is not None:
                image.record_stream(training)
        return decoded

    def jpegs(self, batch: JpegBatch) -> tuple[list[int], list[torch.Tensor]]:
        """The batch positions of its JPEGs that decoded, and their RGB uint8 CHW images on the device: nvJPEG's,
        or PIL's for one nvJPEG refuses; one neither reads is left out (the loop counts it unreadable)."""
        chunks = list(torch.split(batch.data, [size for size in batch.sizes if size]))
        jpegs = [position for position, size in enumerate(batch.sizes) if size]
        positions: list[int] = []
        images: list[torch.Tensor] = []
        for position, chunk, image in zip(jpegs, chunks, self.decoded(chunks), strict=True):
            image = image if image is not None else decode_with_pil(chunk)
            if image is not None:
                positions.append(position)
                images.append(image.to(self.device))
        return positions, images


class DeviceDecoder(BatchDecoder):
    """A `JpegBatch` to (images, labels) on `device`, as `steps` (`JpegFiles.steps`) make them."""

    def __init__(self, steps: DeviceSteps, device: torch.device) -> None:
        super().__init__(device)
        self.steps = steps

    def __call__(self, batch: JpegBatch) -> tuple[torch.Tensor, torch.Tensor]:
        positions, images = self.jpegs(batch)
        images = [
            apply_geometry(image, self.steps, batch.params[p]) for p, image in zip(positions, images, strict=True)
        ]
        parts = [self.finish(images, [batch.params[p] for p in positions])] if images else []
        if batch.images:
            positions += batch.loader_decoded()
            parts.append(torch.stack(batch.images).to(self.device, non_blocking=True))
        if not parts:
            raise none_readable(batch)
        order = in_order(positions)
        together = torch.cat(parts) if len(parts) > 1 else parts[0]
        merged = together if order == list(range(len(order))) else together[torch.tensor(order, device=self.device)]
        return merged, batch.labels[sorted(positions)].to(self.device, non_blocking=True)

    def finish(self, images: Sequence[torch.Tensor], params: Sequence[list[Any]]) -> torch.Tensor:
        """The batch stage: uint8 to [0, 1] floats (ToTensor), the colour jitter drawn last, Normalize."""
        batch = torch.stack(list(images)).float().div_(255)
        if self.steps.jitter is not None:
            batch = jitter_batch(batch, [drawn[-1] for drawn in params])
        normalized: torch.Tensor = self.steps.normalize(batch)
        return normalized


# A task's decoder (`DeviceDataset.decoder`): a `JpegBatch` to (inputs, labels) on its device (`.device`).
Decoder = Any


class DeviceBatches:
    """`loader`'s batches decoded by `decoder`: what the loop iterates (length and all). With `ahead`, a thread
    decodes up to that many batches before the loop takes them (`decoded_ahead`); else each as it is taken."""

    def __init__(self, loader: Any, decoder: Decoder, ahead: int = DECODE_AHEAD) -> None:
        self.loader, self.decoder, self.ahead = loader, decoder, ahead

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        if self.ahead:
            yield from decoded_ahead(self.loader, self.decoder, self.ahead)
        else:
            for batch in self.loader:
                yield self.decoder(batch)


_DONE = object()


def decoded_ahead(loader: Any, decoder: Decoder, ahead: int) -> Iterator[tuple[Any, Any]]:
    """`loader`'s batches decoded by a thread up to `ahead` batches before they are taken, on a CUDA stream of
    its own: nvJPEG holds its caller until it is done, and the thread's wait then overlaps the training
    step's (torch and torchvision let go of the GIL in their ops). The decoder draws nothing from the
    generators (`draw` did, in the loader processes), so the thread leaves the step's randomness alone."""
    batches: queue.Queue[Any] = queue.Queue(maxsize=ahead)
    stop = threading.Event()
    thread = threading.Thread(target=decode_into, args=(loader, decoder, batches, stop), name="device-decode")
    thread.daemon = True
    thread.start()
    try:
        while (item := batches.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            images, labels, ready = item
            if ready is not None:  # the decode thread's stream finished these before the step reads them
                training = torch.cuda.current_stream(decoder.device)
                training.wait_event(ready)
                for tensor in tensors_in((images, labels)):
                    tensor.record_stream(training)
            yield images, labels
    finally:
        stop.set()
        thread.join()


def tensors_in(value: Any) -> Iterator[torch.Tensor]:
    """The tensors of a decoded batch: a tensor, or lists, tuples and dicts of them (a detector's)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_in(item)
    elif isinstance(value, dict):
        yield from tensors_in(list(value.values()))


def decode_into(loader: Any, decoder: Decoder, batches: queue.Queue[Any], stop: threading.Event) -> None:
    """The thread of `decoded_ahead`: each decoded batch (with the CUDA event that marks it done), then
    _DONE, or the error that ended it; until `stop`."""

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                batches.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    cuda = decoder.device.type == "cuda"
    stream = torch.cuda.Stream(decoder.device) if cuda else None
    try:
        with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
            for batch in loader:
                images, labels = decoder(batch)
                ready = torch.cuda.Event() if cuda else None
                if ready is not None:
                    ready.record(stream)
                if not put((images, labels, ready)):
                    return
    except BaseException as error:  # handed to the loop, which raises it
        put(error)
        return
    put(_DONE)


def on_device_files(files: ImageFiles, device: torch.device | None) -> ImageFiles:
    """`files` as `JpegFiles` when its JPEGs are decoded on `device` (`decodes_on_device`), else as they are."""
    if decodes_on_device(device, files.transform):
        return JpegFiles([Path(p) for p in files.paths], files.labels, files.transform)
    return files


def device_collate(dataset: Any, collate: Callable[[Any], Any] | None) -> Callable[[Any], Any] | None:
    """The loader's collate function for `dataset`: its own for a `DeviceDataset`, else `collate`."""
    return dataset.collate_batch if isinstance(dataset, DeviceDataset) else collate


def device_batches(loader: Any, dataset: Any, device: torch.device, ahead: int = DECODE_AHEAD) -> Any:
    """`loader` as the loop iterates it: decoded on `device` when `dataset` is a `DeviceDataset`."""
    if isinstance(dataset, DeviceDataset):
        return DeviceBatches(loader, dataset.decoder(device), ahead)
    return loader
