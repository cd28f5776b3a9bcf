"""The resident base: a preset's SDXL pipeline, IdentityNet and InstantID adapter, loaded once per process.

Every pipeline built on it shares the same module objects (one UNet, one VAE, one pair of text
encoders in memory). Whoever runs them holds ``gpu_lock``: the modules carry per-call state (the
scheduler's timesteps, which attention processors and LoRA adapters are active).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from diffusers import ControlNetModel, StableDiffusionXLPipeline

    from engine.instantid import IdentityAdapter, InstantIDPipeline
    from engine.presets import Preset

_log = logging.getLogger(__name__)


@dataclass(eq=False)
class ResidentBase:
    """The loaded base model: ``text2img`` and ``instantid`` pipelines over shared modules."""

    preset: Preset
    device: torch.device
    dtype: torch.dtype
    text2img: StableDiffusionXLPipeline
    instantid: InstantIDPipeline
    identity: IdentityAdapter
    gpu_lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def load(cls, preset: Preset, device: str = "cpu", dtype: torch.dtype | None = None) -> ResidentBase:
        """Load ``preset``'s weights with diffusers' ``from_pretrained`` onto ``device``.

        ``device`` is "cpu", "cuda" (or "cuda:N"), or "auto" for CUDA when present. ``dtype`` defaults
        to bfloat16 on CUDA and float32 on the CPU.
        """
        target = _resolve_device(device)
        dtype = dtype or (torch.bfloat16 if target.type == "cuda" else torch.float32)
        text2img, controlnet = _load_modules(preset, target, dtype)
        identity = _load_identity_adapter(text2img, preset)
        from engine.instantid import InstantIDPipeline

        instantid = InstantIDPipeline.from_text2img(text2img, controlnet, identity)
        for pipe in (text2img, instantid):
            pipe.set_progress_bar_config(disable=True)
        _log.info("resident base %r loaded on %s (%s)", preset.name, target, dtype)
        return cls(preset, target, dtype, text2img, instantid, identity)

    @property
    def unet(self) -> torch.nn.Module:
        """The one UNet every pipeline uses."""
        return self.text2img.unet


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _load_modules(
    preset: Preset, device: torch.device, dtype: torch.dtype
) -> tuple[StableDiffusionXLPipeline, ControlNetModel]:
    """The SDXL pipeline and IdentityNet, from their folders, on ``device``."""
    from diffusers import ControlNetModel, StableDiffusionXLPipeline

    text2img = StableDiffusionXLPipeline.from_pretrained(
        preset.sdxl_dir, dtype=dtype, local_files_only=True, add_watermarker=False
    ).to(device)
    controlnet = ControlNetModel.from_pretrained(preset.identitynet_dir, dtype=dtype, local_files_only=True)
    return text2img, controlnet.to(device)


def _load_identity_adapter(text2img: StableDiffusionXLPipeline, preset: Preset) -> IdentityAdapter:
    """Load InstantID's adapter with diffusers' loader, then take it back out of the UNet.

    ``low_cpu_mem_usage=False`` makes the loader check the checkpoint's keys strictly (it would
    otherwise leave missing weights uninitialised without a word).
    """
    from engine.instantid import IdentityAdapter

    path = preset.ip_adapter_path
    text2img.load_ip_adapter(
        str(path.parent),
        subfolder="",
        weight_name=path.name,
        image_encoder_folder=None,  # InstantID's tokens come from a face embedding, not CLIP vision
        low_cpu_mem_usage=False,
        local_files_only=True,
    )
    identity = IdentityAdapter.take_from(text2img.unet)
    text2img.unload_ip_adapter()  # the shared UNet stays plain; InstantID attaches it per call
    return identity
