"""Few-step mode: the preset's distilled LoRA (SDXL-Lightning's 8-step) stacked on the resident UNet.

``FewStep`` loads the distilled LoRA once, as one more adapter of the shared UNet (``FEW_STEP``),
and ``FewStep.active`` switches it on for one denoising call, beside whatever user's LoRA is on,
with the sampler the distillation was trained for: Euler on "trailing" timesteps, ``steps`` steps,
no classifier-free guidance. On leaving, every LoRA layer's active adapters, the UNet's LoRA switch
and the pipelines' schedulers are put back as they were, so the next full-steps draw is unchanged.

The adapters are switched per layer (``set_adapter``), not with ``set_adapters``: that would write
each adapter's scaling over the hotswap slot's (``engine.render.hotswap``). Under ``torch.compile``
the first few-step draw compiles one more graph (other active adapters); later ones reuse it.

Callers hold the shared modules' lock, as for any draw.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from engine.errors import EngineError
from engine.presets import FEW_STEP_GUIDANCE, FEW_STEP_STEPS

_log = logging.getLogger(__name__)

FEW_STEP = "few_step"
"""The distilled LoRA's adapter name (users' adapter ids are content hashes: no clash)."""


class FewStepUnavailable(EngineError):
    """Few-step mode was asked for where the preset has no distilled weights."""


class FewStep:
    """The distilled LoRA of one resident pipeline, and the sampler settings that go with it."""

    def __init__(self, path: Path, steps: int = FEW_STEP_STEPS, guidance: float = FEW_STEP_GUIDANCE) -> None:
        self.path = path
        self.steps = steps
        self.guidance = guidance
        self._loaded_into: int | None = None  # id() of the UNet the adapter is in

    @classmethod
    def for_preset(cls, path: Path | None) -> FewStep | None:
        """The preset's few-step mode, or None where its distilled LoRA is not on disk."""
        if path is None or not path.is_file():
            return None
        return cls(path)

    @contextmanager
    def active(self, pipe: Any, schedulers_of: Sequence[Any] = ()) -> Iterator[None]:
        """Inside: ``pipe.unet`` runs with the distilled LoRA on (and the user's LoRA, if one is on),
        and ``pipe`` and every pipeline in ``schedulers_of`` sample with trailing Euler."""
        from diffusers import EulerDiscreteScheduler

        euler: Any = EulerDiscreteScheduler.from_config  # untyped

        unet = pipe.unet
        layers = _lora_layers(unet)
        held = {id(layer): list(layer.active_adapters) for layer in layers}
        was_off = all(layer.disable_adapters for layer in layers)
        if self._load(pipe):  # adds layers and may change what is active: put back on leaving
            layers = _lora_layers(unet)
        before = [[a for a in held.get(id(layer), []) if a != FEW_STEP] for layer in layers]
        pipes = [pipe, *(p for p in schedulers_of if p is not pipe)]
        schedulers = [p.scheduler for p in pipes]
        try:
            for layer, active in zip(layers, before, strict=True):
                keep = [] if was_off else active
                layer.set_adapter([*keep, FEW_STEP] if FEW_STEP in layer.lora_A else keep)
            for layer in layers:  # unet.enable_lora() would walk every module again
                layer.enable_adapters(True)
            for p, scheduler in zip(pipes, schedulers, strict=True):
                p.scheduler = euler(scheduler.config, timestep_spacing="trailing")
            yield
        finally:
            for p, scheduler in zip(pipes, schedulers, strict=True):
                p.scheduler = scheduler
            for layer, active in zip(layers, before, strict=True):
                layer.set_adapter(active)
            if was_off:
                for layer in layers:
                    layer.enable_adapters(False)

    def _load(self, pipe: Any) -> bool:
        """Load the distilled LoRA into ``pipe`` unless it is there; True when it was loaded now."""
        if self._loaded_into == id(pipe.unet):
            return False
        _log.info("loading the few-step LoRA %s", self.path.name)
        pipe.load_lora_weights(str(self.path), adapter_name=FEW_STEP)
        self._loaded_into = id(pipe.unet)
        return True


def _lora_layers(unet: Any) -> list[Any]:
    from peft.tuners.lora import LoraLayer

    return [module for module in unet.modules() if isinstance(module, LoraLayer)]
