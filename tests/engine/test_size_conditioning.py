"""SDXL's original_size in training is each crop's source side, row by row, for every method.

SDXL was trained told each image's size before it was resized (the SDXL paper's size conditioning):
a face cut from a 150-pixel square and upscaled must not be presented as a sharp native-size image.
These tests watch the time ids the UNet's ``add_time_proj`` receives during real training steps on the
tiny SDXL.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image

from engine.api import CROP_SOURCE_SIDE_KEY
from engine.train.prior import class_images
from engine.train.dreambooth import (
    DreamBoothSettings,
    build_trainable as build_dreambooth,
    start_training as start_dreambooth,
)
from engine.train.lora import LoraTrainSettings, build_trainable, start_training, train_lora
from engine.train.ti import TiTrainSettings, train_textual_inversion
from engine.train.stages import (
    crop_source_side,
    dreambooth_step,
    encode_crops,
    noise_scheduler_for,
    prepare_latents,
    prepare_prompts,
    sample_batch,
)
from tests.support import noise_crops

pytestmark = pytest.mark.slow

SIZE = 64
SIDES = (150, 400, 900)  # three crops' source sides, all different from the training resolution
CROPS_SIZES = {(float(s), float(s)) for s in SIDES}
TARGET = [0.0, 0.0, float(SIZE), float(SIZE)]  # crop top-left and target size, as before
LORA = LoraTrainSettings(steps=6, rank=2, alpha=2, learning_rate=1e-2, resolution=SIZE, batch_size=2,
                         random_flip=True)


@pytest.fixture(scope="module")
def pipe(tiny_preset_dir: Path) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_preset_dir / "sdxl")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sized_crops() -> list[Image.Image]:
    """Crops as a stored crop PNG reads back: each with its source side in its info."""
    crops = noise_crops(len(SIDES), size=SIZE)
    for crop, side in zip(crops, SIDES, strict=True):
        crop.info[CROP_SOURCE_SIDE_KEY] = str(side)
    return crops


@contextmanager
def time_ids_seen(unet: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Every time-ids batch ``unet`` embeds inside the block, as [batch, 6] (add_time_proj gets them flat)."""
    seen: list[torch.Tensor] = []
    handle = unet.add_time_proj.register_forward_pre_hook(
        lambda _module, args: seen.append(args[0].detach().reshape(-1, 6).cpu().clone())
    )
    try:
        yield seen
    finally:
        handle.remove()


def original_sizes(seen: list[torch.Tensor]) -> set[tuple[float, float]]:
    return {(float(row[0]), float(row[1])) for batch in seen for row in batch}


def assert_targets_unchanged(seen: list[torch.Tensor]) -> None:
    assert seen, "the UNet was never given time ids"
    assert all(batch[:, 2:].tolist() == [TARGET] * batch.shape[0] for batch in seen)


def test_a_crop_reads_its_source_side_and_older_crops_count_as_the_resolution() -> None:
    (crop,) = sized_crops()[:1]
    assert crop_source_side(crop, SIZE) == SIDES[0]
    assert crop_source_side(noise_crops(1, size=SIZE)[0], SIZE) == SIZE


def test_flipped_rows_share_their_crops_size_and_sampled_rows_keep_their_own(
    pipe: StableDiffusionXLPipeline,
) -> None:
    lock = threading.Lock()
    latents = encode_crops(pipe, lock, sized_crops(), SIZE, flip=True)
    assert latents.original_sizes is not None
    assert latents.original_sizes[:, 0].tolist() == [float(s) for s in SIDES * 2]  # crops, then their flips

    # Rows told apart by their means (std 0): each sampled latent must come with its own row's size.
    rows = latents.mean.shape[0]
    marked = replace(latents, mean=torch.arange(rows, dtype=torch.float32).view(rows, 1, 1, 1).expand_as(latents.mean),
                     std=torch.zeros_like(latents.std))
    state = start_training(build_trainable(pipe, lock, LORA), LORA)
    for _ in range(5):
        batch = sample_batch(state, marked, noise_scheduler_for(pipe), 4)
        picked = batch.clean[:, 0, 0, 0].long()
        assert batch.original_sizes is not None
        assert torch.equal(batch.original_sizes, latents.original_sizes[picked])


def test_lora_steps_give_each_row_its_crops_size_and_class_rows_the_resolution(
    pipe: StableDiffusionXLPipeline, tmp_path: Path
) -> None:
    lock = threading.Lock()
    classes = class_images(pipe, lock, "tiny", "person", 2, tmp_path, resolution=SIZE, steps=1)
    state = start_training(build_trainable(pipe, lock, LORA), LORA)
    with time_ids_seen(state.unet) as seen:
        train_lora(pipe, lock, sized_crops(), "sks", "person", LORA, class_images=classes, state=state)

    assert_targets_unchanged(seen)
    instance, prior = seen[0::2], seen[1::2]  # each step: the instance batch, then the class batch
    assert len(instance) == len(prior) == LORA.steps
    assert original_sizes(instance) <= CROPS_SIZES and len(original_sizes(instance)) > 1
    assert original_sizes(prior) == {(float(SIZE), float(SIZE))}  # class images are drawn at the resolution


@pytest.mark.parametrize("train_text_encoder", [False, True], ids=["frozen-encoders", "trained-encoders"])
def test_dreambooth_steps_give_each_row_its_crops_size(
    pipe: StableDiffusionXLPipeline, train_text_encoder: bool
) -> None:
    lock = threading.Lock()
    settings = DreamBoothSettings(steps=4, resolution=SIZE, batch_size=2, prior_loss_weight=0.0,
                                  gradient_checkpointing=False, train_text_encoder=train_text_encoder)
    latents = prepare_latents(pipe, lock, sized_crops(), [], settings)
    prompts = prepare_prompts(pipe, lock, "sks", "person", settings)
    state = start_dreambooth(*build_dreambooth(pipe, lock, settings), settings)
    scheduler = noise_scheduler_for(pipe)
    with time_ids_seen(state.unet) as seen:
        for _ in range(settings.steps):
            dreambooth_step(state, latents, prompts, scheduler, lock, settings)

    assert_targets_unchanged(seen)
    assert original_sizes(seen) <= CROPS_SIZES and len(original_sizes(seen)) > 1


def test_textual_inversion_steps_give_each_row_its_crops_size(pipe: StableDiffusionXLPipeline) -> None:
    settings = TiTrainSettings(steps=4, batch_size=2, resolution=SIZE, seed=0)
    with time_ids_seen(pipe.unet) as seen:  # TI trains through the resident UNet itself
        train_textual_inversion(pipe, threading.Lock(), sized_crops(), "<u9>", "person", settings)

    assert_targets_unchanged(seen)
    assert original_sizes(seen) <= CROPS_SIZES and len(original_sizes(seen)) > 1
