"""The CLI as a user runs it: subprocesses with the embedded Valkey and a worker process."""

from __future__ import annotations

import json
import re
import sqlite3
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image

from tests.support import face_photo

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def write_config(tmp_path: Path, models_dir: Path) -> Path:
    """A config whose data folder is private to the test and whose models are the session's build."""
    config = tmp_path / "config.toml"
    config.write_text(
        f'[storage]\ndata_dir = "{tmp_path / "data"}"\n'
        f'[engine]\npreset = "tiny"\nmodels_dir = "{models_dir}"\n'
    )
    return config


def avatarbooth(*args: str, stdin: str = "", timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "avatarbooth", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
    )


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width``×``height`` pixels, with no pixel data behind it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_demo_writes_a_preview_and_a_drawing_and_ends_with_a_json_line(
    tmp_path: Path, tiny_preset_dir: Path
) -> None:
    config = write_config(tmp_path, tiny_preset_dir.parent)
    out = tmp_path / "out"
    done = avatarbooth("demo", "--config", str(config), "--preset", "tiny", "--json", "--out", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["ok"] is True
    assert summary["preset"] == "tiny"
    assert len(summary["preview_images"]) >= 1 and len(summary["draw_images"]) >= 1
    for path in summary["images"]:
        with Image.open(path) as image:
            assert image.size == (128, 128)
    kinds = {job.split("-")[0] for job in summary["job_ids"]}
    assert {"check_photo", "preview", "train", "draw"} <= kinds
    assert "Drawn by your lora model v1" in done.stdout
    assert "refused, not a photo" in done.stdout  # the text file among the selfies


def test_piped_chat_runs_the_journey_and_refuses_bad_files_without_storing_them(
    tmp_path: Path, tiny_preset_dir: Path
) -> None:
    config = write_config(tmp_path, tiny_preset_dir.parent)
    photos = []
    for n in range(3):
        path = tmp_path / f"selfie {n}.jpg"  # a space in the name: the console takes quoted paths
        path.write_bytes(face_photo(n))
        photos.append(f'"{path}"')
    (tmp_path / "notes.txt").write_text("hello, not a photo\n")
    (tmp_path / "cut.jpg").write_bytes(face_photo(7)[:6000])
    (tmp_path / "huge.png").write_bytes(png_claiming(20000, 20000))
    script = "\n".join(
        [
            "/start",
            "/agree",
            f"/photo {tmp_path / 'notes.txt'} {tmp_path / 'cut.jpg'} {tmp_path / 'huge.png'}",
            f"/photo {' '.join(photos)}",
            "/preview",
            "/train lora",
            "/draw me as an astronaut",
            "/pack portraits",
            "/status",
        ]
    )
    out = tmp_path / "images"
    done = avatarbooth("chat", "--config", str(config), "--out", str(out), stdin=script + "\n")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = done.stdout

    refusals = [line for line in text.splitlines() if "refused" in line]
    assert len(refusals) == 3, text
    assert any("notes.txt" in line and "not a photo" in line for line in refusals)
    assert any("cut.jpg" in line and "cut off" in line for line in refusals), refusals
    assert any("huge.png" in line and "pixels" in line.lower() for line in refusals), refusals
    assert text.count(": accepted") == 3
    assert "lora model v1 is ready" in text
    assert "Drawn by your lora model v1" in text
    packed = [f"pack-1-{n}.png" for n in range(1, 9)]
    assert sorted(p.name for p in out.glob("*.png")) == sorted(["draw-1-1.png", "draw-1-2.png", "preview-1.png", *packed])
    # The pack: 8 images, each line naming its score ("no face found" on the tiny preset's noise).
    assert "Your pack Portraits: 8 images from your lora model v1, each the best of 2." in text
    scored = [line for line in text.splitlines() if re.fullmatch(r"image \d \(.+\): (likeness \d\.\d\d|no face found to compare)", line)]
    assert len(scored) == 8, text

    # None of the refused files was stored: three photo rows, three photo blobs, all accepted.
    with sqlite3.connect(tmp_path / "data" / "avatarbooth.sqlite3") as db:
        statuses = [row[0] for row in db.execute("SELECT status FROM photos")]
        models = db.execute("SELECT method, version FROM models").fetchall()
    assert statuses == ["accepted"] * 3
    assert models == [("lora", 1)]
    assert len(list((tmp_path / "data" / "blobs").glob("*/photos/*"))) == 3


def test_a_bad_config_gets_one_clear_line(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[engine]\npreset = "giant"\n')
    done = avatarbooth("chat", "--config", str(config))
    assert done.returncode == 2
    assert "unknown preset 'giant'" in done.stderr
    assert "sdxl, sd15, tiny, tiny-sd15" in done.stderr


def test_missing_weights_stop_the_start_with_the_command_that_fetches_them(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[storage]\ndata_dir = "{tmp_path / "data"}"\n[engine]\npreset = "sdxl"\n')
    done = avatarbooth("chat", "--config", str(config), stdin="/help\n", timeout=120)
    assert done.returncode == 1
    assert "avatarbooth models pull --preset sdxl" in done.stderr
