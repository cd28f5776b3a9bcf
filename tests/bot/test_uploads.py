"""Boundary checks on uploaded bytes: real Pillow on real (and deliberately broken) files."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from PIL import ExifTags, Image, ImageFile, PngImagePlugin

from bot import texts
from bot.settings import BotSettings
from bot.uploads import CheckedImage, RefusedUpload, accept_upload, inspect_upload, strip_metadata
from engine.api import ErrorCode, Refusal
from tests.support import face_photo, gps_jpeg, pixels

ROOT = Path(__file__).resolve().parents[2]

SETTINGS = BotSettings()


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def noise(width: int, height: int) -> Image.Image:
    # Random pixels compress badly, so the encoded file is large enough to cut in half meaningfully.
    return Image.frombytes("RGB", (width, height), os.urandom(width * height * 3))


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims `width` x `height`; its pixel data is a few bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def refusal_of(data: bytes, settings: BotSettings = SETTINGS) -> Refusal:
    result = inspect_upload(data, settings)
    assert isinstance(result, RefusedUpload), result
    return result.refusal


def test_a_valid_photo_passes_with_its_sha256() -> None:
    data = encode(noise(320, 300), "JPEG", quality=90)
    result = inspect_upload(data, SETTINGS)
    assert result == CheckedImage(hashlib.sha256(data).hexdigest(), "JPEG", 320, 300)
    assert result.suffix == ".jpg"


@pytest.mark.parametrize(("fmt", "suffix"), [("PNG", ".png"), ("WEBP", ".webp")])
def test_png_and_webp_are_accepted(fmt: str, suffix: str) -> None:
    result = inspect_upload(encode(noise(256, 256), fmt), SETTINGS)
    assert isinstance(result, CheckedImage)
    assert (result.format, result.suffix) == (fmt, suffix)


@pytest.mark.parametrize(
    "data",
    [b"", b"hello, this is a text file\n", encode(noise(300, 300), "GIF"), encode(noise(300, 300), "BMP")],
    ids=["empty", "text", "gif", "bmp"],
)
def test_anything_but_jpeg_png_webp_is_not_an_image(data: bytes) -> None:
    assert refusal_of(data) == Refusal.NOT_AN_IMAGE


def test_a_jpeg_cut_in_half_is_truncated() -> None:
    data = encode(noise(512, 512), "JPEG", quality=95)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert refusal_of(data[: len(data) // 2]) == Refusal.TRUNCATED


def test_a_png_cut_in_half_is_truncated() -> None:
    data = encode(noise(400, 400), "PNG")
    assert refusal_of(data[: len(data) // 2]) == Refusal.TRUNCATED


def test_a_20000_by_20000_image_is_refused_from_its_header() -> None:
    data = png_claiming(20_000, 20_000)
    assert len(data) < 200
    started = time.perf_counter()
    assert refusal_of(data) == Refusal.TOO_MANY_PIXELS
    assert time.perf_counter() - started < 0.5  # decoding 1.2 GB would take far longer


def test_an_image_over_our_pixel_limit_but_under_pillows_is_refused_unread() -> None:
    data = png_claiming(7_000, 7_000)  # 49 MP: above max_pixels (40 MP), below Pillow's own limit
    assert refusal_of(data) == Refusal.TOO_MANY_PIXELS


def test_too_small_an_image_is_refused() -> None:
    assert refusal_of(encode(noise(400, 200), "PNG")) == Refusal.TOO_FEW_PIXELS


def test_min_side_is_a_setting() -> None:
    small = encode(noise(64, 64), "PNG")
    assert isinstance(inspect_upload(small, BotSettings(min_side=64)), CheckedImage)


def test_too_many_bytes_is_refused_before_reading_the_image() -> None:
    data = encode(noise(300, 300), "PNG")
    assert refusal_of(data, BotSettings(max_upload_bytes=len(data) - 1)) == Refusal.FILE_TOO_LARGE
    assert refusal_of(b"x" * 2048, BotSettings(max_upload_bytes=1024)) == Refusal.FILE_TOO_LARGE


def test_every_refusal_and_error_code_has_a_sentence_saying_what_to_do() -> None:
    for code in Refusal:
        sentence = texts.refusal(code, SETTINGS)
        assert "send" in sentence, (code, sentence)
        assert "{" not in sentence
    for error in ErrorCode:
        sentence = texts.job_failed("drawing", error)
        # What to do next: try again, send something, or a command to use instead.
        assert any(hint in sentence.lower() for hint in ("try again", "send", " /")), (error, sentence)


# --- metadata ---------------------------------------------------------------------------------------


def test_metadata_is_stripped_from_every_format() -> None:
    jpeg = gps_jpeg(0)
    clean = strip_metadata(jpeg, "JPEG")
    assert b"Exif" not in clean and pixels(clean) == pixels(jpeg)

    # An EXIF orientation is applied before the EXIF goes.
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # turn 90 degrees clockwise to view
    exif[ExifTags.Base.Make] = "PhoneCo"
    out = io.BytesIO()
    with Image.open(io.BytesIO(face_photo(1))) as image:
        cropped = image.crop((0, 0, 400, 300))
        cropped.save(out, format="JPEG", exif=exif)
    upright = strip_metadata(out.getvalue(), "JPEG")
    with Image.open(io.BytesIO(upright)) as image:
        assert image.size == (300, 400) and not image.getexif()

    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "PhoneCo"
    info = PngImagePlugin.PngInfo()
    info.add_text("Location", "52.5200 N, 13.4050 E")
    out = io.BytesIO()
    with Image.open(io.BytesIO(face_photo(2))) as image:
        image.save(out, format="PNG", pnginfo=info, exif=exif)
    png = strip_metadata(out.getvalue(), "PNG")
    assert b"Location" not in png and b"eXIf" not in png and b"PhoneCo" not in png
    assert pixels(png) == pixels(out.getvalue())



def test_a_png_without_exif_loses_its_text_and_trailing_bytes_without_being_re_encoded() -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("Location", "52.5200 N, 13.4050 E")
    info.add_itxt("XML:com.adobe.xmp", "<x:xmpmeta>GPS</x:xmpmeta>")
    out = io.BytesIO()
    with Image.open(io.BytesIO(face_photo(2))) as image:
        image.save(out, format="PNG", pnginfo=info)
    tainted = out.getvalue() + b"PK\x03\x04appended.zip"
    png = strip_metadata(tainted, "PNG")
    assert b"Location" not in png and b"xmpmeta" not in png and b"PK\x03\x04" not in png
    assert pixels(png) == pixels(out.getvalue())
    idat = out.getvalue().index(b"IDAT")
    assert out.getvalue()[idat : idat + 4096] in png  # the compressed pixels copied as they were


def _png(width: int, height: int, rows: bytes | None = None, *, crc_ok_but_corrupt: bool = False) -> bytes:
    """An RGB PNG, its zero rows compressed as a stream (never whole in memory)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    row = rows if rows is not None else b"\x00" * (1 + 3 * width)
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    if crc_ok_but_corrupt:  # damaged before the CRC was computed: only inflating finds it
        body = body[:20] + bytes(b ^ 0x5A for b in body[20:40]) + body[40:]
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def test_a_png_whose_pixel_stream_is_corrupt_or_short_is_truncated() -> None:
    assert not isinstance(inspect_upload(_png(640, 480), SETTINGS), RefusedUpload)
    corrupt = inspect_upload(_png(640, 480, crc_ok_but_corrupt=True), SETTINGS)
    assert isinstance(corrupt, RefusedUpload) and corrupt.refusal is Refusal.TRUNCATED
    short_row = inspect_upload(_png(640, 480, b"\x00" * (3 * 640)), SETTINGS)  # a byte short per row
    assert isinstance(short_row, RefusedUpload) and short_row.refusal is Refusal.TRUNCATED


def test_a_40_megapixel_png_costs_the_chat_side_little_memory(tmp_path: Path) -> None:
    """A 40-MP PNG of a few hundred kB used to take the chat process 366 MB (decoded to check it,
    decoded again to strip it). Measured in a fresh process: its peak resident size."""
    script = (
        "import resource, sys; sys.path.insert(0, sys.argv[1])\n"
        "from tests.bot.test_uploads import _png, SETTINGS\n"
        "from bot.uploads import accept_upload, RefusedUpload\n"
        "data = _png(7000, 5700)\n"
        "accept_upload(_png(640, 480), SETTINGS)  # imports and Pillow warmed up\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "result = accept_upload(data, SETTINGS)\n"
        "grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before\n"
        "print(isinstance(result, RefusedUpload), len(data), grown)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(ROOT)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    refused, size, grown_kib = done.stdout.split()
    assert refused == "False" and int(size) < 1_000_000
    assert int(grown_kib) < 48 * 1024, f"{int(grown_kib) / 1024:.0f} MiB for one upload"


def test_accepting_an_upload_strips_it_and_hashes_what_is_kept() -> None:
    tainted = gps_jpeg(0) + b"PK\x03\x04appended.zip"  # a ZIP appended after the JPEG's end
    accepted = accept_upload(tainted, SETTINGS)
    assert not isinstance(accepted, RefusedUpload)
    checked, data = accepted
    assert b"Exif" not in data and b"PK\x03\x04" not in data and pixels(data) == pixels(tainted)
    assert checked.sha256 == hashlib.sha256(data).hexdigest()
    refused = accept_upload(b"not an image", SETTINGS)
    assert isinstance(refused, RefusedUpload) and refused.refusal is Refusal.NOT_AN_IMAGE
