"""Peak GPU memory of a training run, estimated before it starts, and the refusal when it cannot fit.

The estimate adds up what is on the GPU at the peak of a training step (the backward pass):

- ``resident``: every module of the resident base in its dtype (it keeps serving draws meanwhile);
- ``trainable``: the copies a method trains on (LoRA: a copy of the UNet in the resident dtype and its
  float32 adapters; Textual Inversion: copies of the text encoders; DreamBooth: a float32 copy of the
  UNet, and of the text encoders when they train);
- ``gradients`` (float32, one per trained weight) and ``optimizer`` state (AdamW: two float32 moments
  per weight; Adafactor without a first moment: its factored row and column statistics);
- ``activations``: measured, not guessed. The UNet's forward runs on the meta device (no memory, no
  weights) at the training resolution while a saved-tensors hook adds up what autograd keeps for the
  backward pass; attention is counted as flash attention keeps it (its inputs, output and log-sum-exp,
  not the score matrix). With gradient checkpointing only each checkpointed block's inputs are kept,
  plus one block's activations while it is recomputed (the largest). One forward per loss term: the
  instance batch, and with prior preservation the class batch, are both alive at the backward;
- ``weight_copies``: under bfloat16 autocast every weight a matmul or convolution uses is cast and kept
  for the backward (measured in the same pass);
- ``overhead``: ``OVERHEAD_BYTES``, the CUDA context, the caching allocator's slack and a draw alongside.

Activations are counted at 2 bytes per value (bfloat16 autocast on a GPU; the ops autocast keeps in
float32, such as group norm, are counted at 2 bytes too), so the estimate is a planning figure to check
against a real run (``bench/gpu_run.sh``), not a guarantee. docs/memory.md has the table for each
method and preset.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.errors import EngineError

GIB = 2**30
OVERHEAD_BYTES = 2 * GIB
"""CUDA context (~0.5 GB), allocator fragmentation and a draw's working memory beside the training."""

_COMPUTE_BYTES = 2  # bfloat16 autocast (or a float16 UNet): 2 bytes per activation value
_ADAFACTOR = "adafactor"


class NotEnoughGpuMemory(EngineError):
    """A training method whose estimated peak does not fit the worker's GPU; the message says what to change."""


@dataclass(frozen=True)
class TrainingShape:
    """What the estimate needs to know about one run (``engine.train.methods`` builds it from the settings)."""

    method: str  # "lora", "ti" or "dreambooth"
    resolution: int
    batch_size: int = 1
    with_prior: bool = False
    gradient_checkpointing: bool = False
    train_text_encoder: bool = False
    lora_rank: int = 16
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    optimizer: str = "adamw"  # DreamBooth's; LoRA and TI always use AdamW
    autocast: bool = True  # bfloat16 autocast over weights of another dtype (LoRA, DreamBooth on a GPU)


@dataclass(frozen=True)
class MemoryPlan:
    """The estimated peak of one run, by part, in bytes."""

    shape: TrainingShape
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        """'41.2 GiB (resident 9.6, trainable 9.6, …)' for logs and refusals."""
        parts = ", ".join(f"{name} {size / GIB:.1f}" for name, size in self.parts.items())
        return f"{self.total / GIB:.1f} GiB ({parts})"


def plan_training(modules: Mapping[str, torch.nn.Module], shape: TrainingShape, resident_dtype: torch.dtype) -> MemoryPlan:
    """The estimated peak of a run of ``shape`` over the resident ``modules``.

    ``modules`` are the resident base's modules by name ("unet", "text_encoder", "text_encoder_2",
    "vae", "controlnet", …), loaded or on the meta device: only their shapes and configs are read.
    """
    unet = modules["unet"]
    encoders = [m for name, m in modules.items() if name.startswith("text_encoder")]
    resident_size = torch.empty((), dtype=resident_dtype).element_size()
    unet_params = _numel(unet)
    parts = {"resident": sum(_numel(m) for m in modules.values()) * resident_size}
    trained: list[torch.nn.Parameter] = []
    if shape.method == "lora":
        lora = lora_parameter_count(unet, shape.lora_rank, shape.lora_targets)
        parts["trainable"] = unet_params * resident_size + lora * 4
        trained_count = lora
    elif shape.method == "ti":
        parts["trainable"] = sum(_numel(e) for e in encoders) * resident_size
        trained_count = 0  # a few new embedding rows
    elif shape.method == "dreambooth":
        trained = [p for module in [unet, *(encoders if shape.train_text_encoder else [])] for p in module.parameters()]
        trained_count = sum(p.numel() for p in trained)
        parts["trainable"] = trained_count * 4
    else:
        raise ValueError(f"unknown training method {shape.method!r}")
    parts["gradients"] = trained_count * 4
    if shape.method == "dreambooth" and shape.optimizer == _ADAFACTOR:
        parts["optimizer"] = sum(adafactor_state_numel(p.shape) for p in trained) * 4
    else:
        parts["optimizer"] = trained_count * 8
    forwards = 2 if shape.with_prior else 1
    saved = unet_saved_bytes(unet, shape.resolution, shape.batch_size, shape.gradient_checkpointing)
    parts["activations"] = saved.activations * forwards
    # TI draws through the resident UNet in its own dtype: the weights it saves are the weights themselves.
    copies = shape.autocast and shape.method != "ti"
    parts["weight_copies"] = saved.weights * forwards if copies else 0
    parts["overhead"] = OVERHEAD_BYTES
    return MemoryPlan(shape, parts)


def check_fits(plan: MemoryPlan, gpu_bytes: int) -> None:
    """Raise ``NotEnoughGpuMemory`` when ``plan`` needs more than ``gpu_bytes``, naming what to change."""
    if plan.total <= gpu_bytes:
        return
    shape = plan.shape
    advice = []
    if not shape.gradient_checkpointing:
        advice.append("set [training] gradient_checkpointing = true")
    if shape.method == "dreambooth" and shape.optimizer != _ADAFACTOR:
        advice.append('set [training] dreambooth_optimizer = "adafactor"')
    if shape.method == "dreambooth" and shape.train_text_encoder:
        advice.append("set [training] train_text_encoder = false")
    if shape.method != "lora":
        advice.append('offer "lora" first in [training] enabled_methods')
    advice.append("or run the worker on a GPU with more memory")
    raise NotEnoughGpuMemory(
        f"{shape.method} training at {shape.resolution}² needs about {plan.describe()}, more than this GPU's "
        f"{gpu_bytes / GIB:.1f} GiB; in config.toml, {'; '.join(advice)}"
    )


def lora_parameter_count(unet: torch.nn.Module, rank: int, targets: tuple[str, ...]) -> int:
    """The weights a rank-``rank`` LoRA on the linear layers named ``targets`` adds (peft's matching:
    the module name ends with a target)."""
    return sum(
        rank * (module.in_features + module.out_features)
        for name, module in unet.named_modules()
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith(f".{t}") for t in targets)
    )


def adafactor_state_numel(shape: torch.Size) -> int:
    """Values transformers' Adafactor keeps for a parameter of ``shape`` (no first moment): a row and a
    column statistic for 2-D and larger, the whole second moment otherwise."""
    if len(shape) < 2:
        return int(torch.Size(shape).numel())
    return int(torch.Size(shape[:-1]).numel() + torch.Size((*shape[:-2], shape[-1])).numel())


@dataclass(frozen=True)
class SavedBytes:
    """What one UNet forward keeps for its backward: activations, and the weights the ops hold."""

    activations: int
    weights: int


def unet_saved_bytes(unet: torch.nn.Module, resolution: int, batch: int, checkpointing: bool) -> SavedBytes:
    """Measure what a training forward of ``unet``'s architecture keeps, on the meta device."""
    from diffusers import UNet2DConditionModel

    config: Any = dict(getattr(unet, "config"))  # diffusers' FrozenDict
    with torch.device("meta"):
        model: Any = UNet2DConditionModel.from_config(config)  # type: ignore[no-untyped-call]
    torch.nn.Module.to(model, torch.bfloat16)  # not diffusers' own .to, which warns about fp32 modules
    model.requires_grad_(True).train()
    params = {id(p) for p in model.parameters()}
    counter = _SavedCounter(params)
    if checkpointing:
        model.enable_gradient_checkpointing(gradient_checkpointing_func=counter.checkpointed)
    inputs = _unet_inputs(model, resolution, batch)
    with _flash_like_attention(), torch.autograd.graph.saved_tensors_hooks(counter.pack, _unpack):
        model(**inputs)
    return SavedBytes(counter.outside + counter.largest_block, counter.weights)


class _SavedCounter:
    """Adds up the bytes of tensors autograd saves; weights (parameters) are counted apart."""

    def __init__(self, params: set[int]) -> None:
        self._params = params
        self.outside = 0  # activations kept for the whole backward
        self.weights = 0
        self.largest_block = 0  # the most one checkpointed block holds while it is recomputed

    def _is_weight(self, tensor: torch.Tensor) -> bool:
        base = tensor._base
        return id(tensor) in self._params or (base is not None and id(base) in self._params)

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        size = tensor.numel() * tensor.element_size()
        if self._is_weight(tensor):
            self.weights += size
        else:
            self.outside += size
        return tensor

    def checkpointed(self, block: Callable[..., Any], *args: Any) -> Any:
        """Stands in for torch's checkpoint: the block's inputs are kept, its own activations only while
        it runs again in the backward."""
        self.outside += sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))
        inside = 0

        def pack_inside(tensor: torch.Tensor) -> torch.Tensor:
            nonlocal inside
            inside += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack_inside, _unpack):
            out = block(*args)
        self.largest_block = max(self.largest_block, inside)
        return out


def _unpack(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _unet_inputs(model: torch.nn.Module, resolution: int, batch: int) -> dict[str, Any]:
    config: Any = getattr(model, "config")
    side = resolution // 8  # the VAE's downsampling
    meta = functools.partial(torch.empty, device="meta", dtype=torch.bfloat16)
    inputs: dict[str, Any] = {
        "sample": meta(batch, config.in_channels, side, side),
        "timestep": torch.zeros(batch, device="meta", dtype=torch.long),
        "encoder_hidden_states": meta(batch, 77, config.cross_attention_dim),
    }
    if config.addition_embed_type == "text_time":  # SDXL: pooled text and six size numbers
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {"text_embeds": meta(batch, pooled), "time_ids": meta(batch, 6)}
    return inputs


class _FlashAttention(torch.autograd.Function):
    """Attention that keeps what flash attention keeps for its backward: q, k, v, out, log-sum-exp."""

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = _PLAIN_SDPA(query, key, value)
        logsumexp = torch.empty(query.shape[:-1], device=query.device, dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, logsumexp)
        return out

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> Any:  # the estimate never runs a backward
        raise NotImplementedError


_PLAIN_SDPA = torch.nn.functional.scaled_dot_product_attention


@contextlib.contextmanager
def _flash_like_attention() -> Iterator[None]:
    """Route ``F.scaled_dot_product_attention`` (which diffusers' processors call) through
    ``_FlashAttention`` for the block: on the meta device torch would pick the math kernel, which keeps
    the whole score matrix, as no GPU kernel does."""

    def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Any = None,
                  dropout_p: float = 0.0, is_causal: bool = False, **kwargs: Any) -> torch.Tensor:
        # Draws in other threads meanwhile get torch's own function, untouched.
        if query.device.type != "meta" or attn_mask is not None or is_causal or kwargs:
            return _PLAIN_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                               **kwargs)
        out: torch.Tensor = _FlashAttention.apply(query, key, value)  # type: ignore[no-untyped-call]
        return out

    with _PATCH_LOCK:
        torch.nn.functional.scaled_dot_product_attention = attention  # type: ignore[assignment]
        try:
            yield
        finally:
            torch.nn.functional.scaled_dot_product_attention = _PLAIN_SDPA


_PATCH_LOCK = threading.Lock()


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
