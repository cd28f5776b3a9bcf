"""2× upscaling (engine.render.upscale): the tiling and blending on their own, then real runs on the
tiny preset through the renderer and through the worker's ``do_draw``."""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image

from engine.api import ASPECT_RATIOS, DrawRequest, ErrorCode
from engine.render.renderer import Renderer, RenderInputError
from engine.render.upscale import (
    MAX_SCALE,
    Tile,
    blend_tiles,
    img2img_steps,
    overlap_for,
    plan_tiles,
    upscale,
    upscaled_size,
)
from engine.worker import WorkerContext, aspect_size, do_draw, draw
from tests.support import png

PROMPT = "a photo of a person"


def astronaut(side: int) -> Image.Image:
    """A real photo (scikit-image's astronaut) at ``side``² pixels."""
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((side, side), Image.Resampling.LANCZOS)  # type: ignore[no-untyped-call]


def coverage(size: tuple[int, int], tiles: Sequence[Tile]) -> np.ndarray:
    total = np.zeros((size[1], size[0]), dtype=np.float64)
    for tile in tiles:
        left, top, right, bottom = tile.box
        total[top:bottom, left:right] += tile.weight
    return total


# --- the tiling and blending, without a model ------------------------------------------------------

REAL_SIZES = [
    (resolution, upscaled_size(aspect_size(aspect, resolution, multiple), resolution))
    for resolution, multiple in ((1024, 64), (512, 64), (128, 8))
    for aspect in ASPECT_RATIOS
]


@pytest.mark.parametrize(("resolution", "size"), REAL_SIZES, ids=[f"{r}-{w}x{h}" for r, (w, h) in REAL_SIZES])
def test_tiles_cover_the_image_overlap_enough_and_their_weights_sum_to_one(
    resolution: int, size: tuple[int, int]
) -> None:
    tile = (min(resolution, size[0]), min(resolution, size[1]))
    overlap = overlap_for(resolution)
    tiles = plan_tiles(size, tile, overlap)

    assert len(tiles) > 1  # a drawn image's 2× is always larger than one tile
    for t in tiles:
        left, top, right, bottom = t.box
        assert 0 <= left < right <= size[0] and 0 <= top < bottom <= size[1]
        assert (right - left, bottom - top) == tile  # every tile is the size the base draws
        assert (right - left) % 8 == 0 and (bottom - top) % 8 == 0
        assert t.weight.shape == (bottom - top, right - left)
        assert t.weight.min() > 0
    for axis in (0, 1):  # neighbours along each axis share at least the overlap
        starts = sorted({t.box[axis] for t in tiles})
        ends = sorted({t.box[axis + 2] for t in tiles})
        assert starts[0] == 0 and ends[-1] == size[axis]
        assert all(end - start >= overlap for start, end in zip(starts[1:], ends[:-1]))
    assert np.allclose(coverage(size, tiles), 1.0, atol=1e-5)


def test_tile_plans_for_odd_sizes_still_cover_with_weights_summing_to_one() -> None:
    for size, tile, overlap in (((336, 192), (128, 128), 16), ((129, 300), (64, 64), 8), ((200, 200), (128, 128), 64)):
        assert np.allclose(coverage(size, plan_tiles(size, tile, overlap)), 1.0, atol=1e-5), size
    (whole,) = plan_tiles((100, 60), (100, 60), 0)  # the one-pass plan
    assert whole.box == (0, 0, 100, 60) and np.all(whole.weight == 1.0)
    with pytest.raises(ValueError, match="overlap"):
        plan_tiles((300, 300), (64, 64), 64)


def test_an_identity_denoiser_gives_back_the_enlarged_image() -> None:
    enlarged = astronaut(128).resize((336, 256), Image.Resampling.LANCZOS)
    tiles = plan_tiles(enlarged.size, (128, 128), 16)
    calls: list[int] = []

    def identity(crop: Image.Image, index: int) -> Image.Image:
        calls.append(index)
        return crop.copy()

    out = blend_tiles(enlarged, tiles, identity)
    assert calls == list(range(len(tiles)))
    difference = np.abs(np.asarray(out, dtype=np.int16) - np.asarray(enlarged, dtype=np.int16))
    assert difference.max() <= 1  # within 1/255


def test_feathered_blending_leaves_no_seam_where_a_pasted_tile_would() -> None:
    """Each tile comes back a flat grey of its own: blended, neighbouring pixels change gradually across
    each overlap; pasting the tiles (every weight 1 where the tile is last) jumps at the edge."""
    size, tile, overlap = (256, 128), (128, 128), 32
    tiles = plan_tiles(size, tile, overlap)
    shades = [40 + 120 * (i % 2) for i in range(len(tiles))]  # 40, 160, 40: a step of 120 per edge

    def flat(crop: Image.Image, index: int) -> Image.Image:
        return Image.new("RGB", crop.size, (shades[index],) * 3)

    blended = np.asarray(blend_tiles(Image.new("RGB", size), tiles, flat), dtype=np.int16)[..., 0]
    steps = np.abs(np.diff(blended, axis=1))
    assert steps.max() <= 120 / overlap + 1  # a ramp, never a jump

    pasted = np.zeros_like(blended)
    for t, shade in zip(tiles, shades):
        pasted[t.box[1] : t.box[3], t.box[0] : t.box[2]] = shade
    assert np.abs(np.diff(pasted, axis=1)).max() == 120  # what the test would catch


def test_the_upscaled_size_is_twice_in_multiples_of_8_and_capped() -> None:
    assert upscaled_size((128, 128), 128) == (256, 256)
    assert upscaled_size((96, 172), 128) == (192, 344)
    assert upscaled_size((1023, 1024), 1024) == (2040, 2048)  # rounded down to multiples of 8
    assert upscaled_size((2048, 2048), 1024) == (4096, 4096)  # a second upscale of a drawn image
    with pytest.raises(RenderInputError, match="limit"):
        upscaled_size((4096, 4096), 1024)  # a third one: beyond MAX_SCALE
    with pytest.raises(RenderInputError, match="too small"):
        upscaled_size((3, 40), 128)
    assert MAX_SCALE == 4
    assert [overlap_for(r) for r in (1024, 512, 128)] == [128, 64, 16]
    assert img2img_steps(30, 0.3) == 9 and img2img_steps(4, 0.3) == 1


# --- real runs on the tiny preset ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe(tiny_preset_dir: Path) -> Any:
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_preset_dir / "sdxl")  # type: ignore[no-untyped-call]
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def renderer(pipe: Any) -> Renderer:
    return Renderer(pipe, threading.Lock())


def vae_round_trip(pipe: Any, seed: int) -> Callable[[Image.Image, int], Image.Image]:
    """Tile ``i`` encoded and decoded by the pipeline's VAE, its latent sampled with the generator the
    renderer seeds for that tile: what image-to-image gives back as its strength goes to 0."""

    def denoise(crop: Image.Image, index: int) -> Image.Image:
        generator = torch.Generator("cpu").manual_seed(seed + index)
        with torch.no_grad():
            latents = pipe.vae.encode(pipe.image_processor.preprocess(crop)).latent_dist.sample(generator)
            decoded = pipe.vae.decode(latents).sample
        image: Image.Image = pipe.image_processor.postprocess(decoded)[0]
        return image

    return denoise


@pytest.mark.slow
def test_a_tiled_upscale_is_twice_the_size_and_starts_from_the_enlarged_image(
    pipe: Any, renderer: Renderer
) -> None:
    # The tiny VAE has random weights: it does not give pixels back, so "close to the Lanczos image"
    # is measured against that image passed through the same VAE, tile by tile (another code path).
    source = astronaut(128)
    enlarged = source.resize((256, 256), Image.Resampling.LANCZOS)
    tiles = plan_tiles((256, 256), (128, 128), overlap_for(128))
    reference = np.asarray(blend_tiles(enlarged, tiles, vae_round_trip(pipe, seed=7)), dtype=np.float32)
    seen: list[tuple[int, int]] = []

    def run(strength: float, steps: int) -> np.ndarray:
        image = upscale(
            renderer, source, resolution=128, prompt=PROMPT, seed=7, steps=steps, guidance=5.0,
            strength=strength, on_step=lambda done, total: seen.append((done, total)),
        )
        assert image.size == (256, 256)  # exactly 2×
        return np.asarray(image, dtype=np.float32)

    low = run(0.05, 20)  # one step per tile, from barely noised latents
    assert seen == [(n, len(tiles)) for n in range(1, len(tiles) + 1)]  # every tile's step, counted together
    high = run(1.0, 2)  # redrawn from noise
    distance_low = np.abs(low - reference).mean()
    distance_high = np.abs(high - reference).mean()
    assert distance_low < 0.8 * distance_high, (distance_low, distance_high)
    assert np.abs(low - high).mean() > 5


@pytest.mark.slow
def test_a_small_image_is_upscaled_in_one_pass(renderer: Renderer) -> None:
    seen: list[tuple[int, int]] = []
    image = upscale(
        renderer, astronaut(64), resolution=128, prompt=PROMPT, seed=1, steps=4, guidance=5.0,
        on_step=lambda done, total: seen.append((done, total)),
    )
    assert image.size == (128, 128)
    assert seen == [(1, 1)]  # one draw: 4 steps at strength 0.3 run one


# --- through the worker --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app(tiny_preset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerContext]:
    from engine.settings import EngineSettings

    settings = EngineSettings(
        preset="tiny", models_dir=tiny_preset_dir.parent, blobs_dir=tmp_path_factory.mktemp("blobs"),
        redis_url="redis://unused", device="cpu",
    )
    yield WorkerContext.load(settings)


@pytest.mark.slow
def test_do_draw_upscales_the_named_image_and_stores_it_as_the_owners(app: WorkerContext) -> None:
    key = app.blobs.put("u1", "images", png(astronaut(128)), ".png")
    result = do_draw(app, DrawRequest("up-1", "u1", "me as an astronaut", [], class_word="woman", upscale_of=key))

    (stored,) = result.image_keys
    assert stored.startswith("u1/images/") and stored != key
    assert result.prompt_used == "a woman as an astronaut"
    assert result.scores == [None]  # no enrolled face given: nothing to compare with
    with Image.open(io.BytesIO(app.blobs.get(stored))) as image:
        assert image.size == (256, 256)


@pytest.mark.slow
def test_the_worker_refuses_an_upscale_of_a_foreign_or_oversized_image(app: WorkerContext) -> None:
    theirs = app.blobs.put("u2", "images", png(astronaut(128)), ".png")
    huge = app.blobs.put("u1", "images", png(Image.new("RGB", (600, 600))), ".png")  # 1200² > (4 × 128)²
    before = sorted(app.blobs.root.rglob("*"))

    def run(key: str) -> dict[str, object]:
        payload = DrawRequest("up-2", "u1", "me", [], upscale_of=key).to_dict()
        return asyncio.run(draw({"app": app}, payload))

    foreign = run(theirs)
    assert foreign["failed"] and foreign["code"] == ErrorCode.INVALID_REQUEST
    assert "upscale_of" in str(foreign["detail"])
    oversized = run(huge)
    assert oversized["failed"] and oversized["code"] == ErrorCode.INVALID_REQUEST
    assert "limit" in str(oversized["detail"])
    assert sorted(app.blobs.root.rglob("*")) == before  # nothing was drawn or stored
