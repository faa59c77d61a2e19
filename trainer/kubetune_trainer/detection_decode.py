"""A detection run's JPEGs decoded on the GPU, with `device_decode`'s parts: the loader processes read each
file's bytes and header, its boxes and labels, and draw its flip; the training process decodes the batch
with one batched nvJPEG call and flips the images drawn so.

What it mirrors is the CPU path's whole transform (`detection_data.DetectionFiles.item`): the image as
floats in [0, 1] at its own size, mirrored with its boxes when the seeded draw says so (data.augment other
than `none`); the detector resizes and normalises it itself (GeneralizedRCNNTransform). So the rule is
`device_decode.on_cuda`: every detection run on CUDA with the node cache. The flip is drawn in the loader
process, on the generator `loaders.SeededSamples` seeds for the image, exactly as the CPU path draws it, and
the boxes are mirrored there too (the header gives the width); the training process draws nothing. The
same fallbacks as classification: an image that is not an RGB or greyscale JPEG is decoded and flipped by
the loader process as before, a JPEG nvJPEG refuses is decoded by PIL in the training process, and one
neither reads is left out of its batch with its target and counted unreadable by the loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch
from torchvision.transforms import functional as tvf

from kubetune_trainer.detection_data import DetectionFiles
from kubetune_trainer.device_decode import (
    BatchDecoder,
    DeviceDataset,
    JpegBatch,
    JpegItem,
    in_order,
    jpeg_batch,
    none_readable,
    on_cuda,
    read_item,
)

Target = dict[str, torch.Tensor]


class DetectionJpegs(DetectionFiles, DeviceDataset):
    """`DetectionFiles` whose JPEGs the training process decodes (`DetectionDecoder`): their items are bytes,
    the target (boxes already flipped as drawn) and the flip drawn."""

    def __getitem__(self, i: int) -> JpegItem:  # type: ignore[override]
        def jpeg(data: bytes, height: int, width: int) -> JpegItem:
            flipped = self.draws_flip()
            return JpegItem(self.target(i, width, flipped), data, [flipped])

        return read_item(Path(self.paths[i]), jpeg, partial(self.item, i))

    @staticmethod
    def collate_batch(items: Sequence[JpegItem]) -> JpegBatch:
        """The targets as a list: box counts differ from image to image (`detection_data.collate`)."""
        return jpeg_batch(items, [item.label for item in items])

    def decoder(self, device: torch.device) -> DetectionDecoder:
        return DetectionDecoder(device)


class DetectionDecoder(BatchDecoder):
    """A `JpegBatch` of `DetectionJpegs` to (images, targets) on `device`, as the CPU path makes them: lists,
    each image a float CHW tensor in [0, 1] at its own size."""

    def __call__(self, batch: JpegBatch) -> tuple[list[torch.Tensor], list[Target]]:
        positions, decoded = self.jpegs(batch)
        images = [
            (tvf.hflip(image) if batch.params[position][0] else image).float().div_(255)
            for position, image in zip(positions, decoded, strict=True)
        ]
        positions += batch.loader_decoded()
        images += [image.to(self.device, non_blocking=True) for image in batch.images]
        if not images:
            raise none_readable(batch)
        order = in_order(positions)
        targets = [batch.labels[positions[i]] for i in order]
        moved = [{key: value.to(self.device, non_blocking=True) for key, value in t.items()} for t in targets]
        return [images[i] for i in order], moved


def on_device_detection(files: DetectionFiles, device: torch.device | None) -> DetectionFiles:
    """`files` as `DetectionJpegs` when training runs on CUDA (`device_decode.on_cuda`), else as they are."""
    if on_cuda(device):
        return DetectionJpegs(files.folder, files.samples, files.flip)
    return files
