"""Class images for prior preservation: drawn once by the tiny SDXL, then read from the cache."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from engine.train.prior import ClassImagesError, class_images, class_prompt

pytestmark = pytest.mark.slow

SIZE = 64
DRAW = {"resolution": SIZE, "steps": 2}


@dataclass
class Counted:
    """The tiny pipeline with a counter on its UNet's forward."""

    pipe: StableDiffusionXLPipeline
    lock: threading.Lock = field(default_factory=threading.Lock)
    calls: list[int] = field(default_factory=list)


@pytest.fixture(scope="module")
def counted(tiny_preset_dir: Path) -> Iterator[Counted]:
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_preset_dir / "sdxl")
    pipe.set_progress_bar_config(disable=True)
    result = Counted(pipe)
    handle = pipe.unet.register_forward_hook(lambda *_: result.calls.append(1))
    yield result
    handle.remove()


def draws(counted: Counted) -> int:
    count = len(counted.calls)
    counted.calls.clear()
    return count


def pixels(images: list) -> list[np.ndarray]:
    return [np.asarray(image) for image in images]


def test_second_call_reads_the_cache_without_drawing(counted: Counted, tmp_path: Path) -> None:
    draws(counted)
    first = class_images(counted.pipe, counted.lock, "tiny", "person", 2, tmp_path, **DRAW)
    assert draws(counted) == 2 * DRAW["steps"]  # one UNet call per step (guidance batches both halves)

    second = class_images(counted.pipe, counted.lock, "tiny", "person", 2, tmp_path, **DRAW)

    assert draws(counted) == 0
    assert [image.size for image in second] == [(SIZE, SIZE)] * 2
    assert all(np.array_equal(a, b) for a, b in zip(pixels(first), pixels(second), strict=True))
    assert not np.array_equal(*pixels(first)), "every class image should have its own seed"


def test_a_larger_count_draws_only_the_new_images(counted: Counted, tmp_path: Path) -> None:
    first = class_images(counted.pipe, counted.lock, "tiny", "person", 1, tmp_path, **DRAW)
    draws(counted)

    more = class_images(counted.pipe, counted.lock, "tiny", "person", 3, tmp_path, **DRAW)

    assert draws(counted) == 2 * DRAW["steps"]
    assert len(more) == 3 and np.array_equal(pixels(first)[0], pixels(more)[0])


def test_each_base_and_class_word_gets_its_own_images(counted: Counted, tmp_path: Path) -> None:
    class_images(counted.pipe, counted.lock, "tiny", "person", 1, tmp_path, **DRAW)
    draws(counted)
    class_images(counted.pipe, counted.lock, "tiny", "woman", 1, tmp_path, **DRAW)
    class_images(counted.pipe, counted.lock, "other-base", "person", 1, tmp_path, **DRAW)

    assert draws(counted) == 2 * DRAW["steps"]
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 3


def test_the_cache_holds_whole_files_and_a_manifest(counted: Counted, tmp_path: Path) -> None:
    class_images(counted.pipe, counted.lock, "tiny", "person", 2, tmp_path, **DRAW)

    (folder,) = tmp_path.iterdir()
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["00000.png", "00001.png", "manifest.json"]
    assert class_prompt("person") in (folder / "manifest.json").read_text()


def test_class_images_come_from_the_class_prompt(counted: Counted, tmp_path: Path) -> None:
    (cached,) = class_images(counted.pipe, counted.lock, "tiny", "person", 1, tmp_path, **DRAW)
    (direct,) = counted.pipe(
        prompt="a photo of a person",
        num_inference_steps=DRAW["steps"],
        guidance_scale=5.0,
        width=SIZE,
        height=SIZE,
        generator=torch.Generator("cpu").manual_seed(0),
    ).images
    assert np.array_equal(np.asarray(cached), np.asarray(direct))


def test_zero_images_draws_nothing(counted: Counted, tmp_path: Path) -> None:
    draws(counted)
    assert class_images(counted.pipe, counted.lock, "tiny", "person", 0, tmp_path, **DRAW) == []
    assert draws(counted) == 0


@pytest.mark.parametrize(
    "bad", [{"class_word": " "}, {"count": -1}, {"resolution": 60}, {"steps": 0}]
)
def test_bad_requests_are_refused(counted: Counted, tmp_path: Path, bad: dict[str, object]) -> None:
    args: dict[str, object] = {"class_word": "person", "count": 1, **DRAW, **bad}
    with pytest.raises(ClassImagesError):
        class_images(counted.pipe, counted.lock, "tiny", cache_dir=tmp_path, **args)  # type: ignore[arg-type]
