"""All three personal-model methods on both model families, through `avatarbooth chat` as a user runs it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from PIL import Image

from tests.integration.test_cli import avatarbooth
from tests.support import face_photo

pytestmark = pytest.mark.slow


def journey(tmp_path: Path, preset: str, models_dir: Path) -> tuple[str, Path]:
    config = tmp_path / "config.toml"
    config.write_text(
        f'[storage]\ndata_dir = "{tmp_path / "data"}"\n'
        f'[engine]\npreset = "{preset}"\nmodels_dir = "{models_dir}"\n'
        '[training]\nenabled_methods = ["lora", "ti", "dreambooth"]\n'
    )
    photos = []
    for n in range(3):
        path = tmp_path / f"selfie-{n}.jpg"
        path.write_bytes(face_photo(n))
        photos.append(str(path))
    script = [
        "/start", "/agree", f"/photo {' '.join(photos)}", "/preview",
        "/train lora", "/draw me as an astronaut",
        "/train ti", "/draw me as an astronaut",
        "/train dreambooth", "/draw me as an astronaut",
        "/status",
    ]
    out = tmp_path / "images"
    done = avatarbooth("chat", "--config", str(config), "--out", str(out), stdin="\n".join(script) + "\n", timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout, out


def check_every_method_trained_and_drew(text: str, out: Path, data: Path) -> None:
    for version, method in enumerate(("lora", "ti", "dreambooth"), start=1):
        assert f"Your {method} model v{version} is ready" in text, text
        assert f"Drawn by your {method} model v{version}" in text, text
    assert "Models: v1 lora on" in text and "v2 ti on" in text and "v3 dreambooth on" in text
    draws = sorted(out.glob("draw-*.png"))
    assert len(draws) == 6  # two images per draw
    # Each method's model draws differently: the first image of each draw differs from the others.
    firsts = [Image.open(out / f"draw-{n}-1.png").tobytes() for n in (1, 2, 3)]
    assert len(set(firsts)) == 3
    with sqlite3.connect(data / "avatarbooth.sqlite3") as db:
        models = db.execute("SELECT method, version, token FROM models ORDER BY version").fetchall()
    assert [m[:2] for m in models] == [("lora", 1), ("ti", 2), ("dreambooth", 3)]
    assert models[1][2] == "<u1>"  # TI learns a new word of its own; "me" becomes it


def test_lora_ti_and_dreambooth_on_the_tiny_sdxl_preset(tmp_path: Path, tiny_preset_dir: Path) -> None:
    text, out = journey(tmp_path, "tiny", tiny_preset_dir.parent)
    assert "instant preview" in text
    check_every_method_trained_and_drew(text, out, tmp_path / "data")


def test_lora_ti_and_dreambooth_on_the_tiny_sd15_preset(tmp_path: Path, tiny_sd15_preset_dir: Path) -> None:
    text, out = journey(tmp_path, "tiny-sd15", tiny_sd15_preset_dir.parent)
    assert "SDXL" in text  # the preview is refused with the reason: InstantID exists for SDXL only
    check_every_method_trained_and_drew(text, out, tmp_path / "data")
