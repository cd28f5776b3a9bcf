"""Diffusers-format LoRA files: what a user's LoRA is on disk, and writing one from trained adapters.

One safetensors file whose keys are prefixed by module (``unet.``, ``text_encoder.``,
``text_encoder_2.``) and whose metadata carries each adapter's LoraConfig (rank, alpha, targets), so
``pipe.load_lora_weights(path, adapter_name=...)`` rebuilds the adapters exactly: that is how the
renderer loads one (``engine.render.renderer``). Its header is written in one fixed way
(``canonical_safetensors``), so equal adapters are equal bytes and so one blob key.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
"""File name diffusers' ``save_lora_weights`` writes and ``load_lora_weights`` looks for."""


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
