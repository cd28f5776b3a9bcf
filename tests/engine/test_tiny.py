"""The tiny preset: what a build contains, that it is reused, and the presets that point at it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.errors import EngineError, UnknownPreset, WeightsMissing
from engine.presets import PRESET_NAMES, load_preset
from engine.tiny.models import COMPLETE_MARKER, FACE_EMBEDDING_DIM, IMAGE_SIZE, build_tiny_preset

pytestmark = pytest.mark.slow

PARTS = (
    COMPLETE_MARKER,
    "sdxl/model_index.json",
    "sdxl/tokenizer/tokenizer.json",
    "sdxl/tokenizer_2/tokenizer.json",
    "identitynet/config.json",
    "ip-adapter.bin",
    "antelopev2/scrfd_10g_bnkps.onnx",
    "antelopev2/glintr100.onnx",
    "antelopev2/genderage.onnx",
)


def test_fresh_build_contains_every_part(tiny_preset_dir: Path) -> None:
    missing = [part for part in PARTS if not (tiny_preset_dir / part).is_file()]
    assert missing == []
    leftovers = [p.name for p in tiny_preset_dir.parent.iterdir() if "building" in p.name]
    assert leftovers == []


def test_second_build_reuses_the_first(tiny_preset_dir: Path) -> None:
    marker = tiny_preset_dir / COMPLETE_MARKER
    before = marker.stat().st_mtime_ns

    assert build_tiny_preset(tiny_preset_dir) == tiny_preset_dir
    assert marker.stat().st_mtime_ns == before


def test_incomplete_folder_is_replaced(tmp_path: Path) -> None:
    dest = tmp_path / "tiny"
    (dest / "sdxl").mkdir(parents=True)
    (dest / "sdxl" / "half-written").write_text("x")

    build_tiny_preset(dest)

    assert (dest / COMPLETE_MARKER).is_file()
    assert not (dest / "sdxl" / "half-written").exists()


def test_tokenizer_loads_offline_and_knows_the_prompt_words(tiny_preset_dir: Path) -> None:
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_preset_dir / "sdxl" / "tokenizer")

    for word in ("sks", "person", "astronaut"):
        ids = tokenizer(word).input_ids
        assert len(ids) == 3, tokenizer.convert_ids_to_tokens(ids)  # start, the word, end
    ids = tokenizer("zebra on Mars, 1999!").input_ids
    assert tokenizer.unk_token_id not in ids[1:-1]


def test_pipeline_is_sdxl_in_miniature(tiny_preset_dir: Path) -> None:
    from diffusers import ControlNetModel, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_preset_dir / "sdxl")
    identitynet = ControlNetModel.from_pretrained(tiny_preset_dir / "identitynet")

    text_width = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.unet.config.cross_attention_dim == text_width
    assert identitynet.config.cross_attention_dim == text_width
    assert identitynet.config.addition_embed_type == "text_time"
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo of sks person", num_inference_steps=2).images[0]
    assert image.size == (IMAGE_SIZE, IMAGE_SIZE)


def test_adapter_checkpoint_has_instantid_layout(tiny_preset_dir: Path) -> None:
    from diffusers import UNet2DConditionModel

    state = torch.load(tiny_preset_dir / "ip-adapter.bin", weights_only=True)
    unet = UNet2DConditionModel.from_pretrained(tiny_preset_dir / "sdxl", subfolder="unet")

    assert set(state) == {"image_proj", "ip_adapter"}
    assert state["image_proj"]["proj_in.weight"].shape[1] == FACE_EMBEDDING_DIM
    assert "layers.3.0.to_kv.weight" in state["image_proj"]  # the Resampler's layout, depth 4
    cross = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
    expected = {f"{2 * i + 1}.{p}.weight" for i in range(len(cross)) for p in ("to_k_ip", "to_v_ip")}
    assert set(state["ip_adapter"]) == expected


def test_tiny_preset_loads_from_its_folder(tiny_preset_dir: Path) -> None:
    preset = load_preset("tiny", tiny_preset_dir.parent)

    assert preset.root == tiny_preset_dir
    assert preset.family == "sdxl"
    assert preset.resolution == IMAGE_SIZE
    assert preset.sdxl_dir.is_dir() and preset.ip_adapter_path.is_file()
    assert preset.note and "noise" in preset.note


def test_sdxl_preset_without_weights_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(WeightsMissing) as raised:
        load_preset("sdxl", tmp_path)

    message = str(raised.value)
    assert "avatarbooth models pull --preset sdxl" in message
    assert str(tmp_path / "sdxl" / "ip-adapter.bin") in message
    assert isinstance(raised.value, EngineError)


def test_unknown_preset_lists_the_presets(tmp_path: Path) -> None:
    with pytest.raises(UnknownPreset) as raised:
        load_preset("sd15-turbo", tmp_path)

    assert all(name in str(raised.value) for name in PRESET_NAMES)
