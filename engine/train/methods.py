"""One entry point for the three personal-model methods, with each preset's defaults.

LoRA (``engine.train.lora``), Textual Inversion (``engine.train.ti``) and DreamBooth
(``engine.train.dreambooth``) keep their own loops; this module picks one, fills in its settings from
the preset, and gives each run a checkpoint store so a killed job resumes instead of starting over.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, TypeVar

from PIL import Image

from engine.api import TrainingMethod
from engine.train.checkpoints import CheckpointStore
from engine.errors import EngineError
from engine.train.likeness import Judge
from engine.train.memory import TrainingShape
from engine.presets import FAMILY_SDXL, Preset
from engine.train.prior import class_images
from engine.progress import ProgressSink
from engine.train.dreambooth import DreamBoothSettings, train_dreambooth
from engine.train.lora import LoraTrainSettings, train_lora
from engine.train.ti import TiTrainSettings, train_textual_inversion

if TYPE_CHECKING:
    from engine.pipelines.base import TextToImagePipeline


class UnknownTrainingMethod(EngineError):
    """A method name the engine does not train."""


@dataclass(frozen=True)
class TrainedModel:
    write: Callable[[IO[bytes]], object]  # writes the weights file (streamed for DreamBooth's gigabytes)
    token: str  # the word that stands for the user in prompts (TI learns its own, e.g. "<u7>")
    steps: int
    final_loss: float


def _bytes_writer(data: bytes) -> Callable[[IO[bytes]], object]:
    return lambda file: file.write(data)


@dataclass(frozen=True)
class TrainingRun:
    """Everything one training job needs besides its crops."""

    pipe: TextToImagePipeline
    lock: threading.Lock
    preset: Preset
    checkpoints: CheckpointStore
    class_image_cache: Path
    seed: int
    steps: int | None = None  # None: the preset's default for the method
    random_flip: bool = False  # config.toml [training]; see engine.settings.EngineSettings
    train_text_encoder: bool = False
    gradient_checkpointing: bool | None = None  # None: on for full-size SDXL, off otherwise
    dreambooth_optimizer: str = "adamw"  # or "adafactor" (engine.train.dreambooth.make_optimizer)
    likeness: Judge | None = None  # keep the best-looking checkpoint (every method): engine.train.likeness
    class_images: int | None = None  # prior-preservation images; None: the method's default, 0: no prior


_Prior = TypeVar("_Prior", LoraTrainSettings, DreamBoothSettings)


def ti_token_for(owner: str) -> str:
    """A per-user word no tokenizer knows (TI adds it as a new token; it must be lower-case)."""
    return f"<{owner.lower()}>"


def train_personal_model(
    run: TrainingRun,
    method: str,
    crops: list[Image.Image],
    token: str,
    class_word: str,
    on_progress: ProgressSink,
    owner: str,
) -> TrainedModel:
    """Train ``method`` on ``crops``; the result's ``token`` is what "me" becomes in later prompts."""
    if method == TrainingMethod.LORA:
        lora_settings = lora_settings_for(run)
        lora = train_lora(
            run.pipe, run.lock, crops, token, class_word, lora_settings, on_progress,
            class_images=prior_images_for(run, class_word, lora_settings),
            checkpoints=run.checkpoints, likeness=run.likeness,
        )
        return TrainedModel(_bytes_writer(lora.weights), token, lora.steps, lora.final_loss)
    if method == TrainingMethod.TEXTUAL_INVERSION:
        word = ti_token_for(owner)
        ti = train_textual_inversion(
            run.pipe, run.lock, crops, word, class_word, ti_settings_for(run), on_progress,
            checkpoints=run.checkpoints, likeness=run.likeness,
        )
        return TrainedModel(_bytes_writer(ti.weights), word, ti.steps, ti.final_loss)
    if method == TrainingMethod.DREAMBOOTH:
        settings = dreambooth_settings_for(run)
        priors = prior_images_for(run, class_word, settings)
        booth = train_dreambooth(
            run.pipe, run.lock, crops, token, class_word, priors, settings, on_progress,
            checkpoints=run.checkpoints, likeness=run.likeness,
        )
        return TrainedModel(booth.write, token, booth.steps, booth.final_loss)
    raise UnknownTrainingMethod(f"unknown training method {method!r}; use lora, ti or dreambooth")


def memory_shape(run: TrainingRun, method: str) -> TrainingShape:
    """What ``engine.train.memory`` needs to estimate a ``method`` run with ``run``'s settings."""
    if method == TrainingMethod.LORA:
        lora = lora_settings_for(run)
        return TrainingShape(
            method, lora.resolution, lora.batch_size, lora.with_prior, lora.gradient_checkpointing,
            lora.train_text_encoder, lora.rank, tuple(lora.target_modules),
        )
    if method == TrainingMethod.TEXTUAL_INVERSION:
        ti = ti_settings_for(run)
        return TrainingShape(method, ti.resolution or run.preset.resolution, ti.batch_size)
    if method == TrainingMethod.DREAMBOOTH:
        booth = dreambooth_settings_for(run)
        return TrainingShape(
            method, booth.resolution, booth.batch_size, booth.with_prior, booth.gradient_checkpointing,
            booth.train_text_encoder, optimizer=booth.optimizer,
        )
    raise UnknownTrainingMethod(f"unknown training method {method!r}; use lora, ti or dreambooth")


def prior_images_for(
    run: TrainingRun, class_word: str, settings: LoraTrainSettings | DreamBoothSettings
) -> list[Image.Image]:
    """The base's class images for prior preservation, drawn once per base and class word and cached.

    LoRA and DreamBooth share the cache: a set's image ``i`` is the same whoever asks first.
    """
    if settings.prior_loss_weight <= 0:
        return []
    return class_images(
        run.pipe, run.lock, f"{run.preset.name}:{run.preset.pipeline_dir}", class_word,
        settings.num_class_images, run.class_image_cache,
        resolution=settings.resolution, steps=settings.class_image_steps,
    )


def _checkpointing(run: TrainingRun) -> bool:
    """config.toml's choice, else on for full-size SDXL: at 1024² its UNet's activations fill the card."""
    if run.gradient_checkpointing is not None:
        return run.gradient_checkpointing
    return run.preset.family == FAMILY_SDXL and not run.preset.is_tiny


def lora_settings_for(run: TrainingRun) -> LoraTrainSettings:
    """The preset's LoRA defaults; the crops are written at the preset's resolution."""
    preset = run.preset
    settings = LoraTrainSettings(
        steps=run.steps or preset.train_steps,
        rank=preset.train_rank,
        alpha=preset.train_rank,
        learning_rate=preset.train_lr,
        resolution=preset.resolution,
        seed=run.seed,
        random_flip=run.random_flip,
        train_text_encoder=run.train_text_encoder,
        gradient_checkpointing=_checkpointing(run),
    )
    if preset.is_tiny:  # two quickly drawn class images: the prior loss runs, tests stay fast
        settings = replace(settings, num_class_images=2, class_image_steps=preset.inference_steps,
                           likeness_steps=preset.inference_steps)
    return _with_class_images(settings, run)


def _with_class_images(settings: _Prior, run: TrainingRun) -> _Prior:
    """``settings`` with ``run.class_images`` prior images when it is set (0: no prior preservation)."""
    if run.class_images is None:
        return settings
    if run.class_images == 0:
        return replace(settings, prior_loss_weight=0.0)
    return replace(settings, num_class_images=run.class_images)


def ti_settings_for(run: TrainingRun) -> TiTrainSettings:
    """TI's own defaults (engine.train.ti cites them); the tiny presets train as few steps as LoRA."""
    defaults = TiTrainSettings()
    steps = run.steps or (run.preset.train_steps if run.preset.is_tiny else defaults.steps)
    settings = TiTrainSettings(steps=steps, resolution=run.preset.resolution, seed=run.seed,
                               random_flip=run.random_flip)
    return replace(settings, likeness_steps=run.preset.inference_steps) if run.preset.is_tiny else settings


def dreambooth_settings_for(run: TrainingRun) -> DreamBoothSettings:
    """DreamBooth's own defaults (engine.train.dreambooth cites them), scaled down for tiny presets."""
    preset = run.preset
    switches = {
        "random_flip": run.random_flip, "train_text_encoder": run.train_text_encoder,
        "optimizer": run.dreambooth_optimizer,
    }
    if preset.is_tiny:
        return _with_class_images(DreamBoothSettings(
            steps=run.steps or preset.train_steps,
            learning_rate=1e-4,  # random tiny weights: a visible change within a few steps
            num_class_images=2,
            class_image_steps=preset.inference_steps,
            likeness_steps=preset.inference_steps,
            resolution=preset.resolution,
            seed=run.seed,
            gradient_checkpointing=bool(run.gradient_checkpointing),
            **switches,
        ), run)
    defaults = DreamBoothSettings()
    return _with_class_images(DreamBoothSettings(
        steps=run.steps or defaults.steps, resolution=preset.resolution, seed=run.seed,
        gradient_checkpointing=True if run.gradient_checkpointing is None else run.gradient_checkpointing,
        **switches,
    ), run)
