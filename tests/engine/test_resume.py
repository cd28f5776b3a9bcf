"""A training job killed after a checkpoint resumes from it (arq runs the job again): LoRA and TI.

DreamBooth's own resume test lives in test_train_dreambooth.py; the checkpoint store's in
test_checkpoints.py. Here the real training functions run on the tiny SDXL with a real blob store.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors.torch
import torch
from diffusers import StableDiffusionXLPipeline

from engine.train.checkpoints import CheckpointStore
from engine.progress import TrainingProgress
from engine.train.lora import LoraTrainSettings, train_lora
from engine.train.ti import TiTrainSettings, train_textual_inversion
from storage.blobs import LocalBlobStore
from tests.support import noise_crops

pytestmark = pytest.mark.slow
SIZE = 64
STEPS = 6


class Killed(Exception):
    """The worker died (what arq sees as a job to run again)."""


@pytest.fixture(scope="module")
def pipe(tiny_preset_dir: Path) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_preset_dir / "sdxl")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def lora(pipe: StableDiffusionXLPipeline, store: CheckpointStore | None, sink: Callable[[TrainingProgress], None]) -> bytes:
    settings = LoraTrainSettings(steps=STEPS, rank=2, alpha=2, learning_rate=1e-2, resolution=SIZE, checkpoint_every=2)
    return train_lora(pipe, threading.Lock(), noise_crops(), "sks", "person", settings, sink, checkpoints=store).weights


def ti(pipe: StableDiffusionXLPipeline, store: CheckpointStore | None, sink: Callable[[TrainingProgress], None]) -> bytes:
    settings = TiTrainSettings(steps=STEPS, resolution=SIZE, vectors_per_token=1, checkpoint_every=2)
    return train_textual_inversion(pipe, threading.Lock(), noise_crops(), "<u1>", "person", settings, sink, checkpoints=store).weights


@pytest.mark.parametrize("train", [lora, ti], ids=["lora", "ti"])
def test_a_killed_run_resumes_from_its_checkpoint_and_ends_as_if_never_killed(
    pipe: StableDiffusionXLPipeline, tmp_path: Path, train: Callable[..., bytes]
) -> None:
    uninterrupted = train(pipe, None, lambda _: None)

    store = CheckpointStore(LocalBlobStore(tmp_path / "blobs"), "u1", "train-7")

    def die_at_step_5(progress: TrainingProgress) -> None:
        if progress.step == 5:
            raise Killed()

    with pytest.raises(Killed):
        train(pipe, store, die_at_step_5)
    assert store.load_latest() is not None

    steps: list[int] = []
    resumed = train(pipe, store, lambda p: steps.append(p.step))

    assert steps == [5, 6]  # from the checkpoint at step 4, not from step 1
    assert tensors(resumed).keys() == tensors(uninterrupted).keys()
    assert all(torch.equal(t, tensors(uninterrupted)[k]) for k, t in tensors(resumed).items())


def tensors(weights: bytes) -> dict[str, torch.Tensor]:
    return safetensors.torch.load(weights)
