"""bench/fullsize.py writes what ``avatarbooth models pull`` writes: the same files, tensors and dtypes.

The layout is written without its weights (headers and sparse files: seconds, no gigabytes) and compared
with pull's own manifest (``files_for``) and its record of the published weights files
(``PUBLISHED_WEIGHTS``: dtype and byte size from the repositories' LFS pointers). The byte sizes are
independent of our configs, so a wrong config value (a layer, a width) shows up as a size mismatch.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from avatarbooth.models import PUBLISHED_WEIGHTS, files_for
from bench.fullsize import describe_layout, write_random_safetensors, write_sd15_preset, write_sdxl_preset

_ITEM_BYTES = {"F16": 2, "F32": 4, "float32": 4}


@pytest.fixture(scope="module", params=["sdxl", "sd15"])
def layout(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    preset = request.param
    root = tmp_path_factory.mktemp(f"fullsize-{preset}")
    (write_sdxl_preset if preset == "sdxl" else write_sd15_preset)(root, weights=False)
    return preset, describe_layout(root)


def test_the_files_are_the_ones_pull_lays_out(layout: tuple[str, dict]) -> None:
    preset, written = layout
    pulled = set(files_for(preset))
    assert set(written) - pulled == set(), "written but never pulled"
    # The tokenizers' four files, the configs, every weights file: nothing pull fetches is left out.
    assert pulled - set(written) == set(), "pulled but not written"


def test_weights_have_the_published_dtypes_and_sizes(layout: tuple[str, dict]) -> None:
    preset, written = layout
    for path, published in PUBLISHED_WEIGHTS[preset].items():
        entry = written[path]
        assert entry["dtypes"] == [published.dtype], path
        if published.size is None:
            continue
        data_bytes = entry["params"] * _ITEM_BYTES[published.dtype]
        # A header (or a pickle's framing) is at most a few hundred kB of a file of hundreds of MB.
        assert abs(data_bytes - published.size) / published.size < 2e-4, (path, data_bytes, published.size)


def test_instantid_adapter_holds_the_resampler_and_every_cross_attention(layout: tuple[str, dict]) -> None:
    preset, written = layout
    if preset != "sdxl":
        pytest.skip("InstantID is SDXL-only")
    assert written["ip-adapter.bin"]["groups"] == ["image_proj", "ip_adapter"]
    # 70 cross-attentions in SDXL's UNet, two projections each, plus the Resampler's 4 layers and its ends.
    resampler_tensors = 7 + 4 * 11  # per layer: two norms (weight, bias), q, kv, out; the MLP's norm and two linears
    assert written["ip-adapter.bin"]["tensors"] == 2 * 70 + resampler_tensors


def test_streamed_random_file_loads_with_every_key_and_trained_looking_values(tmp_path: Path) -> None:
    from diffusers import AutoencoderKL

    config = {"block_out_channels": [8, 16], "down_block_types": ["DownEncoderBlock2D"] * 2,
              "up_block_types": ["UpDecoderBlock2D"] * 2, "norm_num_groups": 4}
    with torch.device("meta"):
        model = AutoencoderKL(**config)
    path = tmp_path / "vae.safetensors"
    write_random_safetensors(path, model, torch.float16, seed=0)
    loaded = load_file(path)
    assert set(loaded) == set(model.state_dict())
    assert all(t.dtype == torch.float16 and t.shape == model.state_dict()[k].shape for k, t in loaded.items())
    assert (loaded["encoder.conv_in.bias"] != 0).all()  # PyTorch's default bound, never zero
    assert (loaded["encoder.conv_norm_out.weight"] - 1).abs().max() < 0.6  # norms near 1
    again = tmp_path / "again.safetensors"
    write_random_safetensors(again, model, torch.float16, seed=0)
    assert again.read_bytes() == path.read_bytes()  # the same seed writes the same file
