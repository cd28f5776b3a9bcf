"""DreamBooth weights files: writing one, reading it, and swapping it into the resident pipeline.

A weights file is the trained modules' full state dicts as one safetensors file, keys prefixed by
module (``"unet.conv_in.weight"``, ``"text_encoder.…"``), written tensor by tensor (an SDXL UNet is
~5 GB in float16: it is never held whole in memory).

Drawing with a trained model never reloads the base: ``WeightSwapper`` copies the user's weights into the
resident modules' tensors for one draw (under the lock) and copies the base weights back afterwards;
``WeightsCache`` keeps several users' files in (pinned) host memory between draws. The weights are saved
in the resident modules' dtype, so a swap puts back exactly what was saved: keep the resident in
float16 on a GPU (``engine.pipelines.base.resident_dtype``), as bfloat16 rounds a small-lr fine-tune away.
"""

from __future__ import annotations

import contextlib
import json
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING

import torch

from engine.errors import EngineError
from engine.personal import TEXT_ENCODERS

if TYPE_CHECKING:
    from engine.pipelines.base import TextToImagePipeline

WEIGHTS_FORMAT = "avatarbooth-dreambooth/1"
"""The ``format`` metadata of a DreamBooth weights file."""


class DreamBoothWeightsError(EngineError):
    """A weights file that does not fit the resident base (another base, or not a DreamBooth file)."""


# --- writing -------------------------------------------------------------------------------------------


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


# --- reading and drawing: swap the weights in, draw, swap the base back ----------------------------------


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
