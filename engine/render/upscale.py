"""Upscaling 2× with the resident base: no upscaler model, no extra weights.

The image is enlarged with Lanczos, then re-denoised lightly (image-to-image at ``DEFAULT_STRENGTH``)
so the base redraws the detail that interpolation cannot invent, with the user's model when there is
one. A result no larger than about the preset's pixel count goes through the pipeline in one pass;
a larger one in overlapping tiles of the preset's resolution (the size the base draws best), blended
back with linear, feathered weights across each overlap so that no seam shows.

The tiling and blending (`plan_tiles`, `blend_tiles`) are plain functions over PIL images and numpy
arrays, testable without a model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from engine.render.renderer import Personalisation, Renderer, RenderInputError

UPSCALE_FACTOR = 2
DEFAULT_STRENGTH = 0.3
"""Low enough to keep the composition and the likeness, high enough to sharpen what Lanczos blurs."""
ONE_PASS_SLACK = 1.25
"""An enlarged image of up to this many times the preset's pixel count is re-denoised in one pass."""
MAX_SCALE = 4
"""An upscale's output holds at most about ``(MAX_SCALE × resolution)²`` pixels: two upscales of a
drawn image (4096² on SDXL). Beyond that the tiles (and the time) grow past what a chat should wait."""
_MAX_PIXELS_SLACK = 1.1  # drawn sizes keep about resolution² pixels, some a little more (2:3 on SDXL)
_MULTIPLE = 8  # the VAE's downsampling: every side the pipeline sees is a multiple of it

Denoise = Callable[[Image.Image, int], Image.Image]
"""Re-denoises tile ``index`` (a crop of the enlarged image) and returns it at the same size."""


@dataclass(frozen=True)
class Tile:
    """One tile: its box in the image (left, top, right, bottom) and its blend weight per pixel.

    ``weight`` has the tile's shape (height, width); over all tiles of a plan, the weights at each
    pixel of the image sum to 1.
    """

    box: tuple[int, int, int, int]
    weight: np.ndarray


def overlap_for(resolution: int) -> int:
    """The overlap between tiles: an eighth of the tile, a multiple of 8 (128 px on SDXL, 16 on tiny)."""
    return max(_MULTIPLE, resolution // 8 // _MULTIPLE * _MULTIPLE)


def upscaled_size(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """(width, height) of the 2× image of ``size``, each a multiple of 8.

    Raises ``RenderInputError`` when the result would exceed the ``MAX_SCALE`` cap.
    """
    width, height = (side * UPSCALE_FACTOR // _MULTIPLE * _MULTIPLE for side in size)
    if min(width, height) < _MULTIPLE:
        raise RenderInputError(f"an image of {size[0]}×{size[1]} pixels is too small to upscale")
    if width * height > (MAX_SCALE * resolution) ** 2 * _MAX_PIXELS_SLACK:
        raise RenderInputError(
            f"upscaling {size[0]}×{size[1]} pixels would give {width}×{height}, beyond this worker's "
            f"limit of about {MAX_SCALE * resolution}² pixels"
        )
    return width, height


def plan_tiles(size: tuple[int, int], tile: tuple[int, int], overlap: int) -> list[Tile]:
    """Tiles of at most ``tile`` (width, height) covering an image of ``size``, neighbours sharing at
    least ``overlap`` pixels, with weights that ramp linearly across each overlap and sum to 1.

    A tile as large as the image gives one tile of weight 1 (the one-pass case).
    """
    if min(tile) < 1 or overlap < 0:
        raise ValueError(f"tiles must have positive sides and the overlap be non-negative, got {tile}, {overlap}")
    columns = _spans(size[0], tile[0], overlap)
    rows = _spans(size[1], tile[1], overlap)
    column_weights = _axis_weights(size[0], columns)
    row_weights = _axis_weights(size[1], rows)
    return [
        Tile((left, top, right, bottom), np.outer(row_weight, column_weight))
        for (top, bottom), row_weight in zip(rows, row_weights, strict=True)
        for (left, right), column_weight in zip(columns, column_weights, strict=True)
    ]


def _spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """(start, end) of tiles along one axis: as few as cover ``length`` with ``overlap``, evenly spread."""
    if tile >= length:
        return [(0, length)]
    if overlap >= tile:
        raise ValueError(f"the overlap ({overlap}) must be smaller than the tile ({tile})")
    count = math.ceil((length - tile) / (tile - overlap)) + 1
    starts = [round(index * (length - tile) / (count - 1)) for index in range(count)]
    return [(start, start + tile) for start in starts]


def _axis_weights(length: int, spans: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """Per span, weights that fall linearly to 0 across its overlap with each neighbour, normalised
    so that at every position the spans covering it sum to 1."""
    weights = []
    for index, (start, end) in enumerate(spans):
        weight = np.ones(end - start, dtype=np.float64)
        if index > 0:
            shared = spans[index - 1][1] - start
            if shared > 0:
                weight[:shared] *= (np.arange(shared) + 0.5) / shared
        if index < len(spans) - 1:
            shared = end - spans[index + 1][0]
            if shared > 0:
                weight[end - start - shared :] *= ((np.arange(shared) + 0.5) / shared)[::-1]
        weights.append(weight)
    total = np.zeros(length, dtype=np.float64)
    for (start, end), weight in zip(spans, weights, strict=True):
        total[start:end] += weight
    if not np.all(total > 0):
        raise ValueError("the tiles leave part of the image uncovered")
    return [(weight / total[start:end]).astype(np.float32) for (start, end), weight in zip(spans, weights, strict=True)]


def blend_tiles(image: Image.Image, tiles: Sequence[Tile], denoise: Denoise) -> Image.Image:
    """``denoise`` each tile's crop of ``image`` and blend the results back with the tiles' weights."""
    rgb = image.convert("RGB")
    blended = np.zeros((rgb.height, rgb.width, 3), dtype=np.float32)
    for index, tile in enumerate(tiles):
        crop = rgb.crop(tile.box)
        out = denoise(crop, index)
        if out.size != crop.size:
            raise RenderInputError(f"tile {index} came back at {out.size}, not {crop.size}")
        left, top, right, bottom = tile.box
        blended[top:bottom, left:right] += np.asarray(out.convert("RGB"), dtype=np.float32) * tile.weight[..., None]
    return Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8))


def img2img_steps(steps: int, strength: float) -> int:
    """How many denoising steps image-to-image runs: diffusers' ``int(steps × strength)``."""
    return min(int(steps * strength), steps)


def upscale(
    renderer: Renderer,
    image: Image.Image,
    *,
    resolution: int,
    prompt: str,
    seed: int,
    steps: int,
    guidance: float,
    adapter: Personalisation | None = None,
    negative_prompt: str = "",
    strength: float = DEFAULT_STRENGTH,
    on_step: Callable[[int, int], None] | None = None,
) -> Image.Image:
    """``image`` at twice its size (sides rounded down to multiples of 8), re-denoised at ``strength``
    on the renderer's pipeline, with the user's ``adapter`` when given.

    ``resolution`` is the preset's: it sets the tile size and the size cap (`upscaled_size`).
    ``on_step(done, total)`` counts the denoising steps of every tile together; tile ``i`` is seeded
    ``seed + i``.
    """
    if not 0.0 < strength <= 1.0:
        raise RenderInputError(f"strength must lie in (0, 1], got {strength}")
    size = upscaled_size(image.size, resolution)
    enlarged = image.convert("RGB").resize(size, Image.Resampling.LANCZOS)
    if size[0] * size[1] <= resolution**2 * ONE_PASS_SLACK:
        tiles = plan_tiles(size, size, 0)
    else:
        tiles = plan_tiles(size, (min(resolution, size[0]), min(resolution, size[1])), overlap_for(resolution))
    while img2img_steps(steps, strength) < 1:  # at least one step actually runs
        steps += 1
    per_tile = img2img_steps(steps, strength)

    def denoise(crop: Image.Image, index: int) -> Image.Image:
        def progress(done: int, _total: int) -> None:
            if on_step is not None:
                on_step(index * per_tile + min(done, per_tile), len(tiles) * per_tile)

        (out,) = renderer.draw(
            prompt,
            adapter=adapter,
            negative_prompt=negative_prompt,
            seed=seed + index,
            size=crop.size,
            steps=steps,
            guidance=guidance,
            variation_of=crop,
            strength=strength,
            on_step=progress,
        )
        return out

    return blend_tiles(enlarged, tiles, denoise)
