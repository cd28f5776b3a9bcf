"""DreamBooth: a full fine-tune of the resident UNet (SDXL or SD1.5) with prior preservation, as named stages.

1. ``prepare_latents``  instance crops and class images → VAE posteriors, once, under the lock; class
   images in small chunks, as there are hundreds (``engine.train.stages``, shared with LoRA).
2. ``prepare_prompts``  the instance prompt ("a photo of sks person") and the class prompt ("a photo of a
   person"): encoded once by the frozen text encoders, or kept as token ids when the encoders train
   (``engine.train.stages``).
3. ``build_trainable``  float32 deep copies of the UNet (and, opt-in, the text encoders); every weight in
   them trains, and the resident modules keep serving draws.
4. ``dreambooth_step``  instance loss + ``prior_loss_weight`` × class loss, then the optimizer (AdamW, or
   Adafactor where memory is short: ``make_optimizer``), under the lock (``engine.train.stages``).
5. save                 ``DreamBoothOutcome.write``: the trained modules as one weights file
   (``engine.personal.dreambooth.write_weights``, streamed tensor by tensor).

``train_dreambooth`` runs them in order, reports progress after every step and, given a
``CheckpointStore``, checkpoints every ``checkpoint_every`` steps and resumes a killed run from the last one.

Drawing with a trained model (``WeightSwapper``, ``WeightsCache``) is ``engine.personal.dreambooth``'s:
it needs none of this module.
"""

from __future__ import annotations

import copy
import io
import logging
import threading
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING

import torch
from PIL import Image

from engine.personal.dreambooth import write_weights
from engine.progress import ProgressSink
from engine.train.checkpoints import Checkpointing, CheckpointStore
from engine.train.likeness import BestByLikeness, Judge
from engine.train.stages import (
    TrainingInputError,
    TrainingState,
    adamw,
    noise_scheduler_for,
    prepare_latents,
    prepare_prompts,
    remove_adapters,
    run_steps,
    text_encoder_names,
)

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

    from engine.pipelines.base import TextToImagePipeline

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DreamBoothSettings:
    """Hyperparameters of one DreamBooth run. Defaults are for faces on SDXL, 3-10 crops."""

    # HF blog "Training Stable Diffusion with Dreambooth using Diffusers": faces need 800-1200 steps.
    steps: int = 1000
    # Same blog: faces 1e-6..2e-6 (the paper's 5e-6 for SD, fine for objects, overfits faces).
    learning_rate: float = 2e-6
    prior_loss_weight: float = 1.0  # DreamBooth paper (λ = 1) and diffusers' train_dreambooth.py default
    num_class_images: int = 200  # diffusers' train_dreambooth.py default; its docs: 200-300 work well
    class_image_steps: int = 30  # inference steps for drawing them (engine.train.prior.class_images)
    resolution: int = 1024  # SDXL's native size; the photo checks write crops at this size
    batch_size: int = 1  # instance images per step, plus as many class images (diffusers' default)
    seed: int = 0
    weight_decay: float = 1e-2  # diffusers' train_dreambooth.py adam_weight_decay
    max_grad_norm: float = 1.0  # diffusers' training scripts' gradient clipping
    # Opt-in: diffusers' blog finds it helps faces, but it needs more memory and swaps more weights per draw.
    train_text_encoder: bool = False
    # Off by default, as diffusers' --random_flip: a mirrored face loses the asymmetries that make it yours.
    random_flip: bool = False
    gradient_checkpointing: bool = True  # the SDXL UNet's activations at 1024² otherwise crowd out AdamW's state
    mixed_precision: bool = True  # bf16 autocast on a GPU (float32 master weights); ignored on the CPU
    # None: the resident UNet's dtype (float16 on a GPU: half of float32, ~5 GB for SDXL's UNet). What is
    # saved is what a draw swaps in, so a file at another precision than the resident buys nothing.
    save_dtype: torch.dtype | None = None
    checkpoint_every: int = 200  # an SDXL full-UNet checkpoint with AdamW state is ~30 GB: not too often
    # "adamw" (the DreamBooth paper's and diffusers' optimizer: 8 bytes of state per weight, ~20 GB for
    # SDXL's UNet) or "adafactor" (transformers' Adafactor: factored second moments, no first moment, so
    # its state is a few MB; pure PyTorch, so it runs on every device the engine does). See docs/memory.md.
    optimizer: str = "adamw"
    likeness_every: int | None = None  # as LoraTrainSettings: judged at every checkpoint by default
    likeness_steps: int = 20

    def check(self) -> None:
        """Raise ``TrainingInputError`` naming the first setting that cannot work."""
        if self.steps < 1:
            raise TrainingInputError(f"steps must be at least 1, got {self.steps}")
        if not self.learning_rate > 0:
            raise TrainingInputError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.prior_loss_weight < 0:
            raise TrainingInputError(f"prior_loss_weight must not be negative, got {self.prior_loss_weight}")
        if self.resolution < 8 or self.resolution % 8:
            raise TrainingInputError(f"resolution must be a positive multiple of 8, got {self.resolution}")
        if self.batch_size < 1:
            raise TrainingInputError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.checkpoint_every < 1:
            raise TrainingInputError(f"checkpoint_every must be at least 1, got {self.checkpoint_every}")
        if self.optimizer not in OPTIMIZERS:
            raise TrainingInputError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")

    @property
    def with_prior(self) -> bool:
        """Whether the class loss is part of training (a weight of 0 skips class images altogether)."""
        return self.prior_loss_weight > 0


OPTIMIZERS = ("adamw", "adafactor")
"""``DreamBoothSettings.optimizer`` values (config.toml ``[training] dreambooth_optimizer``)."""


@dataclass(frozen=True, eq=False)
class DreamBoothOutcome:
    """What a finished run produced: the trained modules (written out by ``write``), the last step's
    loss, steps run."""

    modules: dict[str, torch.nn.Module]  # "unet" and, when they trained, the text encoders
    dtype: torch.dtype  # what the file stores floating-point tensors in
    final_loss: float
    steps: int

    def write(self, file: IO[bytes]) -> None:
        """Stream the weights file into ``file`` (e.g. ``BlobStore.put_written``)."""
        write_weights(self.modules, file, self.dtype)

    @property
    def weights(self) -> bytes:
        """The whole weights file in memory: for small (tiny) models and tests; the worker streams."""
        buffer = io.BytesIO()
        self.write(buffer)
        return buffer.getvalue()


@dataclass(eq=False)
class DreamBoothState(TrainingState):
    """A DreamBooth run's ``TrainingState`` (its ``text_encoders`` are full copies when they train)."""


# --- stage 3: the trainable copies -------------------------------------------------------------------


def build_trainable(
    pipe: TextToImagePipeline, lock: threading.Lock, settings: DreamBoothSettings
) -> tuple[UNet2DConditionModel, dict[str, torch.nn.Module]]:
    """Float32 deep copies of the UNet (and, opt-in, the text encoders), every weight trainable.

    LoRA adapters the renderer loaded into the resident modules are left out of the copies.
    """
    names = text_encoder_names(pipe) if settings.train_text_encoder else []
    with lock:
        unet = copy.deepcopy(pipe.unet)
        encoders = {name: copy.deepcopy(getattr(pipe, name)) for name in names}
    for module in (unet, *encoders.values()):
        remove_adapters(module)
        module.float().requires_grad_(True).train()
    if settings.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for encoder in encoders.values():
            encoder.gradient_checkpointing_enable()
    return unet, encoders


def start_training(
    unet: UNet2DConditionModel, encoders: dict[str, torch.nn.Module], settings: DreamBoothSettings
) -> DreamBoothState:
    """A fresh ``DreamBoothState``: the optimizer over every weight of the copies, the seeded RNG, step 0."""
    modules: list[torch.nn.Module] = [unet, *encoders.values()]
    params = [p for module in modules for p in module.parameters()]
    generator = torch.Generator("cpu").manual_seed(settings.seed)
    return DreamBoothState(
        unet=unet, optimizer=make_optimizer(params, settings), generator=generator, text_encoders=encoders
    )


def make_optimizer(params: list[torch.nn.Parameter], settings: DreamBoothSettings) -> torch.optim.Optimizer:
    """AdamW, or Adafactor at the same fixed learning rate and weight decay.

    Adafactor as transformers' docs give it for a fixed learning rate: no relative step, no parameter
    scaling, no warm-up; ``beta1=None`` keeps no first moment, which is where most of its saving is.
    """
    if settings.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(  # type: ignore[no-any-return]
            params, lr=settings.learning_rate, weight_decay=settings.weight_decay,
            scale_parameter=False, relative_step=False, warmup_init=False, beta1=None,
        )
    return adamw(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)


# --- the run -------------------------------------------------------------------------------------------


def train_dreambooth(
    pipe: TextToImagePipeline,
    lock: threading.Lock,
    crops: list[Image.Image],
    token: str,
    class_word: str,
    class_images: list[Image.Image],
    settings: DreamBoothSettings,
    on_progress: ProgressSink | None = None,
    *,
    checkpoints: CheckpointStore | None = None,
    likeness: Judge | None = None,
) -> DreamBoothOutcome:
    """Fine-tune the UNet for one user on ``crops`` and return the weights file's bytes.

    ``class_images`` come from ``engine.train.prior.class_images`` (unused when ``prior_loss_weight`` is 0).
    ``pipe`` is the resident pipeline: its modules are only read (copied), under ``lock``. With
    ``checkpoints``, the run resumes from the job's newest checkpoint and saves one every
    ``settings.checkpoint_every`` steps; the caller clears them once the weights are stored. With
    ``likeness`` the weights kept are those whose drawings it scored best (``engine.train.likeness``).
    """
    settings.check()
    latents = prepare_latents(pipe, lock, crops, class_images, settings)
    prompts = prepare_prompts(pipe, lock, token, class_word, settings)
    state = start_training(*build_trainable(pipe, lock, settings), settings)
    checkpointing = None if checkpoints is None else Checkpointing(checkpoints, settings.checkpoint_every)
    if checkpointing is not None:
        checkpointing.resume(state, state.modules())
    _log.info("DreamBooth: %d crops, %d steps from step %d", len(crops), settings.steps, state.step)
    # The loop is LoRA's too (training_stages.run_steps): the same stages, with the prior loss in each step.
    best = BestByLikeness.for_run(pipe, lock, likeness, f"{token} {class_word}", settings)
    loss = run_steps(state, latents, prompts, noise_scheduler_for(pipe), lock, settings, on_progress, checkpointing, best)
    return DreamBoothOutcome(state.modules(), settings.save_dtype or pipe.unet.dtype, loss, state.step)
