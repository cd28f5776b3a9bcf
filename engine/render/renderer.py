"""Drawing with the resident pipeline (SDXL or SD1.5) and users' LoRA adapters.

Each user's adapter is loaded into the resident pipeline once (``load_lora_weights`` with the
adapter's id as its name) and afterwards only switched on with ``set_adapters``; the base weights are
never reloaded. A bounded number of adapters stays loaded, least recently used dropped first. Between
draws the LoRA layers are left disabled, so whoever else uses the shared UNet (InstantID previews)
sees the plain base.

With ``hotswap_rank`` the renderer instead keeps one slot (``engine.render.hotswap``) and copies each
user's UNet LoRA into it in place, so a UNet under ``torch.compile`` switches users without
recompiling; the LoRAs it cannot take (text-encoder weights, a higher rank, other modules) load the
ordinary way beside it, with a log line saying why.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import torch
from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image

from engine.errors import EngineError
from engine.render.fast import FewStep
from engine.render.hotswap import HotswapSlot, SlotWeights, compile_unet
from engine.personal.dreambooth import WeightsCache, WeightSwapper
from engine.personal.ti import loaded_ti
from engine.settings import EngineSettings

if TYPE_CHECKING:
    from engine.pipelines.base import TextToImagePipeline

    Img2ImgPipeline = StableDiffusionXLImg2ImgPipeline | StableDiffusionImg2ImgPipeline

_log = logging.getLogger(__name__)

DEFAULT_MAX_ADAPTERS = EngineSettings.resident_loras
"""Adapters kept loaded at once; an SDXL rank-16 attention LoRA is ~90 MB of float32."""

DEFAULT_DREAMBOOTH_CACHE_BYTES = EngineSettings.dreambooth_cache_bytes
"""Host memory for DreamBooth weights kept between draws: two SDXL UNets in float16."""

_ADAPTER_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # peft keeps adapters in ModuleDicts: no dots
_SELF_WORDS = re.compile(r"\b(?:me|myself|i)\b(?!['’]\w)", re.IGNORECASE)
# Contractions ("I'm", "I've") are left alone: "sks person'm" would be worse than no replacement.


class RenderInputError(EngineError):
    """A draw was asked for with inputs it cannot use."""


class AdapterRef(NamedTuple):
    """A user's LoRA: a stable id (one per trained model) and its safetensors file on disk."""

    adapter_id: str
    path: Path


class EmbeddingRef(NamedTuple):
    """A user's Textual Inversion word: the token it adds and its embedding file on disk."""

    token: str
    path: Path


class UnetWeightsRef(NamedTuple):
    """A user's DreamBooth model: the fine-tuned UNet weights file on disk."""

    path: Path


Personalisation = AdapterRef | EmbeddingRef | UnetWeightsRef
"""What makes a draw the user's own: a LoRA, a learned word, or fine-tuned UNet weights."""


def expand_me(prompt: str, token: str, class_word: str) -> str:
    """Replace the whole words "me", "myself" and "I" (any case) with ``"{token} {class_word}"``.

    >>> expand_me("Me as an astronaut, in a meadow", "sks", "person")
    'sks person as an astronaut, in a meadow'
    """
    subject = f"{token} {class_word}"
    return _SELF_WORDS.sub(lambda _match: subject, prompt)


class Renderer:
    """Draws images on a resident SDXL or SD1.5 pipeline, with or without a user's LoRA.

    Every use of ``pipe`` happens under ``lock``, the lock that guards the shared modules.
    """

    def __init__(
        self,
        pipe: TextToImagePipeline,
        lock: threading.Lock,
        *,
        max_adapters: int = DEFAULT_MAX_ADAPTERS,
        dreambooth_cache_bytes: int = DEFAULT_DREAMBOOTH_CACHE_BYTES,
        hotswap_rank: int | None = None,
        few_step: FewStep | None = None,
    ) -> None:
        """``hotswap_rank``: open a hotswap slot of that rank (≥ every user's LoRA rank to be swapped);
        None loads every LoRA as its own adapter. The slot must open before any LoRA is loaded.
        ``few_step``: the preset's distilled LoRA, for ``draw(fast=True)``; None: no few-step mode."""
        if max_adapters < 1:
            raise ValueError(f"max_adapters must be at least 1, got {max_adapters}")
        self._pipe = pipe
        self._lock = lock
        self._max_adapters = max_adapters
        self._loaded: OrderedDict[str, Path] = OrderedDict()  # adapter id → file, least recent first
        self._slot = HotswapSlot(pipe, hotswap_rank) if hotswap_rank is not None else None
        self._swappable: OrderedDict[str, SlotWeights] = OrderedDict()  # packed once for the slot, least recent first
        self._img2img: Img2ImgPipeline | None = None
        self.few_step = few_step
        self._weight_swapper: WeightSwapper | None = None
        self.dreambooth_weights = WeightsCache(dreambooth_cache_bytes)

    @classmethod
    def from_settings(
        cls,
        pipe: TextToImagePipeline,
        lock: threading.Lock,
        settings: EngineSettings,
        size: tuple[int, int],
        few_step_path: Path | None = None,
    ) -> Renderer:
        """The worker's renderer: hotswap and ``torch.compile`` as configured, warmed up at ``size``;
        few-step mode where ``few_step_path`` (the preset's distilled LoRA) is on disk."""
        hotswap_rank = settings.hotswap_rank if settings.lora_hotswap else None
        renderer = cls(
            pipe, lock, max_adapters=settings.resident_loras, dreambooth_cache_bytes=settings.dreambooth_cache_bytes,
            hotswap_rank=hotswap_rank,
            few_step=FewStep.for_preset(few_step_path),
        )
        if settings.compile_unet:
            renderer.compile(size=size)
        return renderer

    def compile(self, *, size: tuple[int, int] | None = None, backend: Any = "inductor") -> None:
        """Put the shared UNet under ``torch.compile`` and compile it now, with LoRA off and (with a
        slot) on, at ``size`` with guidance: the first users' draws then wait for no compilation.

        Other shapes (sizes, batch sizes) and InstantID's attention processors compile on first use.
        """
        pipe: Any = cast(Any, self._pipe)  # diffusers' pipelines are untyped
        warm_up: dict[str, Any] = {"num_inference_steps": 2, "guidance_scale": 5.0, "output_type": "latent"}
        if size is not None:
            warm_up.update(width=size[0], height=size[1])
        with self._lock:
            compile_unet(pipe, backend)
            pipe("warm-up", **warm_up)
            if self._slot is not None:
                self._slot.activate()  # the slot's zero weights: the same graph as any user's
                try:
                    pipe("warm-up", **warm_up)
                finally:
                    pipe.disable_lora()

    @property
    def hotswapped_adapters(self) -> list[str]:
        """Ids of the adapters read for the hotswap slot, least recently used first."""
        return list(self._swappable)

    @property
    def adapter_capacity(self) -> int:
        """LoRAs held at once (loaded, or packed for the slot) before the least recent is dropped."""
        return self._max_adapters

    @property
    def loaded_adapters(self) -> list[str]:
        """Ids of the adapters now in the pipeline, least recently used first."""
        return list(self._loaded)

    def draw(
        self,
        prompt: str,
        *,
        adapter: Personalisation | None = None,
        negative_prompt: str = "",
        seed: int = 0,
        num_images: int = 1,
        size: tuple[int, int] | None = None,
        steps: int = 30,
        guidance: float = 5.0,
        variation_of: Image.Image | None = None,
        strength: float = 0.6,
        on_step: Callable[[int, int], None] | None = None,
        fast: bool = False,
    ) -> list[Image.Image]:
        """Draw ``num_images`` images of ``prompt``; image ``i`` uses a generator seeded ``seed + i``.

        With ``fast`` the distilled LoRA draws on top (``engine.render.fast``) with its own step count,
        guidance and sampler, in place of ``steps`` and ``guidance``.

        ``on_step(done, total)`` runs after every denoising step; an exception it raises (the worker's
        cancellation) stops the draw there, with the lock released and any LoRA switched off.

        ``size`` is (width, height); None uses the base's native size. With ``adapter`` the user's
        model (a LoRA, a TI word or DreamBooth UNet weights) applies to this draw only; without it the
        plain base draws. With ``variation_of``
        the images are variations of that image (image-to-image at ``strength``: 0 keeps it, 1 redraws).
        """
        if fast:
            few_step = self._require_few_step()
            steps, guidance = few_step.steps, few_step.guidance
        _check_draw(prompt, num_images, steps, size)
        if not 0.0 < strength <= 1.0:
            raise RenderInputError(f"strength must lie in (0, 1], got {strength}")
        width, height = size if size is not None else (None, None)
        generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(num_images)]
        common: dict[str, Any] = {
            "prompt": prompt,
            "negative_prompt": negative_prompt or None,
            "num_images_per_prompt": num_images,
            "num_inference_steps": steps,
            "guidance_scale": guidance,
            "generator": generators,
        }
        if on_step is not None:
            common["callback_on_step_end"] = _step_callback(on_step, steps)
        unet_weights = self._unet_weights(adapter) if isinstance(adapter, UnetWeightsRef) else None
        with self._lock, ExitStack() as personalised:
            self._activate(adapter if isinstance(adapter, AdapterRef) else None)
            if isinstance(adapter, AdapterRef):
                personalised.callback(self._pipe.disable_lora)
            elif isinstance(adapter, EmbeddingRef):
                personalised.enter_context(loaded_ti(self._pipe, adapter.path, adapter.token))
            elif unet_weights is not None:
                personalised.enter_context(self._swapper().swapped(unet_weights))
            if fast:
                variations = [self._variations()] if variation_of is not None else []
                personalised.enter_context(self._require_few_step().active(self._pipe, variations))
            if variation_of is None:
                result = self._pipe(width=width, height=height, **common)
            else:
                start = variation_of.convert("RGB").resize((width, height)) if width and height else variation_of
                result = self._variations()(image=start, strength=strength, **common)
        return list(result.images)

    def few_step_active(self, *pipes: Any) -> AbstractContextManager[None]:
        """The distilled LoRA on the shared UNet, with its sampler on ``pipes`` (e.g. InstantID's), for
        a draw that holds the lock itself (``render_preview``'s ``while_locked``)."""
        return self._require_few_step().active(self._pipe, pipes)

    def _require_few_step(self) -> FewStep:
        if self.few_step is None:
            raise RenderInputError("few-step mode needs the preset's distilled LoRA: run `avatarbooth models pull`")
        return self.few_step

    def _unet_weights(self, ref: UnetWeightsRef) -> Mapping[str, torch.Tensor]:
        """The user's UNet weights, read outside the lock; recent users' stay in host memory."""
        if not ref.path.is_file():
            raise RenderInputError(f"model file {ref.path} does not exist")
        return self.dreambooth_weights.get(ref.path)

    def _swapper(self) -> WeightSwapper:
        if self._weight_swapper is None:
            self._weight_swapper = WeightSwapper(self._pipe)
        return self._weight_swapper

    def _variations(self) -> Img2ImgPipeline:
        """Image-to-image on the same module objects (and so the same loaded adapters)."""
        if self._img2img is None:
            self._img2img = img2img_for(self._pipe)
            self._img2img.set_progress_bar_config(disable=True)
        return self._img2img

    @contextmanager
    def lora_active(self, adapter: AdapterRef) -> Iterator[None]:
        """Make ``adapter`` the only active LoRA for the block, then switch LoRA off again.

        For other pipelines over the shared modules (InstantID). The caller must hold the lock this
        renderer was built with, for the whole block.
        """
        self._activate(adapter)
        try:
            yield
        finally:
            self._pipe.disable_lora()

    def forget(self, adapter_id: str) -> None:
        """Unload ``adapter_id`` if it is loaded (e.g. when the user's model is deleted or replaced)."""
        with self._lock:
            if adapter_id in self._loaded:
                self._unload(adapter_id)
            self._swappable.pop(adapter_id, None)
            if self._slot is not None and self._slot.holder == adapter_id:
                self._slot.clear()

    def forget_weights(self, path: Path) -> None:
        """Drop the DreamBooth weights of ``path`` from the host cache, if held."""
        with self._lock:
            self.dreambooth_weights.drop(path)

    def _activate(self, adapter: AdapterRef | None) -> None:
        """Make ``adapter`` the only active LoRA, loading it on first use; None: LoRA off."""
        if adapter is None:
            if self._loaded or self._slot is not None:
                self._pipe.disable_lora()
            return
        if self._slot is not None and self._swap(adapter, self._slot):
            return
        if adapter.adapter_id in self._loaded:
            self._loaded.move_to_end(adapter.adapter_id)
        else:
            self._load(adapter)
        self._pipe.set_adapters([adapter.adapter_id])
        self._pipe.enable_lora()

    def _swap(self, adapter: AdapterRef, slot: HotswapSlot) -> bool:
        """Put ``adapter`` in the slot and switch it on; False when it goes the ordinary way instead."""
        packed = self._swappable.get(adapter.adapter_id)
        if packed is not None:
            self._swappable.move_to_end(adapter.adapter_id)
        elif adapter.adapter_id in self._loaded:
            return False  # refused before, still loaded the ordinary way
        else:
            _check_ref(adapter)
            lora = slot.read(adapter.path)
            reason = slot.refusal(lora)
            if reason is not None:
                _log.info("LoRA adapter %s loads without hotswap: %s", adapter.adapter_id, reason)
                return False
            while len(self._swappable) >= self._max_adapters:
                self._swappable.popitem(last=False)
            packed = self._swappable[adapter.adapter_id] = slot.pack(lora)
        if slot.holder != adapter.adapter_id:
            slot.swap_in(adapter.adapter_id, packed)
        slot.activate()
        return True

    def _load(self, adapter: AdapterRef) -> None:
        _check_ref(adapter)
        while len(self._loaded) >= self._max_adapters:
            self._unload(next(iter(self._loaded)))
        _log.info("loading LoRA adapter %s", adapter.adapter_id)
        self._pipe.load_lora_weights(str(adapter.path), adapter_name=adapter.adapter_id)
        self._loaded[adapter.adapter_id] = adapter.path

    def _unload(self, adapter_id: str) -> None:
        _log.info("unloading LoRA adapter %s", adapter_id)
        self._pipe.delete_adapters([adapter_id])
        del self._loaded[adapter_id]


def _step_callback(on_step: Callable[[int, int], None], steps: int) -> Callable[..., dict[str, Any]]:
    """diffusers' ``callback_on_step_end`` calling ``on_step(step + 1, steps)``."""

    def callback(_pipe: Any, step: int, _timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        on_step(step + 1, steps)
        return kwargs

    return callback


def img2img_for(pipe: TextToImagePipeline) -> Img2ImgPipeline:
    """The image-to-image pipeline of ``pipe``'s family, over ``pipe``'s module objects (no copies)."""
    if isinstance(pipe, StableDiffusionXLPipeline):
        return StableDiffusionXLImg2ImgPipeline(**pipe.components)
    if isinstance(pipe, StableDiffusionPipeline):
        return StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)
    raise RenderInputError(f"no image-to-image pipeline for {type(pipe).__name__}")


def _check_ref(adapter: AdapterRef) -> None:
    if not _ADAPTER_ID.fullmatch(adapter.adapter_id):
        raise RenderInputError(f"adapter id {adapter.adapter_id!r} must be 1-64 letters, digits, _ or -")
    if not adapter.path.is_file():
        raise RenderInputError(f"adapter file {adapter.path} does not exist")


def _check_draw(prompt: str, num_images: int, steps: int, size: tuple[int, int] | None) -> None:
    if not prompt.strip():
        raise RenderInputError("the prompt is empty")
    if num_images < 1:
        raise RenderInputError(f"num_images must be at least 1, got {num_images}")
    if steps < 1:
        raise RenderInputError(f"steps must be at least 1, got {steps}")
    if size is not None and (min(size) < 8 or size[0] % 8 or size[1] % 8):
        raise RenderInputError(f"size must be two positive multiples of 8, got {size}")
