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
5. ``write_weights``    the trained modules' full state dicts as one safetensors file, keys prefixed by
   module (``"unet.conv_in.weight"``, ``"text_encoder.…"``), streamed tensor by tensor (an SDXL UNet is
   ~5 GB in float16: it is never held whole in memory).

``train_dreambooth`` runs them in order, reports progress after every step and, given a
``CheckpointStore``, checkpoints every ``checkpoint_every`` steps and resumes a killed run from the last one.

Drawing with a trained model never reloads the base: ``WeightSwapper`` copies the user's weights into the
resident modules' tensors for one draw (under the lock) and copies the base weights back afterwards;
``WeightsCache`` keeps several users' files in (pinned) host memory between draws. The weights are saved
in the resident modules' dtype, so a swap puts back exactly what was saved: keep the resident in
float16 on a GPU (``engine.pipelines.base.resident_dtype``), as bfloat16 rounds a small-lr fine-tune away.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

import torch
from PIL import Image

from engine.train.checkpoints import Checkpointing, CheckpointStore
from engine.errors import EngineError
from engine.train.likeness import BestByLikeness, Judge
from engine.progress import ProgressSink
from engine.train.stages import (
    TEXT_ENCODERS,
    TrainingInputError,
    TrainingState,
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

WEIGHTS_FORMAT = "avatarbooth-dreambooth/1"
"""The ``format`` metadata of a DreamBooth weights file."""

class DreamBoothWeightsError(EngineError):
    """A weights file that does not fit the resident base (another base, or not a DreamBooth file)."""


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
    return torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)


# --- stage 5: save -----------------------------------------------------------------------------------


_SAFETENSORS_DTYPES = {
    torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_weights(modules: Mapping[str, torch.nn.Module], file: IO[bytes], dtype: torch.dtype) -> None:
    """The modules' state dicts as a safetensors file, keys ``"<module>.<name>"``, floats in ``dtype``.

    Written as safetensors lays it out (an 8-byte header length, the JSON header, then each tensor's
    bytes at its offset), one tensor at a time, so only one tensor is ever copied to the CPU at once.
    The same weights always give the same bytes (sorted keys, one metadata entry), hence one blob key.
    """
    tensors = {
        f"{prefix}.{name}": tensor
        for prefix, module in modules.items()
        for name, tensor in module.state_dict().items()
    }
    header: dict[str, object] = {"__metadata__": {"format": WEIGHTS_FORMAT}}
    offset = 0
    for name in sorted(tensors):
        out_dtype = _saved_dtype(tensors[name], dtype)
        size = tensors[name].numel() * torch.empty((), dtype=out_dtype).element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[out_dtype], "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # safetensors aligns the data to 8 bytes
    file.write(struct.pack("<Q", len(encoded)))
    file.write(encoded)
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu", _saved_dtype(tensors[name], dtype)).contiguous()
        file.write(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())


def _saved_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    return dtype if tensor.is_floating_point() else tensor.dtype  # ids and counters stay integers


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



# --- drawing: swap the weights in, draw, swap the base back ----------------------------------------------


def load_weights(path: Path, *, pin: bool = False) -> dict[str, torch.Tensor]:
    """A DreamBooth weights file's tensors, on the CPU (in page-locked memory with ``pin``)."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    return {name: t.pin_memory() for name, t in tensors.items()} if pin else tensors


class WeightsCache:
    """Users' DreamBooth weights kept in host memory between draws, least recently used dropped first.

    Bounded by ``max_bytes`` in all (an SDXL UNet in float16 is ~5.1 GB); a file larger than the bound
    is read for its draw and not kept. On a CUDA host the tensors are pinned, so a swap copies them to
    the GPU at full speed. Entries whose file has gone (the user's model was deleted or erased) are
    dropped on the next lookup. Not thread-safe: the renderer calls it from one draw at a time.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must not be negative, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Path, tuple[dict[str, torch.Tensor], int]] = OrderedDict()

    @property
    def paths(self) -> list[Path]:
        """The files held now, least recently used first."""
        return list(self._entries)

    @property
    def nbytes(self) -> int:
        """Host memory the held weights take."""
        return sum(size for _, size in self._entries.values())

    def get(self, path: Path) -> dict[str, torch.Tensor]:
        """The tensors of ``path``, from memory when held, else read (and kept when they fit)."""
        for gone in [p for p in self._entries if not p.is_file()]:
            del self._entries[gone]
        if path in self._entries:
            self._entries.move_to_end(path)
            return self._entries[path][0]
        tensors = load_weights(path, pin=torch.cuda.is_available())
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if size <= self.max_bytes:
            while self.nbytes + size > self.max_bytes:
                self._entries.popitem(last=False)
            self._entries[path] = (tensors, size)
        return tensors

    def drop(self, path: Path) -> None:
        """Forget ``path``'s tensors, if held."""
        self._entries.pop(path, None)


class WeightSwapper:
    """Puts a user's DreamBooth weights into the resident pipeline's modules for a while.

    The base values of every tensor it overwrites are copied to (pinned, on a GPU) CPU memory the first
    time and copied back after each swap, so the base is never reloaded. Callers hold the lock that
    guards the resident modules for the whole swap: nobody else may see the user's weights.
    """

    def __init__(self, pipe: TextToImagePipeline) -> None:
        self._pipe = pipe
        self._base: dict[str, torch.Tensor] = {}
        self._active = False

    @contextlib.contextmanager
    def swapped(self, weights: Mapping[str, torch.Tensor]) -> Iterator[None]:
        """The user's ``weights`` in the resident modules inside the block; the base again after it."""
        if self._active:
            raise DreamBoothWeightsError("a DreamBooth swap is already active on this pipeline")
        targets = _resident_tensors(self._pipe, weights)
        self._remember_base(targets)
        self._active = True
        try:
            _copy_into(targets, weights)
            yield
        finally:
            _copy_into(targets, self._base)
            self._active = False

    def _remember_base(self, targets: Mapping[str, torch.Tensor]) -> None:
        pin = torch.cuda.is_available()
        for name, tensor in targets.items():
            if name not in self._base:
                saved = tensor.detach().to("cpu", copy=True)
                self._base[name] = saved.pin_memory() if pin and tensor.is_cuda else saved


@contextlib.contextmanager
def swap_unet_weights(
    pipe: TextToImagePipeline,
    lock: threading.Lock,
    weights_path: Path,
    swapper: WeightSwapper | None = None,
) -> Iterator[TextToImagePipeline]:
    """Hold ``lock`` with the user's weights in ``pipe``; yields ``pipe`` to draw with (no other locking).

    Keep one ``swapper`` per resident pipeline: without one, the base values are copied on every call.
    """
    weights = load_weights(weights_path)  # read before taking the lock
    swapper = swapper or WeightSwapper(pipe)
    with lock, swapper.swapped(weights):
        yield pipe


def _resident_tensors(pipe: TextToImagePipeline, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The resident tensor each key of ``weights`` goes into; refuses a file that does not fit exactly."""
    prefixes = {key.split(".", 1)[0] for key in weights}
    if "unet" not in prefixes or not prefixes <= {"unet", *TEXT_ENCODERS}:
        raise DreamBoothWeightsError(f"not a DreamBooth weights file (modules {sorted(prefixes)})")
    targets: dict[str, torch.Tensor] = {}
    for prefix in prefixes:
        targets.update({f"{prefix}.{name}": t for name, t in _plain_state(getattr(pipe, prefix)).items()})
    if targets.keys() != weights.keys():
        raise DreamBoothWeightsError("the weights file was trained on a different base model")
    wrong = [k for k, t in targets.items() if t.shape != weights[k].shape]
    if wrong:
        raise DreamBoothWeightsError(f"the weights file was trained on a different base model ({wrong[0]})")
    return targets


def _plain_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's state tensors under their names without LoRA layers (adapters the renderer loaded)."""
    return {
        name.replace(".base_layer.", "."): tensor
        for name, tensor in module.state_dict(keep_vars=True).items()
        if "lora_" not in name
    }


@torch.no_grad()
def _copy_into(targets: Mapping[str, torch.Tensor], values: Mapping[str, torch.Tensor]) -> None:
    for name, tensor in targets.items():
        tensor.data.copy_(values[name])
