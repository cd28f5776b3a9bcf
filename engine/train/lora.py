"""DreamBooth-LoRA training on the resident pipeline's UNet (SDXL or SD1.5), as named stages.

1. data and 2. frozen encoders: ``engine.train.stages``' ``prepare_latents`` (the crops' VAE
   posteriors, and the class images' with ``engine.train.prior.class_images``) and ``prepare_prompts`` (the
   instance prompt, and the class prompt), shared with DreamBooth.
3. ``build_trainable``  a deep copy of the UNet with a LoRA adapter (and, opt-in,
   ``build_trainable_text_encoders``: copies of the text encoders with their own); only the adapters
   train, so the resident modules keep serving draws while a user's model trains.
4. ``training_step``    one step under the lock: instance loss + ``prior_loss_weight`` × class loss
   (``engine.train.stages.dreambooth_step``: DreamBooth-LoRA is DreamBooth's loss on a LoRA).
5. ``save_lora``        the adapters as one diffusers-format LoRA safetensors file's bytes
   (``engine.personal.lora``, where the format lives).

``train_lora`` runs them in order (the loop is ``engine.train.stages.run_steps``). The lock is the
one that guards the GPU and the resident modules: it is taken per stage and per step, so interactive
draws interleave with training.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from PIL import Image

from engine.personal.lora import save_lora
from engine.progress import ProgressSink
from engine.train.checkpoints import Checkpointing, CheckpointStore
from engine.train.likeness import BestByLikeness, Judge
from engine.train.stages import (
    FixedPrompts,
    InstanceLatents,
    PromptConditioning,
    StepPrompts,
    TrainingInputError,
    TrainingLatents,
    TrainingState,
    adamw,
    dreambooth_step,
    noise_scheduler_for,
    prepare_latents,
    prepare_prompts,
    remove_adapters,
    run_steps,
    text_encoder_names,
)

if TYPE_CHECKING:
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from engine.pipelines.base import TextToImagePipeline

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraTrainSettings:
    """Hyperparameters of one LoRA training run. Defaults are for SDXL and 3-10 face crops.

    For SD1.5 pass its resolution (512); the other defaults suit it as well.
    """

    steps: int = 500  # diffusers' DreamBooth LoRA examples: 500 steps on ~5 instance photos
    rank: int = 16  # above diffusers' default of 4: a face identity needs more capacity than a style
    alpha: int = 16  # alpha == rank (scale 1), so the learning rate means the same at any rank
    learning_rate: float = 1e-4  # diffusers' DreamBooth LoRA examples (AdamW, constant schedule)
    resolution: int = 1024  # SDXL's native size; the photo checks write crops at this size
    batch_size: int = 1  # diffusers' SDXL DreamBooth LoRA example
    seed: int = 0
    # Attention projections only, as diffusers' SDXL DreamBooth LoRA script targets for the UNet.
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    weight_decay: float = 1e-4  # diffusers' SDXL DreamBooth LoRA script's adam_weight_decay
    max_grad_norm: float = 1.0  # diffusers' training scripts' gradient clipping
    # A LoRA checkpoint is small (tens of MB with AdamW state): a killed run loses at most 100 steps.
    checkpoint_every: int = 100
    # Prior preservation, used when the run is given class images (engine.train.prior.class_images):
    prior_loss_weight: float = 1.0  # DreamBooth paper (λ = 1); diffusers' DreamBooth-LoRA scripts' default
    num_class_images: int = 100  # diffusers' DreamBooth-LoRA scripts' default
    class_image_steps: int = 30  # inference steps for drawing them, as DreamBooth draws them
    # Opt-in, as in diffusers' DreamBooth-LoRA scripts (--train_text_encoder): sharper identity, bigger file.
    train_text_encoder: bool = False
    # CLIP's attention projections: what diffusers' DreamBooth-LoRA scripts target in the text encoders.
    text_encoder_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")
    # Off by default, as diffusers' --random_flip: a mirrored face loses the asymmetries that make it yours.
    random_flip: bool = False
    # Off for the small presets; the SDXL preset turns it on (engine.train.methods): at 1024² the UNet's
    # activations, not the LoRA's optimizer state, are what fills the card.
    gradient_checkpointing: bool = False
    mixed_precision: bool = True  # bf16 autocast on a GPU (float32 LoRA weights); ignored on the CPU
    # With a likeness judge (engine.train.likeness): how often to judge (None: at every checkpoint) and the
    # denoising steps of each judged drawing.
    likeness_every: int | None = None
    likeness_steps: int = 20

    def check(self) -> None:
        """Raise ``TrainingInputError`` naming the first setting that cannot work."""
        if self.steps < 1:
            raise TrainingInputError(f"steps must be at least 1, got {self.steps}")
        if self.rank < 1 or self.alpha <= 0:
            raise TrainingInputError(f"rank and alpha must be positive, got {self.rank} and {self.alpha}")
        if self.resolution < 8 or self.resolution % 8:
            raise TrainingInputError(f"resolution must be a positive multiple of 8, got {self.resolution}")
        if self.batch_size < 1:
            raise TrainingInputError(f"batch_size must be at least 1, got {self.batch_size}")
        if not self.learning_rate > 0:
            raise TrainingInputError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.prior_loss_weight < 0:
            raise TrainingInputError(f"prior_loss_weight must not be negative, got {self.prior_loss_weight}")
        if self.num_class_images < 0:
            raise TrainingInputError(f"num_class_images must not be negative, got {self.num_class_images}")

    @property
    def with_prior(self) -> bool:
        """Whether the class loss is part of training (a weight of 0 skips class images altogether)."""
        return self.prior_loss_weight > 0


@dataclass(frozen=True)
class LoraTrainOutcome:
    """What a finished run produced: the LoRA safetensors bytes, the last step's loss, steps run."""

    weights: bytes
    final_loss: float
    steps: int


# --- stage 3: the trainable copy -------------------------------------------------------------------


def build_trainable(
    pipe: TextToImagePipeline, lock: threading.Lock, settings: LoraTrainSettings
) -> UNet2DConditionModel:
    """A deep copy of the resident UNet with a fresh LoRA adapter; only the adapter's weights train.

    Other users' adapters that the renderer loaded into the resident UNet are removed from the copy.
    The LoRA weights are float32 whatever the base dtype, so small updates are not rounded away.
    """
    from peft import LoraConfig

    with lock:
        unet = copy.deepcopy(pipe.unet)
    if _has_lora_layers(unet):
        unet.unload_lora()
    unet.requires_grad_(False)
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        init_lora_weights="gaussian",  # A gaussian, B zero: the adapter starts as a no-op
        target_modules=list(settings.target_modules),
    )
    with torch.random.fork_rng(devices=[]):  # peft initialises A from the global RNG
        torch.manual_seed(settings.seed)
        unet.add_adapter(config)
    for param in trainable_parameters(unet):
        param.data = param.data.float()
    if settings.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    return unet


def build_trainable_text_encoders(
    pipe: TextToImagePipeline, lock: threading.Lock, settings: LoraTrainSettings
) -> dict[str, torch.nn.Module]:
    """Deep copies of the text encoder(s) with fresh LoRA adapters, by pipeline attribute name.

    As for the UNet: adapters the renderer loaded are left out, only float32 LoRA weights train.
    """
    from peft import LoraConfig, inject_adapter_in_model

    with lock:
        encoders = {name: copy.deepcopy(getattr(pipe, name)) for name in text_encoder_names(pipe)}
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        init_lora_weights="gaussian",
        target_modules=list(settings.text_encoder_target_modules),
    )
    for encoder in encoders.values():
        remove_adapters(encoder)
        encoder.requires_grad_(False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            # peft directly, as diffusers' loader does: transformers' add_adapter wants a newer peft
            inject_adapter_in_model(config, encoder, adapter_name="default")
        for param in trainable_parameters(encoder):
            param.data = param.data.float()
        if settings.gradient_checkpointing:  # non-reentrant: the frozen embeddings need no grad
            encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        encoder.train()
    return encoders


def _has_lora_layers(unet: torch.nn.Module) -> bool:
    """Whether peft LoRA layers wrap any of ``unet``'s modules.

    Not ``peft_config``: once the renderer has deleted every adapter, that attribute is gone but the
    (disabled) wrapper layers stay, and a new adapter added to them would never be active.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(module, BaseTunerLayer) for module in unet.modules())


def trainable_parameters(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters the optimizer updates (the LoRA adapter's)."""
    return [p for p in unet.parameters() if p.requires_grad]


def start_training(
    unet: UNet2DConditionModel,
    settings: LoraTrainSettings,
    text_encoders: Mapping[str, torch.nn.Module] | None = None,
) -> TrainingState:
    """A fresh ``TrainingState``: AdamW over the adapters, the run's seeded RNG, step 0."""
    encoders = dict(text_encoders or {})
    params = [p for module in (unet, *encoders.values()) for p in trainable_parameters(module)]
    optimizer = adamw(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    generator = torch.Generator("cpu").manual_seed(settings.seed)
    return TrainingState(unet=unet, optimizer=optimizer, generator=generator, text_encoders=encoders)


# --- stage 4: one step ------------------------------------------------------------------------------


def training_step(
    state: TrainingState,
    latents: InstanceLatents | TrainingLatents,
    conditioning: PromptConditioning | StepPrompts,
    scheduler: DDPMScheduler,
    lock: threading.Lock,
    settings: LoraTrainSettings,
) -> float:
    """One step: sample latents → add noise at random timesteps → predict → MSE (+ the class loss) → AdamW.

    Takes the instance latents and prompt alone too (no prior preservation). Returns the loss.
    """
    if isinstance(latents, InstanceLatents):
        latents = TrainingLatents(latents, None)
    if isinstance(conditioning, PromptConditioning):
        conditioning = FixedPrompts(conditioning, None)
    return dreambooth_step(state, latents, conditioning, scheduler, lock, settings)


# --- the run -------------------------------------------------------------------------------------------


def train_lora(
    pipe: TextToImagePipeline,
    lock: threading.Lock,
    crops: list[Image.Image],
    token: str,
    class_word: str,
    settings: LoraTrainSettings,
    on_progress: ProgressSink | None = None,
    *,
    class_images: list[Image.Image] | tuple[Image.Image, ...] = (),
    state: TrainingState | None = None,
    checkpoints: CheckpointStore | None = None,
    likeness: Judge | None = None,
) -> LoraTrainOutcome:
    """Train a LoRA for one user on ``crops`` and return its safetensors bytes.

    ``class_images`` (from ``engine.train.prior.class_images``) turn on prior preservation: every step adds
    ``settings.prior_loss_weight`` × the loss on them with the class prompt; without them it is off.
    ``pipe`` is the resident pipeline: its modules are only read (copied), under ``lock``.
    ``on_progress`` is called after every step. ``state`` is the resume seam: a restored run continues
    from ``state.step``. With ``checkpoints`` the run saves every ``settings.checkpoint_every`` steps and
    first resumes from the job's newest checkpoint, so a killed job does not start again at step 0.
    With ``likeness`` the saved weights are those whose drawings it scored best (``engine.train.likeness``).
    """
    settings.check()
    if not class_images:
        settings = replace(settings, prior_loss_weight=0.0)
    latents = prepare_latents(pipe, lock, crops, list(class_images), settings)
    prompts = prepare_prompts(pipe, lock, token, class_word, settings)
    if state is None:
        encoders = build_trainable_text_encoders(pipe, lock, settings) if settings.train_text_encoder else {}
        state = start_training(build_trainable(pipe, lock, settings), settings, encoders)
    checkpointing = Checkpointing(checkpoints, settings.checkpoint_every) if checkpoints else None
    if checkpointing is not None:
        state = checkpointing.resume(state, state.modules())
    scheduler = noise_scheduler_for(pipe)
    _log.info(
        "LoRA training: %d crops, %d class images, %d steps from step %d",
        len(crops), len(class_images) if settings.with_prior else 0, settings.steps, state.step,
    )
    best = BestByLikeness.for_run(pipe, lock, likeness, f"{token} {class_word}", settings)
    loss = run_steps(state, latents, prompts, scheduler, lock, settings, on_progress, checkpointing, best)
    return LoraTrainOutcome(weights=save_lora(state.unet, state.text_encoders), final_loss=loss, steps=state.step)
