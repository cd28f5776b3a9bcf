"""Boundary checks on uploaded image bytes, before anything is stored or sent to a worker.

Order matters: byte size first, then the header (format and pixel count) without decoding, and only
then a full decode, so a decompression bomb or a huge file is refused without being unpacked.
Truncated files are refused: Pillow's ``ImageFile.LOAD_TRUNCATED_IMAGES`` must stay False.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

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
