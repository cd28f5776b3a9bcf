"""config.toml's [training] switches reach each method's settings, with the defaults for faces."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest

from engine.presets import FAMILY_SD15, FAMILY_SDXL, Preset
from engine.train.methods import TrainingRun, dreambooth_settings_for, lora_settings_for, ti_settings_for


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


@pytest.mark.parametrize("name", ["sdxl", "tiny"])
def test_class_images_setting_sets_the_prior_of_lora_and_dreambooth(tmp_path: Path, name: str) -> None:
    three = _run(tmp_path, name, FAMILY_SDXL, class_images=3)
    assert lora_settings_for(three).num_class_images == 3 and dreambooth_settings_for(three).num_class_images == 3
    assert lora_settings_for(three).with_prior and dreambooth_settings_for(three).with_prior
    none = _run(tmp_path, name, FAMILY_SDXL, class_images=0)
    assert not lora_settings_for(none).with_prior and not dreambooth_settings_for(none).with_prior
    default = _run(tmp_path, name, FAMILY_SDXL)
    assert lora_settings_for(default).num_class_images == (2 if name == "tiny" else 100)


def test_a_preset_at_another_resolution_crops_trains_and_draws_at_it(tmp_path: Path) -> None:
    preset = _run(tmp_path, "sdxl", FAMILY_SDXL).preset.at_resolution(256)
    assert (preset.resolution, preset.face_checks.crop_size) == (256, 256)
    run = dataclasses.replace(_run(tmp_path, "sdxl", FAMILY_SDXL), preset=preset)
    assert lora_settings_for(run).resolution == 256 and dreambooth_settings_for(run).resolution == 256
    assert ti_settings_for(run).resolution == 256
    with pytest.raises(ValueError, match="multiple of 8"):
        preset.at_resolution(250)
