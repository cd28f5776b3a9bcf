"""The resident base: a preset's pipeline (and for SDXL, IdentityNet and InstantID), loaded once per process.

SDXL presets load the SDXL pipeline, IdentityNet and InstantID's adapter; SD1.5 presets load only a
``StableDiffusionPipeline`` (InstantID exists for SDXL only, so ``instantid`` is None). Every pipeline
built on it shares the same module objects (one UNet, one VAE, the same text encoders in memory).
Whoever runs them holds ``gpu_lock``: the modules carry per-call state (the scheduler's timesteps,
which attention processors and LoRA adapters are active).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from engine.errors import PreviewUnavailable

if TYPE_CHECKING:
    from diffusers import ControlNetModel, StableDiffusionPipeline, StableDiffusionXLPipeline

    from engine.pipelines.instantid import IdentityAdapter, InstantIDPipeline
    from engine.presets import Preset

    TextToImagePipeline = StableDiffusionXLPipeline | StableDiffusionPipeline
    """The resident text-to-image pipeline of either family."""

_log = logging.getLogger(__name__)


@dataclass(eq=False)
class ResidentBase:
    """The loaded base model: ``text2img`` and (SDXL only) ``instantid`` pipelines over shared modules."""

    preset: Preset
    device: torch.device
    dtype: torch.dtype
    text2img: TextToImagePipeline
    instantid: InstantIDPipeline | None  # None for SD1.5: InstantID exists for SDXL only
    identity: IdentityAdapter | None
    gpu_lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def load(cls, preset: Preset, device: str = "cpu", dtype: torch.dtype | None = None) -> ResidentBase:
        """Load ``preset``'s weights with diffusers' ``from_pretrained`` onto ``device``.

        ``device`` is "cpu", "cuda" (or "cuda:N"), or "auto" for CUDA when present. ``dtype`` defaults
        to ``resident_dtype(device)``: float16 on CUDA, float32 on the CPU.
        """
        from engine.presets import FAMILY_SD15

        target = _resolve_device(device)
        dtype = dtype or resident_dtype(target.type)
        if preset.family == FAMILY_SD15:
            base = cls(preset, target, dtype, _load_sd15(preset, target, dtype), None, None)
        else:
            base = cls(preset, target, dtype, *_load_sdxl(preset, target, dtype))
        for pipe in (base.text2img, base.instantid):
            if pipe is not None:
                pipe.set_progress_bar_config(disable=True)
        _log.info("resident base %r (%s) loaded on %s (%s)", preset.name, preset.family, target, dtype)
        return base

    @property
    def unet(self) -> torch.nn.Module:
        """The one UNet every pipeline uses."""
        return self.text2img.unet

    def modules(self) -> dict[str, torch.nn.Module]:
        """Every module this base holds on its device, by name (what engine.train.memory counts)."""
        held = {name: m for name, m in self.text2img.components.items() if isinstance(m, torch.nn.Module)}
        if self.instantid is not None:
            held["controlnet"] = self.instantid.controlnet
        if self.identity is not None:
            processors = [p for p in self.identity.processors.values() if isinstance(p, torch.nn.Module)]
            held["identity"] = torch.nn.ModuleList([self.identity.projection, *processors])
        return held

    def require_instantid(self) -> InstantIDPipeline:
        """The InstantID pipeline, or ``PreviewUnavailable`` when the preset has none (SD1.5)."""
        if self.instantid is None:
            raise PreviewUnavailable(
                f"Zero-shot previews need an SDXL preset (InstantID is SDXL-only); the {self.preset.name!r} "
                "preset is SD1.5. Train a model with /train, then draw with /draw."
            )
        return self.instantid


RESIDENT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
"""The ``[engine] dtype`` values besides "auto", by name."""


def resident_dtype(device_type: str, configured: str = "auto") -> torch.dtype:
    """The dtype the resident modules are loaded in: ``configured``, or for "auto" float16 on CUDA and
    float32 elsewhere.

    Float16, not bfloat16, on CUDA: a DreamBooth fine-tune (lr 2e-6) moves a weight by less than
    bfloat16's step at its size (8 significant bits; float16 has 11), so copying the trained UNet into
    a bfloat16 resident rounds most of it away. The SD families are published and run in float16, and
    where their VAE overflows in it (SDXL's ``force_upcast``) the decode and encode paths upcast.
    """
    if configured == "auto":
        return torch.float16 if device_type == "cuda" else torch.float32
    if configured not in RESIDENT_DTYPES:
        raise ValueError(f"dtype must be auto or one of {', '.join(RESIDENT_DTYPES)}, got {configured!r}")
    return RESIDENT_DTYPES[configured]


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _load_sdxl(
    preset: Preset, device: torch.device, dtype: torch.dtype
) -> tuple[StableDiffusionXLPipeline, InstantIDPipeline, IdentityAdapter]:
    """The SDXL pipeline, and InstantID built over its modules."""
    from engine.pipelines.instantid import InstantIDPipeline

    text2img, controlnet = _load_modules(preset, device, dtype)
    identity = _load_identity_adapter(text2img, preset)
    return text2img, InstantIDPipeline.from_text2img(text2img, controlnet, identity), identity


def _load_sd15(preset: Preset, device: torch.device, dtype: torch.dtype) -> StableDiffusionPipeline:
    """The SD1.5 pipeline from its folder, without the safety checker (the chat side moderates)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        preset.sd15_dir,
        dtype=dtype,
        local_files_only=True,
        safety_checker=None,
        requires_safety_checker=False,
    )
    pool_at_end_of_text(pipe)
    return pipe.to(device)


def _load_modules(
    preset: Preset, device: torch.device, dtype: torch.dtype
) -> tuple[StableDiffusionXLPipeline, ControlNetModel]:
    """The SDXL pipeline and IdentityNet, from their folders, on ``device``."""
    from diffusers import ControlNetModel, StableDiffusionXLPipeline

    text2img = StableDiffusionXLPipeline.from_pretrained(
        preset.sdxl_dir, dtype=dtype, local_files_only=True, add_watermarker=False
    ).to(device)
    pool_at_end_of_text(text2img)
    controlnet = ControlNetModel.from_pretrained(preset.identitynet_dir, dtype=dtype, local_files_only=True)
    return text2img, controlnet.to(device)


def pool_at_end_of_text(pipe: TextToImagePipeline) -> None:
    """Make each CLIP text encoder of ``pipe`` pool at its tokenizer's first end-of-text token.

    The published SD1.5 and SDXL text encoder configs carry the legacy ``eos_token_id: 2``, and with
    that value transformers' CLIP text model pools at ``input_ids.argmax(-1)``: end-of-text is the
    highest id of the base vocabulary, but an added Textual Inversion word (id > 49407) is higher, and
    CLIP's causal mask then drops every token after the word from the pooled embedding (for SDXL,
    text_encoder_2's ``text_embeds``, the UNet's pooled conditioning). With the tokenizer's real
    ``eos_token_id`` it pools at the first end-of-text instead, which is right whether the tokenizer
    pads with end-of-text (``tokenizer``) or with "!" (SDXL's ``tokenizer_2``). Prompts without added
    words pool where they did. Every loader of the base pipeline calls this; the trainable copies of
    Textual Inversion (``engine.train.ti``) are deep copies of these encoders and inherit it.
    """
    for tokenizer_attr, encoder_attr in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
        tokenizer, encoder = getattr(pipe, tokenizer_attr, None), getattr(pipe, encoder_attr, None)
        if tokenizer is None or encoder is None:
            continue
        for module in encoder.modules():  # the encoder itself, or its ``text_model`` (with projection)
            if getattr(module, "eos_token_id", None) is not None:  # what CLIP's forward reads
                module.eos_token_id = tokenizer.eos_token_id
                module.config.eos_token_id = tokenizer.eos_token_id
        encoder.config.eos_token_id = tokenizer.eos_token_id


def _load_identity_adapter(text2img: StableDiffusionXLPipeline, preset: Preset) -> IdentityAdapter:
    """Load InstantID's adapter with diffusers' loader, then take it back out of the UNet.

    ``low_cpu_mem_usage=False`` makes the loader check the checkpoint's keys strictly (it would
    otherwise leave missing weights uninitialised without a word).
    """
    from engine.pipelines.instantid import IdentityAdapter

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
