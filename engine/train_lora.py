"""DreamBooth-LoRA training on the resident pipeline's UNet (SDXL or SD1.5), as named stages.

1. ``prepare_data``     crops → pixel tensors in [-1, 1] at the training resolution.
2. ``encode_crops`` (``encode_latents``), ``encode_instance_prompt``, ``sdxl_time_ids``: the frozen
   resident VAE and text encoders, used once, under the lock. The families differ only here: SDXL has
   two text encoders and conditions its UNet on the pooled text and image sizes too
   (``PromptConditioning.unet_kwargs``); each crop's original size is its source side in the photo
   (``crop_source_side``), carried by its latent rows.
   With class images (``engine.prior.class_images``) their latents and the class prompt are prepared
   too, by ``engine.train_dreambooth``'s shared stages.
3. ``build_trainable``  a deep copy of the UNet with a LoRA adapter (and, opt-in,
   ``build_trainable_text_encoders``: copies of the text encoders with their own); only the adapters
   train, so the resident modules keep serving draws while a user's model trains.
4. ``training_step``    one step under the lock: instance loss + ``prior_loss_weight`` × class loss
   (``engine.train_dreambooth.dreambooth_step``: DreamBooth-LoRA is DreamBooth's loss on a LoRA).
5. ``save_lora``        the adapters as one diffusers-format LoRA safetensors file's bytes.

``train_lora`` runs them in order. The lock is the one that guards the GPU and the resident modules:
it is taken per stage and per step, so interactive draws interleave with training.
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from engine.api import CROP_SOURCE_SIDE_KEY
from engine.checkpoints import Checkpointing, CheckpointStore
from engine.errors import EngineError
from engine.likeness import BestByLikeness, Judge
from engine.progress import ProgressClock, ProgressSink

if TYPE_CHECKING:
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from engine.base import TextToImagePipeline
    from engine.train_dreambooth import StepPrompts, TrainingLatents

_log = logging.getLogger(__name__)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
"""File name diffusers' ``save_lora_weights`` writes and ``load_lora_weights`` looks for."""


class TrainingInputError(EngineError):
    """Training was asked for with inputs it cannot use (no crops, bad settings)."""


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
    # Prior preservation, used when the run is given class images (engine.prior.class_images):
    prior_loss_weight: float = 1.0  # DreamBooth paper (λ = 1); diffusers' DreamBooth-LoRA scripts' default
    num_class_images: int = 100  # diffusers' DreamBooth-LoRA scripts' default
    class_image_steps: int = 30  # inference steps for drawing them, as engine.train_dreambooth draws them
    # Opt-in, as in diffusers' DreamBooth-LoRA scripts (--train_text_encoder): sharper identity, bigger file.
    train_text_encoder: bool = False
    # CLIP's attention projections: what diffusers' DreamBooth-LoRA scripts target in the text encoders.
    text_encoder_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")
    # Off by default, as diffusers' --random_flip: a mirrored face loses the asymmetries that make it yours.
    random_flip: bool = False
    # Off for the small presets; the SDXL preset turns it on (engine.training): at 1024² the UNet's
    # activations, not the LoRA's optimizer state, are what fills the card.
    gradient_checkpointing: bool = False
    mixed_precision: bool = True  # bf16 autocast on a GPU (float32 LoRA weights); ignored on the CPU
    # With a likeness judge (engine.likeness): how often to judge (None: at every checkpoint) and the
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


@dataclass(frozen=True)
class InstanceLatents:
    """The VAE posterior of every crop and of its mirror image, encoded once.

    Sampling from the cached posterior each step is what encoding each step would give (the encoder
    is frozen), without running the VAE per step. Rows ``0..n-1`` are the crops, ``n..2n-1`` their
    horizontal flips when the run flips, so picking a row at random is the flip augmentation.

    ``original_sizes`` ``[rows, 2]`` (height, width) is each row's SDXL original size, a flip's its
    crop's; None where every row is at the training resolution (class images, which are drawn at it).
    """

    mean: torch.Tensor
    std: torch.Tensor
    original_sizes: torch.Tensor | None = None

    def sample(self, rows: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Latents for ``rows``, drawn from their posteriors with ``generator``."""
        mean, std = self.mean[rows], self.std[rows]
        return mean + std * _randn_like(mean, generator)

    def sizes(self, rows: torch.Tensor) -> torch.Tensor | None:
        """The original sizes of ``rows`` (None: the training resolution's)."""
        return None if self.original_sizes is None else self.original_sizes[rows.cpu()]


class NoisedBatch(NamedTuple):
    """One step's sampled rows: clean latents, their noise and timesteps, and their original sizes."""

    clean: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    original_sizes: torch.Tensor | None = None  # [batch, 2]; None: the training resolution's


@dataclass(frozen=True)
class PromptConditioning:
    """Everything the UNet is conditioned on besides the latents: text, and for SDXL micro-conditioning."""

    prompt_embeds: torch.Tensor  # [1, tokens, width of the text encoder(s)]
    pooled_embeds: torch.Tensor | None = None  # SDXL: [1, text_encoder_2 projection]; SD1.5: None
    time_ids: torch.Tensor | None = None  # SDXL: [1, 6] original size, crop top-left, target size

    def unet_kwargs(
        self, batch: int, dtype: torch.dtype, original_sizes: torch.Tensor | None = None
    ) -> dict[str, Any]:
        """The UNet's conditioning keyword arguments for a batch of ``batch`` latents.

        Both families get ``encoder_hidden_states``; SDXL's UNet also takes ``added_cond_kwargs``, its
        time ids one row per latent: ``original_sizes`` ``[batch, 2]`` (each row's own) replace the
        original size of ``time_ids``; crop top-left and target size are the same for every row.
        """
        kwargs: dict[str, Any] = {"encoder_hidden_states": self.prompt_embeds.expand(batch, -1, -1).to(dtype)}
        if self.pooled_embeds is not None and self.time_ids is not None:
            time_ids = self.time_ids.expand(batch, -1)
            if original_sizes is not None:
                time_ids = torch.cat([original_sizes.to(time_ids), time_ids[:, 2:]], dim=1)
            kwargs["added_cond_kwargs"] = {
                "text_embeds": self.pooled_embeds.expand(batch, -1).to(dtype),
                "time_ids": time_ids.to(dtype),
            }
        return kwargs


@dataclass(eq=False)
class TrainingState:
    """The mutable part of a run: the trainable UNet (and text encoders), optimizer, RNG, step reached.

    The seam for checkpoint/resume: a run restored into a ``TrainingState`` continues from ``step``.
    """

    unet: UNet2DConditionModel
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    step: int = 0
    losses: list[float] = field(default_factory=list)
    text_encoders: dict[str, torch.nn.Module] = field(default_factory=dict)  # when they train too

    def modules(self) -> dict[str, torch.nn.Module]:
        """Every module that trains, by its pipeline attribute name (what checkpoints save)."""
        return {"unet": self.unet, **self.text_encoders}


# --- stage 1: data -------------------------------------------------------------------------------


def prepare_data(crops: list[Image.Image], resolution: int) -> torch.Tensor:
    """Crops as a float tensor ``[n, 3, resolution, resolution]`` in [-1, 1].

    Crops that are not square at ``resolution`` are resized (the photo checks normally write them at
    that size already). The (opt-in) flip augmentation happens later, in ``encode_latents``.
    """
    if not crops:
        raise TrainingInputError("training needs at least one face crop")
    arrays = [_to_array(crop, resolution) for crop in crops]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return pixels.float() / 127.5 - 1.0


def _to_array(crop: Image.Image, resolution: int) -> np.ndarray:
    image = crop.convert("RGB")
    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.uint8)


def crop_source_side(crop: Image.Image, resolution: int) -> int:
    """The side, in photo pixels, of the square ``crop`` was cut from (``engine.faces.training_crop``).

    Read from the crop's ``info`` (its PNG's text, ``CROP_SOURCE_SIDE_KEY``); a crop without it (written
    before it was kept, or made elsewhere) counts as taken at ``resolution``.
    """
    value = crop.info.get(CROP_SOURCE_SIDE_KEY)
    try:
        side = int(value) if isinstance(value, str) else resolution
    except ValueError:
        side = resolution
    return side if side > 0 else resolution


# --- stage 2: frozen encoders ----------------------------------------------------------------------


def encode_crops(
    pipe: TextToImagePipeline, lock: threading.Lock, crops: list[Image.Image], resolution: int,
    *, flip: bool = False,
) -> InstanceLatents:
    """``encode_latents`` of the crops, each row with its crop's original size (``crop_source_side``).

    SDXL was trained told each image's size before it was resized: a face cut from 400 photo pixels and
    upscaled to 1024 is a 400-pixel original, not a sharp 1024 one (SDXL paper, size conditioning).
    """
    latents = encode_latents(pipe, lock, prepare_data(crops, resolution), flip=flip)
    sides = torch.tensor([float(crop_source_side(crop, resolution)) for crop in crops])
    if flip:
        sides = torch.cat([sides, sides])  # a mirror image is as large as its crop
    return replace(latents, original_sizes=torch.stack([sides, sides], dim=1))


@torch.no_grad()
def encode_latents(
    pipe: TextToImagePipeline, lock: threading.Lock, pixels: torch.Tensor, *, flip: bool = False
) -> InstanceLatents:
    """Encode the crops (and, with ``flip``, their mirror images) with the resident VAE, once, under ``lock``."""
    both = torch.cat([pixels, torch.flip(pixels, dims=[3])]) if flip else pixels
    vae = pipe.vae
    with lock:
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast  # SDXL's VAE overflows in fp16
        try:
            if upcast:
                vae.to(torch.float32)
            dist = vae.encode(both.to(pipe.device, vae.dtype)).latent_dist
            mean, std = dist.mean.float(), dist.std.float()
        finally:
            if upcast:
                vae.to(torch.float16)  # fp16 → fp32 → fp16 is exact: the resident VAE is unchanged
    shift, scale = (torch.as_tensor(x, device=mean.device) for x in _latent_normalisation(vae.config))
    return InstanceLatents(mean=(mean - shift) * scale, std=std * scale)


def _latent_normalisation(config: Any) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """(shift, scale) taking VAE latents to the UNet's space: the inverse of the pipeline's decode."""
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:  # e.g. Playground v2.5's per-channel statistics
        return torch.tensor(mean).view(1, -1, 1, 1), config.scaling_factor / torch.tensor(std).view(1, -1, 1, 1)
    return 0.0, float(config.scaling_factor)


def instance_prompt(token: str, class_word: str) -> str:
    """The DreamBooth instance prompt: the rare token binds to the subject, the class word to its kind."""
    return f"a photo of {token} {class_word}"


@torch.no_grad()
def encode_instance_prompt(
    pipe: TextToImagePipeline, lock: threading.Lock, prompt: str, resolution: int
) -> PromptConditioning:
    """Encode ``prompt`` with the resident text encoder(s) (the pipeline's ``encode_prompt``), once.

    SDXL's ``encode_prompt`` returns (embeds, negative, pooled, negative pooled); SD1.5's only the
    first two, and its UNet takes no pooled text or size micro-conditioning.
    """
    with lock:
        outputs = pipe.encode_prompt(
            prompt, device=pipe.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
    if not uses_size_conditioning(pipe.unet):
        return PromptConditioning(outputs[0])
    size = (resolution, resolution)
    return PromptConditioning(outputs[0], outputs[2], sdxl_time_ids(size, (0, 0), size).to(pipe.device))


def uses_size_conditioning(unet: UNet2DConditionModel) -> bool:
    """Whether ``unet`` takes SDXL's pooled text and size micro-conditioning ("text_time")."""
    return unet.config.addition_embed_type == "text_time"


def sdxl_time_ids(
    original_size: tuple[int, int], crop_top_left: tuple[int, int], target_size: tuple[int, int]
) -> torch.Tensor:
    """SDXL's micro-conditioning vector ``[1, 6]`` (sizes as height, width).

    Training says "uncropped" at the target size; each crop's own original size replaces the first two
    values per latent row (``PromptConditioning.unet_kwargs``). Drawing asks for original = target size.
    """
    return torch.tensor([[*original_size, *crop_top_left, *target_size]], dtype=torch.float32)


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

    from engine.train_dreambooth import remove_adapters, text_encoder_names

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
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    generator = torch.Generator("cpu").manual_seed(settings.seed)
    return TrainingState(unet=unet, optimizer=optimizer, generator=generator, text_encoders=encoders)


def noise_scheduler_for(pipe: TextToImagePipeline) -> DDPMScheduler:
    """The training-time (DDPM) noise schedule matching the resident pipeline's scheduler config."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


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
    from engine.train_dreambooth import FixedPrompts, TrainingLatents, dreambooth_step

    if isinstance(latents, InstanceLatents):
        latents = TrainingLatents(latents, None)
    if isinstance(conditioning, PromptConditioning):
        conditioning = FixedPrompts(conditioning, None)
    return dreambooth_step(state, latents, conditioning, scheduler, lock, settings)


def _sample_batch(
    state: TrainingState, latents: InstanceLatents, scheduler: DDPMScheduler, batch_size: int
) -> NoisedBatch:
    """Clean latents, noise and timesteps for one step, all from the run's generator, and the rows' sizes."""
    gen = state.generator
    rows = torch.randint(0, latents.mean.shape[0], (batch_size,), generator=gen, device="cpu")
    clean = latents.sample(rows.to(latents.mean.device), gen)
    noise = _randn_like(clean, gen)
    num_timesteps = scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, num_timesteps, (batch_size,), generator=gen, device="cpu")
    return NoisedBatch(clean, noise, timesteps.to(clean.device), latents.sizes(rows))


def _denoising_loss(
    unet: UNet2DConditionModel,
    scheduler: DDPMScheduler,
    cond: PromptConditioning,
    clean: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    original_sizes: torch.Tensor | None = None,
) -> torch.Tensor:
    """MSE between the UNet's prediction on noised latents and its target (noise or velocity).

    Takes a ``NoisedBatch`` unpacked: ``original_sizes`` are its rows' (SDXL; None: the resolution's).
    """
    noisy = scheduler.add_noise(clean, noise, timesteps)
    dtype = unet.dtype
    kwargs = cond.unet_kwargs(clean.shape[0], dtype, original_sizes)
    prediction = unet(noisy.to(dtype), timesteps, **kwargs, return_dict=False)[0]
    return F.mse_loss(prediction.float(), _target(scheduler, clean, noise, timesteps).float())


def _target(
    scheduler: DDPMScheduler, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(clean, noise, timesteps)
    raise TrainingInputError(f"cannot train a base with prediction_type {kind!r}")


def _randn_like(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # Drawn on the CPU generator, then moved: the same seed gives the same run on any device.
    return torch.randn(like.shape, generator=generator, dtype=torch.float32).to(like.device, like.dtype)


# --- stage 5: save -----------------------------------------------------------------------------------


def save_lora(unet: UNet2DConditionModel, text_encoders: Mapping[str, torch.nn.Module] | None = None) -> bytes:
    """The trained adapters as the bytes of one diffusers-format LoRA safetensors file.

    The file carries each LoraConfig (rank, alpha, targets) in its metadata, so
    ``pipe.load_lora_weights(path, adapter_name=...)`` rebuilds the adapters exactly. Keys are prefixed
    by module (``unet.``, ``text_encoder.``, ``text_encoder_2.``); SDXL's loader mixin is the writer
    that knows the second text encoder, and writes the same layout as SD1.5's for the others.
    """
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    kwargs: dict[str, Any] = {}
    modules: dict[str, torch.nn.Module] = {"unet": unet, **(text_encoders or {})}
    for name, module in modules.items():
        kwargs[f"{name}_lora_layers"] = _lora_layers(module)
        kwargs[f"{name}_lora_adapter_metadata"] = module.peft_config["default"].to_dict()
    xl = "text_encoder_2" in (text_encoders or {})
    writer = StableDiffusionXLLoraLoaderMixin if xl else StableDiffusionLoraLoaderMixin
    with tempfile.TemporaryDirectory(prefix="avatarbooth-lora-") as tmp:
        writer.save_lora_weights(tmp, weight_name=LORA_WEIGHT_NAME, **kwargs)
        return canonical_safetensors((Path(tmp) / LORA_WEIGHT_NAME).read_bytes())


def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with its header written in one fixed way.

    safetensors writes the metadata map in no fixed order, and peft's config holds sets
    (``target_modules``), so equal adapters came out as different bytes in different processes,
    and so under different blob keys: a re-run job (arq runs at least once) stored a second copy.
    Only the JSON header changes (keys sorted, string lists in metadata sorted); the tensor data
    and its offsets, which are relative to the end of the header, stay as they are.
    """
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    metadata = header.get("__metadata__")
    if isinstance(metadata, dict):
        header["__metadata__"] = {key: _canonical_json_text(value) for key, value in metadata.items()}
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes with spaces
    return len(text).to_bytes(8, "little") + text + data[8 + size :]


def _canonical_json_text(value: str) -> str:
    try:
        parsed = json.loads(value)
    except ValueError:
        return value  # plain text (e.g. "pt")
    return json.dumps(_sorted_string_lists(parsed), sort_keys=True)


def _sorted_string_lists(value: Any) -> Any:
    """Lists of strings sorted (in peft's config they are sets), everything else as it was."""
    if isinstance(value, dict):
        return {key: _sorted_string_lists(item) for key, item in value.items()}
    if isinstance(value, list):
        items = [_sorted_string_lists(item) for item in value]
        return sorted(items) if all(isinstance(item, str) for item in items) else items
    return value


def _lora_layers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s adapter weights, named as diffusers' LoRA files name them, on the CPU."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(module))
    return {name: tensor.detach().to("cpu").contiguous() for name, tensor in layers.items()}


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

    ``class_images`` (from ``engine.prior.class_images``) turn on prior preservation: every step adds
    ``settings.prior_loss_weight`` × the loss on them with the class prompt; without them it is off.
    ``pipe`` is the resident pipeline: its modules are only read (copied), under ``lock``.
    ``on_progress`` is called after every step. ``state`` is the resume seam: a restored run continues
    from ``state.step``. With ``checkpoints`` the run saves every ``settings.checkpoint_every`` steps and
    first resumes from the job's newest checkpoint, so a killed job does not start again at step 0.
    With ``likeness`` the saved weights are those whose drawings it scored best (``engine.likeness``).
    """
    from engine.train_dreambooth import prepare_latents, prepare_prompts

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


def run_steps(
    state: TrainingState,
    latents: TrainingLatents,
    prompts: StepPrompts,
    scheduler: DDPMScheduler,
    lock: threading.Lock,
    settings: LoraTrainSettings,
    on_progress: ProgressSink | None,
    checkpointing: Checkpointing | None = None,
    best: BestByLikeness | None = None,
) -> float:
    """The training loop, from ``state.step`` to ``settings.steps``; returns the last loss.

    With ``best``, the weights it judged best are back in ``state`` when the loop ends.
    """
    clock = ProgressClock(on_progress, settings.steps, state.step)
    loss = state.losses[-1] if state.losses else float("nan")
    while state.step < settings.steps:
        loss = training_step(state, latents, prompts, scheduler, lock, settings)
        if checkpointing is not None:
            checkpointing.after_step(state, settings.steps, state.modules())
        if best is not None:
            best.after_step(state, settings.steps)
        clock.report(state.step, loss)
    if best is not None:
        best.restore_best(state)
    return loss

