"""The upload boundary of every platform: checks on uploaded image bytes, then their metadata removed,
before anything is stored or sent to a worker (``accept_upload``).

Order matters: byte size first, then the header (format and pixel count) without decoding, and only
then a full decode, so a decompression bomb or a huge file is refused without being unpacked.
Truncated files are refused: Pillow's ``ImageFile.LOAD_TRUNCATED_IMAGES`` must stay False.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from bot.settings import BotSettings
from engine.api import Refusal

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP")
_SUFFIXES = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp"}


@dataclass(frozen=True)
class CheckedImage:
    """An upload that decodes fully and fits the limits."""

    sha256: str
    format: str  # one of ACCEPTED_FORMATS
    width: int
    height: int

    @property
    def suffix(self) -> str:
        """The blob suffix for this format, e.g. '.jpg'."""
        return _SUFFIXES[self.format]


@dataclass(frozen=True)
class RefusedUpload:
    """An upload refused at the boundary; nothing of it is stored."""

    refusal: Refusal
    detail: str  # for logs; users see texts.refusal(refusal, settings)


def inspect_upload(data: bytes, settings: BotSettings) -> CheckedImage | RefusedUpload:
    """Check an upload's size, format, pixel count (from the header) and integrity, in that order."""
    if len(data) > settings.max_upload_bytes:
        return RefusedUpload(Refusal.FILE_TOO_LARGE, f"{len(data)} bytes > {settings.max_upload_bytes}")
    if not data:
        return RefusedUpload(Refusal.NOT_AN_IMAGE, "empty file")
    header = _read_header(data, settings)
    if isinstance(header, RefusedUpload):
        return header
    image_format, width, height = header
    loaded = _decode_fully(data)
    if loaded is not None:
        return loaded
    if min(width, height) < settings.min_side:
        return RefusedUpload(Refusal.TOO_FEW_PIXELS, f"{width}x{height}, min side {settings.min_side}")
    return CheckedImage(hashlib.sha256(data).hexdigest(), image_format, width, height)


def _read_header(data: bytes, settings: BotSettings) -> tuple[str, int, int] | RefusedUpload:
    """Format and size from the header only; Pillow's `open` is lazy and decodes no pixels."""
    try:
        with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as image:
            image_format, (width, height) = str(image.format), image.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow raises above twice its own MAX_IMAGE_PIXELS (and warns above it; the warning is an
        # exception only where warnings are errors): refused from the header, never decoded. The
        # module-wide limit is left alone; our own, lower max_pixels is checked just below.
        return RefusedUpload(Refusal.TOO_MANY_PIXELS, str(exc))
    except UnidentifiedImageError as exc:
        return RefusedUpload(Refusal.NOT_AN_IMAGE, str(exc))
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # A recognised format whose header itself is cut off or malformed.
        return RefusedUpload(Refusal.TRUNCATED, f"{type(exc).__name__}: {exc}")
    if image_format not in ACCEPTED_FORMATS:
        return RefusedUpload(Refusal.NOT_AN_IMAGE, f"format {image_format}")
    if width * height > settings.max_pixels:
        return RefusedUpload(Refusal.TOO_MANY_PIXELS, f"{width}x{height} > {settings.max_pixels} pixels")
    return image_format, width, height


def _decode_fully(data: bytes) -> RefusedUpload | None:
    """Decode every pixel: a truncated or corrupt file fails here (it would fail later anyway)."""
    try:
        with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as image:
            image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        return RefusedUpload(Refusal.TRUNCATED, f"{type(exc).__name__}: {exc}")
    return None


# --- metadata ------------------------------------------------------------------------------------------


def accept_upload(data: bytes, settings: BotSettings) -> tuple[CheckedImage, bytes] | RefusedUpload:
    """``inspect_upload``, then the bytes to store: ``strip_metadata``'s, with the checked image's
    hash taken of them (what duplicates are found by)."""
    checked = inspect_upload(data, settings)
    if isinstance(checked, RefusedUpload):
        return checked
    try:
        clean = strip_metadata(data, checked.format)
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # it decoded, but not a second time
        return RefusedUpload(Refusal.TRUNCATED, f"metadata not removable: {type(exc).__name__}: {exc}")
    return dataclasses.replace(checked, sha256=hashlib.sha256(clean).hexdigest()), clean


def strip_metadata(data: bytes, image_format: str) -> bytes:
    """An inspected upload of ``image_format`` without EXIF (GPS included), XMP, IPTC, comments or
    anything appended after the image; pixels kept.

    JPEGs lose their metadata segments without being re-encoded (full quality), unless their EXIF
    orientation says to turn them, which is applied first. PNG and WebP are re-encoded (PNG
    losslessly). Colour profiles are kept.
    """
    if image_format == "JPEG" and _orientation(data) == 1:
        stripped = _strip_jpeg(data)
        if stripped is not None:
            return stripped
    return _reencode(data, image_format)


def _orientation(data: bytes) -> int:
    with Image.open(io.BytesIO(data)) as image:
        value = image.getexif().get(0x0112, 1)
    return value if isinstance(value, int) else 1


def _reencode(data: bytes, image_format: str) -> bytes:
    with Image.open(io.BytesIO(data)) as image:
        icc = image.info.get("icc_profile")
        upright = ImageOps.exif_transpose(image)
    upright.info.clear()  # Pillow would carry comments and XMP over from info
    options: dict[str, Any] = {"icc_profile": icc} if icc else {}
    if image_format in ("JPEG", "WEBP"):
        options["quality"] = 95
    out = io.BytesIO()
    upright.save(out, format=image_format, **options)
    return out.getvalue()


def _strip_jpeg(data: bytes) -> bytes | None:
    """Copy a JPEG's segments but metadata; None when its structure is not what we expect.

    Kept: JFIF (APP0), ICC profiles (APP2), Adobe colour info (APP14) and every non-APP segment.
    Dropped: EXIF/XMP (APP1), other APPn, comments, and anything after the end of the first
    image (multi-picture files carry further EXIF there).
    """
    if not data.startswith(b"\xff\xd8"):
        return None
    out = bytearray(b"\xff\xd8")
    i, end = 2, len(data)
    while i < end:
        if data[i] != 0xFF:
            return None
        while i < end and data[i] == 0xFF:  # fill bytes
            i += 1
        if i >= end:
            return None
        marker = data[i]
        i += 1
        if marker == 0xD9:
            out += b"\xff\xd9"
            return bytes(out)
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            out += bytes((0xFF, marker))
            continue
        if i + 2 > end:
            return None
        length = int.from_bytes(data[i : i + 2], "big")
        if length < 2 or i + length > end:
            return None
        segment = data[i : i + length]
        i += length
        if _keep_segment(marker, segment[2:]):
            out += bytes((0xFF, marker)) + segment
        if marker == 0xDA:  # entropy-coded data up to the next real marker
            scan_end = _scan_end(data, i)
            if scan_end is None:
                return None
            out += data[i:scan_end]
            i = scan_end
    return None


def _scan_end(data: bytes, start: int) -> int | None:
    i = start
    while True:
        i = data.find(b"\xff", i)
        if i < 0 or i + 1 >= len(data):
            return None
        following = data[i + 1]
        if following == 0x00 or 0xD0 <= following <= 0xD7:  # stuffed byte or restart marker
            i += 2
            continue
        return i


def _keep_segment(marker: int, body: bytes) -> bool:
    if marker == 0xFE:  # comment
        return False
    if 0xE0 <= marker <= 0xEF:
        if marker == 0xE0:
            return body.startswith((b"JFIF\x00", b"JFXX\x00"))
        if marker == 0xE2:
            return body.startswith(b"ICC_PROFILE\x00")
        if marker == 0xEE:
            return body.startswith(b"Adobe")
        return False
    return True
