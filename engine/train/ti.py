"""Textual Inversion on the resident SD1.5 or SDXL pipeline, as named stages.

Textual Inversion learns new token embeddings ("words") for a user and changes no model weight. For
SDXL a word has one embedding per text encoder (CLIP ViT-L and OpenCLIP ViT-bigG); a word may be
several vectors (``<tok>``, ``<tok>_1``, ...), the way diffusers' loader expands multi-vector tokens.

1. ``encode_crops`` (``engine.train.stages``): crops → cached VAE posteriors (with mirrors when
   flipping), each with its crop's SDXL original size.
2. ``build_trainable``  copies of the tokenizer(s) and text encoder(s); the copies learn the new tokens,
   whose rows start as the init word's embedding. The resident pipeline is only read, so it keeps
   serving other users' draws while this one trains.
3. ``training_step``    prompts from ``PROMPT_TEMPLATES`` → the copies' text embeddings → noise-prediction
   MSE through the frozen resident UNet → AdamW on the new rows only; under the lock.
4. ``save_ti``          safetensors bytes that diffusers' ``load_textual_inversion`` reads
   (``engine.personal.ti.write_embeddings``).

Drawing with a trained word (``loaded_ti``, ``load_ti`` / ``unload_ti``) is ``engine.personal.ti``'s.
"""

from __future__ import annotations

import copy
import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from engine.personal.ti import SDXL_KEYS, encoder_attrs, is_sdxl, write_embeddings
from engine.progress import ProgressClock, ProgressSink
from engine.train.checkpoints import Checkpointing, CheckpointStore
from engine.train.likeness import BestByLikeness, Judge
from engine.train.stages import (
    InstanceLatents,
    NoisedBatch,
    PromptConditioning,
    TrainingInputError,
    adamw,
    denoising_loss,  # noise-prediction MSE for either family; shared so every trainer means the same loss
    encode_crops,
    noise_scheduler_for,
    sdxl_time_ids,
    uses_size_conditioning,
)

if TYPE_CHECKING:
    from diffusers import DDPMScheduler, DiffusionPipeline

_log = logging.getLogger(__name__)

PROMPT_TEMPLATES = (
    "a photo of {}",
    "a close-up photo of {}",
    "a portrait photo of {}",
    "a cropped photo of {}",
    "a good photo of {}",
    "a bright photo of {}",
    "a dark photo of {}",
    "a photo of the face of {}",
)
"""Training captions, after the TI paper's "a photo of a {}" family, worded for face crops. ``{}`` is the
subject, ``"<token> <class word>"``: the words ``engine.render.renderer.expand_me`` puts in a prompt for "me"."""

@dataclass(frozen=True)
class TiTrainSettings:
    """Hyperparameters of one Textual Inversion run, for 3-10 face crops."""

    # diffusers' TI examples: 3000 updates (SD1.5 README) / 500 updates of 4 crops (SDXL README); 2000
    # single-crop steps sees as many crops as the SDXL run. The TI paper trains 5000 steps.
    steps: int = 2000
    # diffusers' TI examples' effective rate: 5e-4 scaled (--scale_lr) by 4 accumulated crops. Only a few
    # embedding rows train, so rates far above LoRA's (1e-4) are the norm (the TI paper: 5e-3 base).
    learning_rate: float = 2e-3
    # One vector is the TI paper's and diffusers' default; a face is more than one word can hold, and
    # diffusers' advanced SDXL (pivotal tuning) script defaults to 2 new tokens per concept.
    vectors_per_token: int = 2
    resolution: int | None = None  # None: the base's native size (SD1.5 512, SDXL 1024)
    # Off by default, as diffusers' --random_flip: a mirrored face loses the asymmetries that make it yours.
    random_flip: bool = False
    batch_size: int = 1  # diffusers' TI examples' train_batch_size
    seed: int = 0
    init_word: str | None = None  # None: the class word; the TI paper starts from a coarse descriptor
    weight_decay: float = 1e-2  # diffusers' TI examples' adam_weight_decay
    checkpoint_every: int = 250  # a TI checkpoint is a few KB; resume loses at most 250 cheap steps
    likeness_every: int | None = None  # with a likeness judge: as LoraTrainSettings
    likeness_steps: int = 20

    def check(self) -> None:
        """Raise ``TrainingInputError`` naming the first setting that cannot work."""
        if self.steps < 1:
            raise TrainingInputError(f"steps must be at least 1, got {self.steps}")
        if not self.learning_rate > 0:
            raise TrainingInputError(f"learning_rate must be positive, got {self.learning_rate}")
        if not 1 <= self.vectors_per_token <= 16:
            raise TrainingInputError(f"vectors_per_token must be 1-16, got {self.vectors_per_token}")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise TrainingInputError(f"resolution must be a positive multiple of 8, got {self.resolution}")
        if self.batch_size < 1:
            raise TrainingInputError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.weight_decay < 0:
            raise TrainingInputError(f"weight_decay must not be negative, got {self.weight_decay}")


@dataclass(frozen=True)
class TiTrainOutcome:
    """What a finished run produced: the embedding safetensors bytes, the last step's loss, steps run."""

    weights: bytes
    final_loss: float
    steps: int


class PlaceholderEmbedding(torch.nn.Module):
    """A text encoder's token embedding grown by trainable rows for the placeholder tokens.

    ``base`` is the copied embedding table and is never changed; ``vectors`` (float32, whatever the
    base dtype, so small updates are not rounded away) are the rows of ``token_ids``. Looked-up rows are
    cast to the base dtype, as ``load_textual_inversion`` casts them when drawing.
    """

    token_ids: torch.Tensor

    def __init__(self, base: torch.nn.Embedding, token_ids: list[int], init: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("token_ids", torch.tensor(token_ids, device=base.weight.device), persistent=False)
        # A child registered after ``base``: the copy's first parameter, and so its ``dtype``, stays the base's.
        self.rows = torch.nn.ParameterList([init.detach().to(base.weight.device, torch.float32).clone()])

    @property
    def vectors(self) -> torch.nn.Parameter:
        """The trainable rows ``[len(token_ids), width]``, float32."""
        vectors: torch.nn.Parameter = self.rows[0]
        return vectors

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        slots = torch.eq(input_ids.unsqueeze(-1), self.token_ids)  # [..., vectors]
        is_new = slots.any(-1, keepdim=True)
        known = self.base(torch.where(is_new.squeeze(-1), 0, input_ids))  # new ids lie past the table
        learned = (slots.to(self.vectors.dtype) @ self.vectors).to(known.dtype)
        return torch.where(is_new, learned, known)


@dataclass(frozen=True)
class EncoderCopy:
    """One text encoder's trainable copy: the copied tokenizer and text encoder, and its new rows."""

    key: str  # "clip_l" / "clip_g" for SDXL, the token itself for SD1.5 (the key of the saved file)
    tokenizer_attr: str
    text_encoder_attr: str
    tokenizer: Any
    text_encoder: torch.nn.Module
    embedding: PlaceholderEmbedding


@dataclass(eq=False)
class TiTrainable:
    """The copies a run trains, and a view of the resident pipeline that encodes prompts with them."""

    tokens: list[str]  # the placeholder token, then "<token>_1" ... for multi-vector words
    encoders: list[EncoderCopy]
    view: DiffusionPipeline  # shares every resident module except the copied tokenizers and encoders

    def parameters(self) -> list[torch.nn.Parameter]:
        """The parameters the optimizer updates: each copy's new rows."""
        return [encoder.embedding.vectors for encoder in self.encoders]


@dataclass(eq=False)
class TiTrainingState:
    """The mutable part of a run: the trainable copies, the optimizer, the RNG and the step reached.

    The seam for checkpoint/resume: a run restored into a ``TiTrainingState`` continues from ``step``.
    """

    trainable: TiTrainable
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    step: int = 0
    losses: list[float] = field(default_factory=list)

    def modules(self) -> dict[str, torch.nn.Module]:
        """The new rows' modules, one per text encoder copy (what checkpoints save)."""
        return {f"encoder{i}": encoder.embedding for i, encoder in enumerate(self.trainable.encoders)}


# --- stage 2: the trainable copies -------------------------------------------------------------------


def placeholder_tokens(token: str, vectors: int) -> list[str]:
    """``token`` and its extra vectors' names, as diffusers' loader names them: ``<t>``, ``<t>_1``, ..."""
    return [token] + [f"{token}_{i}" for i in range(1, vectors)]


def check_token(pipe: DiffusionPipeline, token: str) -> None:
    """Raise ``TrainingInputError`` unless ``token`` can become a new word of ``pipe``'s tokenizers.

    CLIP lowercases prompts, so an upper-case token would never be matched; and an added token is
    matched anywhere in a prompt, so a word the base already knows (e.g. "person") would be hijacked.
    """
    if not token or any(c.isspace() for c in token) or token != token.lower():
        raise TrainingInputError(f"the token must be one lower-case word without spaces, got {token!r}")
    for attr, _ in encoder_attrs(pipe):
        vocab = getattr(pipe, attr).get_vocab()
        if token in vocab or f"{token}</w>" in vocab:  # CLIP's BPE marks word ends with </w>
            raise TrainingInputError(f"the token {token!r} is already a word of the base's {attr}")


def build_trainable(
    pipe: DiffusionPipeline, lock: threading.Lock, token: str, init_word: str, vectors: int
) -> TiTrainable:
    """Copy the tokenizer(s) and text encoder(s), add the placeholder tokens, initialise them.

    Each new row starts as the mean embedding of ``init_word``'s tokens. Everything in the copies is
    frozen except the new rows; the resident modules are untouched (they are only read, under ``lock``).
    """
    check_token(pipe, token)
    tokens = placeholder_tokens(token, vectors)
    keys = SDXL_KEYS if is_sdxl(pipe) else (token,)
    with lock:
        encoders = [
            _copy_encoder(pipe, key, attrs, tokens, init_word) for key, attrs in zip(keys, encoder_attrs(pipe))
        ]
    view = copy.copy(pipe)  # a shallow view: same modules, same config
    for encoder in encoders:  # bypass DiffusionPipeline.__setattr__: the resident config stays as it is
        view.__dict__[encoder.tokenizer_attr] = encoder.tokenizer
        view.__dict__[encoder.text_encoder_attr] = encoder.text_encoder
    return TiTrainable(tokens=tokens, encoders=encoders, view=view)


def _copy_encoder(
    pipe: DiffusionPipeline, key: str, attrs: tuple[str, str], tokens: list[str], init_word: str
) -> EncoderCopy:
    tokenizer = copy.deepcopy(getattr(pipe, attrs[0]))
    text_encoder = copy.deepcopy(getattr(pipe, attrs[1]))
    text_encoder.requires_grad_(False)
    base = text_encoder.get_input_embeddings()
    init = _init_vector(tokenizer, base, init_word)
    if tokenizer.add_tokens(tokens) != len(tokens):
        raise TrainingInputError(f"the tokens {tokens} clash with words the {attrs[0]} already has")
    token_ids = tokenizer.convert_tokens_to_ids(tokens)
    embedding = PlaceholderEmbedding(base, token_ids, init.expand(len(tokens), -1))
    text_encoder.set_input_embeddings(embedding)
    return EncoderCopy(key, attrs[0], attrs[1], tokenizer, text_encoder, embedding)


def _init_vector(tokenizer: Any, table: torch.nn.Embedding, word: str) -> torch.Tensor:
    """The mean float32 embedding of ``word``'s tokens (one token for common words such as "person")."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if not ids:
        raise TrainingInputError(f"the init word {word!r} has no tokens")
    return table.weight.detach()[torch.tensor(ids, device=table.weight.device)].float().mean(0)


def start_training(trainable: TiTrainable, settings: TiTrainSettings) -> TiTrainingState:
    """A fresh ``TiTrainingState``: AdamW over the new rows, the run's seeded RNG, step 0."""
    optimizer = adamw(trainable.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    generator = torch.Generator("cpu").manual_seed(settings.seed)
    return TiTrainingState(trainable=trainable, optimizer=optimizer, generator=generator)


def native_resolution(pipe: DiffusionPipeline) -> int:
    """The base's native image size in pixels (SD1.5 512, SDXL 1024)."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


# --- stage 3: one step ---------------------------------------------------------------------------------


def training_prompts(state: TiTrainingState, class_word: str, count: int) -> list[str]:
    """``count`` captions from ``PROMPT_TEMPLATES``, drawn with the run's generator."""
    subject = f"{state.trainable.tokens[0]} {class_word}"
    picks = torch.randint(0, len(PROMPT_TEMPLATES), (count,), generator=state.generator)
    return [PROMPT_TEMPLATES[int(i)].format(subject) for i in picks]


def encode_prompts(trainable: TiTrainable, prompts: list[str], resolution: int) -> PromptConditioning:
    """Text conditioning from the copies, by the pipeline's own ``encode_prompt`` (with gradients).

    The pipeline's code expands multi-vector tokens and picks the hidden states exactly as drawing
    does, so training sees what a draw will.
    """
    view = trainable.view
    outputs = view.encode_prompt(
        prompts, device=view.device, num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    if not uses_size_conditioning(view.unet):
        return PromptConditioning(outputs[0])
    size = (resolution, resolution)
    return PromptConditioning(outputs[0], outputs[2], sdxl_time_ids(size, (0, 0), size).to(view.device))


def training_step(
    state: TiTrainingState,
    latents: InstanceLatents,
    class_word: str,
    scheduler: DDPMScheduler,
    lock: threading.Lock,
    settings: TiTrainSettings,
    resolution: int,
) -> float:
    """One step: captions → text embeddings → noised latents → predict → MSE → AdamW. Returns the loss."""
    prompts = training_prompts(state, class_word, settings.batch_size)
    batch = _sample_batch(state.generator, latents, scheduler, settings.batch_size)
    params = state.trainable.parameters()
    with lock:
        conditioning = encode_prompts(state.trainable, prompts, resolution)
        loss = denoising_loss(state.trainable.view.unet, scheduler, conditioning, *batch)
        loss.backward(inputs=params)  # only the new rows: no gradient lands on the resident UNet
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    value = float(loss.detach())
    state.losses.append(value)
    return value


def _sample_batch(
    generator: torch.Generator, latents: InstanceLatents, scheduler: DDPMScheduler, batch_size: int
) -> NoisedBatch:
    """Clean latents, noise and timesteps for one step, all from the run's (CPU) generator, and the rows' sizes."""
    device = latents.mean.device
    rows = torch.randint(0, latents.mean.shape[0], (batch_size,), generator=generator)
    clean = latents.sample(rows.to(device), generator)
    noise = torch.randn(clean.shape, generator=generator).to(device, clean.dtype)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
    return NoisedBatch(clean, noise, timesteps.to(device), latents.sizes(rows))


# --- stage 4: save --------------------------------------------------------------------------------------


def save_ti(trainable: TiTrainable) -> bytes:
    """The learned rows as the bytes of an embedding file (``engine.personal.ti.write_embeddings``).

    Keyed by each copy's ``key``: the token for SD1.5, ``SDXL_KEYS`` for SDXL.
    """
    return write_embeddings({e.key: e.embedding.vectors for e in trainable.encoders})


# --- the run ----------------------------------------------------------------------------------------------


def train_textual_inversion(
    pipe: DiffusionPipeline,
    lock: threading.Lock,
    crops: list[Image.Image],
    token: str,
    class_word: str,
    settings: TiTrainSettings,
    on_progress: ProgressSink | None = None,
    *,
    state: TiTrainingState | None = None,
    checkpoints: CheckpointStore | None = None,
    likeness: Judge | None = None,
) -> TiTrainOutcome:
    """Learn the word ``token`` for one user from ``crops``; return the embedding file's bytes.

    ``pipe`` is the resident SD1.5 or SDXL pipeline: its modules are only read, under ``lock``. ``token``
    must be new to its tokenizers (e.g. ``"<u42>"``). ``on_progress`` is called after every step.
    ``state`` is the resume seam: a restored run continues from ``state.step``. With ``likeness`` the
    word kept is the one whose drawings it scored best (``engine.train.likeness``).
    """
    settings.check()
    resolution = settings.resolution or native_resolution(pipe)
    latents = encode_crops(pipe, lock, crops, resolution, flip=settings.random_flip)
    if state is None:
        trainable = build_trainable(pipe, lock, token, settings.init_word or class_word, settings.vectors_per_token)
        state = start_training(trainable, settings)
    checkpointing = Checkpointing(checkpoints, settings.checkpoint_every) if checkpoints else None
    if checkpointing is not None:
        state = checkpointing.resume(state, state.modules())
    scheduler = noise_scheduler_for(pipe)
    _log.info("TI training: %d crops, %d steps from step %d", len(crops), settings.steps, state.step)
    best = BestByLikeness.for_run(
        pipe, lock, likeness, f"{token} {class_word}", settings, resolution,
        view_for=lambda run: run.trainable.view,
        weights_of=lambda run: {f"vectors{i}": p for i, p in enumerate(run.trainable.parameters())},
    )
    clock = ProgressClock(on_progress, settings.steps, state.step)
    loss = state.losses[-1] if state.losses else float("nan")
    while state.step < settings.steps:
        loss = training_step(state, latents, class_word, scheduler, lock, settings, resolution)
        if checkpointing is not None:
            checkpointing.after_step(state, settings.steps, state.modules())
        if best is not None:
            best.after_step(state, settings.steps)  # type: ignore[arg-type]  # duck-typed state
        clock.report(state.step, loss)
    if best is not None:
        best.restore_best(state)  # type: ignore[arg-type]
    return TiTrainOutcome(weights=save_ti(state.trainable), final_loss=loss, steps=state.step)
