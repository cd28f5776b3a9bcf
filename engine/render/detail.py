"""The face-detail pass: the face of a drawn image redrawn at the model's own resolution, pasted back.

A face that fills a tenth of a 1024² image is drawn on a 13 × 13 latent grid: too few cells for the
user's model to put their features into. The pass cuts a square around the face out of the image,
scales it to the preset's resolution, re-denoises it at a moderate strength with the user's model
(and InstantID where the preset has it), scales it back and pastes it in through a feathered mask,
so that nothing outside the face's square changes and the seam fades over a few pixels. The worker
keeps the result only when it looks more like the user than the image as drawn (``engine.worker``).

This module knows geometry and pixels only: the redraw itself is a callable the worker builds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

DETAIL_STRENGTH = 0.4
"""How much of the face the pass redraws: enough to add detail at the higher resolution, little
enough that the pose, the expression and the style stay those of the drawing."""

CONTEXT = 0.5
"""The square's margin around the face's box, as a fraction of the box's longer side on each side:
hair, ears and jaw come along, so the redraw sees a head, not a cut-out."""

FEATHER = 0.125
"""The width of the mask's fade, as a fraction of the square's side."""

SKIP_ABOVE = 0.9
"""No pass when the square would be at least this fraction of the preset's resolution: the face is
drawn at (about) full resolution already, and a redraw would only cost time."""


@dataclass(frozen=True)
class DetailRegion:
    """Where the pass redraws: a square of the image and the mask it is pasted back through."""

    box: tuple[int, int, int, int]  # (left, top, right, bottom) in the image; right - left == bottom - top
    mask: Image.Image  # "L", the image's size: 255 where the redrawn face replaces the image, 0 where it stays

    @property
    def side(self) -> int:
        return self.box[2] - self.box[0]


def face_region(
    image_size: tuple[int, int], face_box: tuple[float, float, float, float] | np.ndarray, resolution: int
) -> DetailRegion | None:
    """The square around ``face_box`` (x1, y1, x2, y2) inside an image of ``image_size`` (width, height),
    or None when the face is big enough already (``SKIP_ABOVE``) or the box is empty."""
    width, height = image_size
    x1, y1, x2, y2 = (float(v) for v in np.asarray(face_box, dtype=np.float64))
    longer = max(x2 - x1, y2 - y1)
    if longer <= 0:
        return None
    side = min(round(longer * (1 + 2 * CONTEXT)), width, height)
    if side >= SKIP_ABOVE * resolution or side < 8:
        return None
    left = _clamp(round((x1 + x2 - side) / 2), 0, width - side)
    top = _clamp(round((y1 + y2 - side) / 2), 0, height - side)
    box = (left, top, left + side, top + side)
    return DetailRegion(box, _feathered_mask(image_size, box))


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(value, high))


def _feathered_mask(image_size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    """0 on the square's outermost pixels and everywhere outside it, rising linearly to 255 over
    ``FEATHER`` of the side inwards, 255 in the middle: the image outside the square stays exactly."""
    left, top, right, bottom = box
    side = right - left
    fade = max(1.0, side * FEATHER)
    index = np.arange(side, dtype=np.float64)
    to_edge = np.minimum(index, side - 1 - index)  # 0 on the square's edge
    inward = np.minimum(to_edge[:, None], to_edge[None, :])
    local = np.round(255 * np.clip(inward / fade, 0.0, 1.0)).astype(np.uint8)
    mask = Image.new("L", image_size, 0)
    mask.paste(Image.fromarray(local, mode="L"), (left, top))
    return mask


def redraw_face(
    image: Image.Image,
    region: DetailRegion,
    redraw: Callable[[Image.Image], Image.Image],
    resolution: int,
) -> Image.Image:
    """``image`` with its ``region`` redrawn: the square scaled to ``resolution``², handed to ``redraw``
    (which returns an image of that size), scaled back and pasted in through the region's mask."""
    image = image.convert("RGB")
    crop = image.crop(region.box).resize((resolution, resolution), Image.Resampling.LANCZOS)
    redrawn = redraw(crop)
    if redrawn.size != (resolution, resolution):
        raise ValueError(f"the redraw returned {redrawn.size}, not {(resolution, resolution)}")
    back = redrawn.convert("RGB").resize((region.side, region.side), Image.Resampling.LANCZOS)
    layer = image.copy()
    layer.paste(back, region.box[:2])
    return Image.composite(layer, image, region.mask)


def to_crop(points: np.ndarray, region: DetailRegion, resolution: int) -> np.ndarray:
    """Image coordinates (…, 2) of ``points`` (keypoints, box corners) in the scaled square's coordinates."""
    left, top = region.box[:2]
    scale = resolution / region.side
    return (np.asarray(points, dtype=np.float64).reshape(-1, 2) - (left, top)) * scale
