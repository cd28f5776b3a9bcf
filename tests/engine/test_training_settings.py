"""config.toml's [training] switches reach each method's settings, with the defaults for faces."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest

from engine.presets import FAMILY_SD15, FAMILY_SDXL, Preset
from engine.training import TrainingRun, dreambooth_settings_for, lora_settings_for, ti_settings_for


def _run(tmp_path: Path, name: str, family: str, **switches: object) -> TrainingRun:
    preset = Preset(name=name, family=family, root=tmp_path, resolution=1024, inference_steps=30,
                    guidance_scale=5.0, identity_strength=0.8, ip_adapter_scale=0.8, train_steps=800,
                    train_rank=16, train_lr=1e-4)
    return TrainingRun(pipe=None, lock=threading.Lock(), preset=preset, checkpoints=None,  # type: ignore[arg-type]
                       class_image_cache=tmp_path, seed=0, **switches)  # type: ignore[arg-type]


def test_defaults_do_not_flip_and_checkpoint_full_size_sdxl_only(tmp_path: Path) -> None:
    sdxl, sd15 = _run(tmp_path, "sdxl", FAMILY_SDXL), _run(tmp_path, "sd15", FAMILY_SD15)
    tiny = _run(tmp_path, "tiny", FAMILY_SDXL)
    assert lora_settings_for(sdxl).gradient_checkpointing  # 1024² activations fill the card
    assert not lora_settings_for(sd15).gradient_checkpointing and not lora_settings_for(tiny).gradient_checkpointing
    assert dreambooth_settings_for(sd15).gradient_checkpointing
    for run in (sdxl, sd15, tiny):
        settings = [lora_settings_for(run), ti_settings_for(run), dreambooth_settings_for(run)]
        assert not any(s.random_flip for s in settings)
        assert not lora_settings_for(run).train_text_encoder and not dreambooth_settings_for(run).train_text_encoder


@pytest.mark.parametrize("name", ["sdxl", "tiny"])
def test_switches_override_every_method(tmp_path: Path, name: str) -> None:
    run = _run(tmp_path, name, FAMILY_SDXL, random_flip=True, train_text_encoder=True, gradient_checkpointing=False)
    lora, ti, booth = lora_settings_for(run), ti_settings_for(run), dreambooth_settings_for(run)
    assert lora.random_flip and ti.random_flip and booth.random_flip
    assert lora.train_text_encoder and booth.train_text_encoder
    assert not lora.gradient_checkpointing and not booth.gradient_checkpointing
    on = lora_settings_for(dataclasses.replace(run, gradient_checkpointing=True))
    assert on.gradient_checkpointing
