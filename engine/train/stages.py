"""The training stages LoRA and DreamBooth share (and Textual Inversion some of), as one module.

Like diffusers' ``training_utils``: the method files (``engine.train.lora``, ``engine.train.dreambooth``,
``engine.train.ti``) build their own trainable copies and save their own files (in the formats of
``engine.personal``), and import the rest from here; they never import each other.

1. data:     crops → pixel tensors in [-1, 1] (``prepare_data``) and, with class images
             (``engine.train.prior.class_images``), those too (``prepare_latents``, ``encode_in_chunks``).
2. encoders: the frozen resident VAE and text encoders, used once, under the lock (``encode_crops``,
             ``encode_latents``, ``encode_instance_prompt``, ``sdxl_time_ids``); or the prompts kept as
             token ids for text encoders that train (``prepare_prompts``, ``TrainablePrompts``). The families
             differ only here: SDXL has two text encoders and conditions its UNet on the pooled text and
             image sizes too (``PromptConditioning.unet_kwargs``); each crop's original size is its source
             side in the photo (``crop_source_side``), carried by its latent rows.
3. the objective: ``dreambooth_step``, one step under the lock: instance loss + ``prior_loss_weight`` ×
             class loss (``denoising_loss``, noise or velocity MSE), then the optimizer. DreamBooth-LoRA
             is DreamBooth's loss on a LoRA.
4. the loop: ``run_steps``, from ``state.step`` to the run's last step, with checkpoints and the
             likeness judge (``engine.train.likeness``) after each step.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from engine.api import CROP_SOURCE_SIDE_KEY
from engine.errors import EngineError
from engine.personal import TEXT_ENCODERS  # also the key prefixes of the weights files
from engine.train.prior import class_prompt
from engine.progress import ProgressClock, ProgressSink

if TYPE_CHECKING:
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from engine.pipelines.base import TextToImagePipeline
    from engine.train.checkpoints import Checkpointing
    from engine.train.likeness import BestByLikeness

_CLASS_CHUNK = 4  # class images encoded per VAE call: hundreds at 1024² at once would not fit in memory


class TrainingInputError(EngineError):
    """Training was asked for with inputs it cannot use (no crops, bad settings)."""


class PriorTrainingSettings(Protocol):
    """The settings the shared stages read; ``DreamBoothSettings`` and ``LoraTrainSettings`` have them."""

    @property
    def steps(self) -> int: ...
    @property
    def resolution(self) -> int: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def prior_loss_weight(self) -> float: ...
    @property
    def with_prior(self) -> bool: ...
    @property
    def train_text_encoder(self) -> bool: ...
    @property
    def random_flip(self) -> bool: ...
    @property
    def mixed_precision(self) -> bool: ...
    @property
    def max_grad_norm(self) -> float: ...


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


@dataclass(frozen=True)
class TrainingLatents:
    """The instance crops' latents, and the class images' (None without prior preservation)."""

    instance: InstanceLatents
    classes: InstanceLatents | None


class StepPrompts(Protocol):
    """The instance and class conditioning of one step (class: None without prior preservation)."""

    def for_step(self, state: TrainingState) -> tuple[PromptConditioning, PromptConditioning | None]: ...


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
    """The side, in photo pixels, of the square ``crop`` was cut from (``engine.faces.analyzer.training_crop``).

    Read from the crop's ``info`` (its PNG's text, ``CROP_SOURCE_SIDE_KEY``); a crop without it (written
    before it was kept, or made elsewhere) counts as taken at ``resolution``.
    """
    value = crop.info.get(CROP_SOURCE_SIDE_KEY)
    try:
        side = int(value) if isinstance(value, str) else resolution
    except ValueError:
        side = resolution
    return side if side > 0 else resolution


def prepare_latents(
    pipe: TextToImagePipeline,
    lock: threading.Lock,
    crops: list[Image.Image],
    class_images: list[Image.Image],
    settings: PriorTrainingSettings,
) -> TrainingLatents:
    """Encode the crops and (with prior preservation) the class images with the resident VAE."""
    instance = encode_crops(pipe, lock, crops, settings.resolution, flip=settings.random_flip)
    if not settings.with_prior:
        return TrainingLatents(instance, None)
    if not class_images:
        raise TrainingInputError("prior preservation needs class images (engine.train.prior.class_images)")
    return TrainingLatents(
        instance, encode_in_chunks(pipe, lock, class_images, settings.resolution, flip=settings.random_flip)
    )


def encode_in_chunks(
    pipe: TextToImagePipeline, lock: threading.Lock, images: list[Image.Image], resolution: int,
    *, flip: bool = False,
) -> InstanceLatents:
    """``encode_latents`` over chunks, concatenated (the rows' order does not matter: they are sampled)."""
    parts = [
        encode_latents(pipe, lock, prepare_data(images[i : i + _CLASS_CHUNK], resolution), flip=flip)
        for i in range(0, len(images), _CLASS_CHUNK)
    ]
    return InstanceLatents(torch.cat([p.mean for p in parts]), torch.cat([p.std for p in parts]))


# --- stage 2: frozen encoders and prompts ---------------------------------------------------------


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


def adamw(params: Any, *, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW, fused (one kernel for every parameter's update) where the parameters live on CUDA.

    On the CPU it stays torch's default implementation, so CPU runs are bit-for-bit what they were;
    the fused update is the same arithmetic in another order (``tests/engine/test_train_lora.py``
    checks both agree within float rounding). ``fused`` needs every parameter on one CUDA device.
    """
    params = list(params)
    on_cuda = bool(params) and all(_param(p).is_cuda for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True if on_cuda else None)


def _param(entry: Any) -> torch.Tensor:
    """A parameter, or a parameter group's first."""
    first: torch.Tensor = entry["params"][0] if isinstance(entry, dict) else entry
    return first


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


@dataclass(frozen=True)
class FixedPrompts:
    """Conditioning from the frozen resident text encoders, encoded once."""

    instance: PromptConditioning
    classes: PromptConditioning | None

    def for_step(self, state: TrainingState) -> tuple[PromptConditioning, PromptConditioning | None]:
        return self.instance, self.classes


@dataclass(frozen=True)
class TrainablePrompts:
    """Token ids, encoded every step by the run's own (training) copies of the text encoders."""

    instance_ids: list[torch.Tensor]  # one per text encoder
    class_ids: list[torch.Tensor] | None
    time_ids: torch.Tensor | None  # SDXL's micro-conditioning; None for SD1.5

    def for_step(self, state: TrainingState) -> tuple[PromptConditioning, PromptConditioning | None]:
        encoders = list(state.text_encoders.values())
        instance = encode_tokens(encoders, self.instance_ids, self.time_ids)
        classes = None if self.class_ids is None else encode_tokens(encoders, self.class_ids, self.time_ids)
        return instance, classes


def prepare_prompts(
    pipe: TextToImagePipeline,
    lock: threading.Lock,
    token: str,
    class_word: str,
    settings: PriorTrainingSettings,
) -> StepPrompts:
    """The instance prompt, and the class prompt with prior preservation, ready for every step."""
    prompts = [instance_prompt(token, class_word), class_prompt(class_word) if settings.with_prior else None]
    if settings.train_text_encoder:
        ids = [None if p is None else tokenize(pipe, p) for p in prompts]
        assert ids[0] is not None
        return TrainablePrompts(ids[0], ids[1], _time_ids(pipe, settings.resolution))
    encoded = [None if p is None else encode_instance_prompt(pipe, lock, p, settings.resolution) for p in prompts]
    assert encoded[0] is not None
    return FixedPrompts(encoded[0], encoded[1])


def text_encoder_names(pipe: TextToImagePipeline) -> list[str]:
    """The pipeline's text encoders by attribute name: two for SDXL, one for SD1.5."""
    return [name for name in TEXT_ENCODERS if getattr(pipe, name, None) is not None]


def tokenize(pipe: TextToImagePipeline, prompt: str) -> list[torch.Tensor]:
    """Token ids of ``prompt`` for each text encoder, padded as the pipelines pad them."""
    tokenizers = [getattr(pipe, name.replace("text_encoder", "tokenizer")) for name in text_encoder_names(pipe)]
    return [
        t(prompt, padding="max_length", max_length=t.model_max_length, truncation=True, return_tensors="pt").input_ids
        for t in tokenizers
    ]


def _time_ids(pipe: TextToImagePipeline, resolution: int) -> torch.Tensor | None:
    if pipe.unet.config.addition_embed_type != "text_time":  # SD1.5: no size micro-conditioning
        return None
    size = (resolution, resolution)
    return sdxl_time_ids(size, (0, 0), size).to(pipe.device)


def encode_tokens(
    encoders: list[torch.nn.Module], ids: list[torch.Tensor], time_ids: torch.Tensor | None
) -> PromptConditioning:
    """What the pipeline's ``encode_prompt`` computes, on the given (trainable) encoders.

    SDXL (``time_ids`` given): penultimate hidden states of both encoders side by side, and the pooled
    embedding of the first that has one (``text_encoder_2``'s projection). SD1.5: the last hidden state.
    """
    if time_ids is None:
        (encoder,), (tokens,) = encoders, ids
        return PromptConditioning(encoder(tokens.to(_device(encoder)))[0])
    hidden, pooled = [], None
    for encoder, tokens in zip(encoders, ids, strict=True):
        out = encoder(tokens.to(_device(encoder)), output_hidden_states=True)
        if pooled is None and out[0].ndim == 2:
            pooled = out[0]
        hidden.append(out.hidden_states[-2])
    return PromptConditioning(torch.cat(hidden, dim=-1), pooled, time_ids)


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


# --- for the trainable copies: no renderer adapters, the training noise schedule -------------------


def remove_adapters(module: torch.nn.Module) -> None:
    """Strip every peft LoRA layer (and the adapter bookkeeping) from ``module``, a private copy.

    Looks for the layers, not only ``peft_config``: once the renderer has deleted every adapter that
    attribute can be gone while the (disabled) wrapper layers stay.
    """
    from diffusers.utils import recurse_remove_peft_layers
    from peft.tuners.tuners_utils import BaseTunerLayer

    if any(isinstance(m, BaseTunerLayer) for m in module.modules()):
        recurse_remove_peft_layers(module)
    if hasattr(module, "peft_config"):
        del module.peft_config
    if getattr(module, "_hf_peft_config_loaded", False):  # transformers' flag: add_adapter starts afresh
        module._hf_peft_config_loaded = False


def noise_scheduler_for(pipe: TextToImagePipeline) -> DDPMScheduler:
    """The training-time (DDPM) noise schedule matching the resident pipeline's scheduler config."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


# --- stage 3: the objective, one step ------------------------------------------------------------------


def dreambooth_step(
    state: TrainingState,
    latents: TrainingLatents,
    prompts: StepPrompts,
    scheduler: DDPMScheduler,
    lock: threading.Lock,
    settings: PriorTrainingSettings,
) -> float:
    """One step: instance loss + ``prior_loss_weight`` × class loss → AdamW. Returns the loss."""
    instance = sample_batch(state, latents.instance, scheduler, settings.batch_size)
    classes = None if latents.classes is None else sample_batch(state, latents.classes, scheduler, settings.batch_size)
    params = [p for group in state.optimizer.param_groups for p in group["params"]]
    with lock:
        with training_autocast(state.unet, settings.mixed_precision):
            instance_cond, class_cond = prompts.for_step(state)
            loss = denoising_loss(state.unet, scheduler, instance_cond, *instance)
            if classes is not None and class_cond is not None:
                loss = loss + settings.prior_loss_weight * denoising_loss(state.unet, scheduler, class_cond, *classes)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    value = float(loss.detach())
    state.losses.append(value)
    return value


def training_autocast(unet: torch.nn.Module, enabled: bool) -> contextlib.AbstractContextManager[object]:
    """bf16 autocast when the UNet is on a GPU; float32 throughout on the CPU."""
    if enabled and _device(unet).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sample_batch(
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


def denoising_loss(
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


# --- stage 4: the loop -------------------------------------------------------------------------------


def run_steps(
    state: TrainingState,
    latents: TrainingLatents,
    prompts: StepPrompts,
    scheduler: DDPMScheduler,
    lock: threading.Lock,
    settings: PriorTrainingSettings,
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
        loss = dreambooth_step(state, latents, prompts, scheduler, lock, settings)
        if checkpointing is not None:
            checkpointing.after_step(state, settings.steps, state.modules())
        if best is not None:
            best.after_step(state, settings.steps)
        clock.report(state.step, loss)
    if best is not None:
        best.restore_best(state)
    return loss

