"""The upload boundary of every platform: checks on uploaded image bytes, then their metadata removed,
before anything is stored or sent to a worker (``accept_upload``).

Order matters: byte size first, then the header (format and pixel count) without decoding, and only
then a read of every byte of the picture, so a decompression bomb or a huge file is refused without
being unpacked. That read keeps memory small whatever the size (``_decode_fully``), and PNGs and most
JPEGs lose their metadata without being decoded at all.
Truncated files are refused: Pillow's ``ImageFile.LOAD_TRUNCATED_IMAGES`` must stay False.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import zlib
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
    loaded = _decode_fully(data, image_format)
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


def _decode_fully(data: bytes, image_format: str) -> RefusedUpload | None:
    """Read every byte of the picture: a truncated or corrupt file fails here (it would fail later
    anyway). Memory stays small for any size the header allowed: a JPEG is decoded at 1/8 scale
    (every coefficient is still read), a PNG's compressed stream is inflated and counted, not kept.
    A 40-MP PNG took the chat process 366 MB when it was decoded whole."""
    try:
        if image_format == "PNG":
            problem = _png_stream_problem(data)
            return None if problem is None else RefusedUpload(Refusal.TRUNCATED, problem)
        with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as image:
            if image_format == "JPEG":
                image.draft(image.mode, (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        return RefusedUpload(Refusal.TRUNCATED, f"{type(exc).__name__}: {exc}")
    return None


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # samples per pixel by colour type
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_INFLATE_STEP = 1 << 20


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]] | str:
    """The PNG's chunks (type, body) up to IEND, CRCs checked; a string saying what is wrong else."""
    if not data.startswith(_PNG_SIGNATURE):
        return "no PNG signature"
    chunks, i = [], len(_PNG_SIGNATURE)
    while i + 12 <= len(data):
        length = int.from_bytes(data[i : i + 4], "big")
        kind, body = data[i + 4 : i + 8], data[i + 8 : i + 8 + length]
        crc = data[i + 8 + length : i + 12 + length]
        if len(body) != length or len(crc) != 4:
            return f"chunk {kind!r} cut off"
        if zlib.crc32(kind + body).to_bytes(4, "big") != crc:
            return f"chunk {kind!r} is corrupt (CRC)"
        chunks.append((kind, body))
        i += 12 + length
        if kind == b"IEND":
            return chunks
    return "no IEND chunk: the file is cut off"


def _png_stream_problem(data: bytes) -> str | None:
    """What is wrong with the PNG's pixel stream, or None: it inflates to exactly the size its
    header implies. The output is counted in 1 MiB steps and dropped."""
    chunks = _png_chunks(data)
    if isinstance(chunks, str):
        return chunks
    if not chunks or chunks[0][0] != b"IHDR" or len(chunks[0][1]) != 13:
        return "no IHDR chunk first"
    header = chunks[0][1]
    width, height = int.from_bytes(header[0:4], "big"), int.from_bytes(header[4:8], "big")
    depth, colour, interlace = header[8], header[9], header[12]
    if colour not in _PNG_SAMPLES:
        return f"unknown colour type {colour}"
    bits = depth * _PNG_SAMPLES[colour]
    passes = _ADAM7 if interlace == 1 else ((0, 0, 1, 1),)
    expected = 0
    for x0, y0, dx, dy in passes:
        pass_width, pass_height = (width - x0 + dx - 1) // dx, (height - y0 + dy - 1) // dy
        if pass_width > 0 and pass_height > 0:
            expected += pass_height * (1 + (pass_width * bits + 7) // 8)
    inflater, produced = zlib.decompressobj(), 0
    try:
        for kind, body in chunks:
            if kind != b"IDAT":
                continue
            pending = body
            while pending:
                produced += len(inflater.decompress(pending, _INFLATE_STEP))
                pending = inflater.unconsumed_tail
                if produced > expected:
                    return "more pixel data than the header says"
        produced += len(inflater.flush())  # every input byte is consumed: what is left is small
    except zlib.error as exc:
        return f"pixel data corrupt: {exc}"
    if not inflater.eof or produced != expected:
        return f"pixel data cut off ({produced} of {expected} bytes)"
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
    if image_format == "PNG":
        stripped = _strip_png(data)
        if stripped is not None:
            return stripped
    return _reencode(data, image_format)


_PNG_KEPT = {b"IHDR", b"PLTE", b"IDAT", b"IEND", b"tRNS", b"gAMA", b"cHRM", b"sRGB", b"iCCP", b"sBIT", b"bKGD"}
"""What a PNG keeps: its pixels and how to show their colours. Text (tEXt, zTXt, iTXt: where XMP
lives), EXIF, times, physical size and anything else are dropped, and so is whatever follows IEND."""


def _strip_png(data: bytes) -> bytes | None:
    """The PNG's chunks but metadata, copied without decoding; None when it has an EXIF chunk
    (its orientation is applied by re-encoding instead)."""
    chunks = _png_chunks(data)
    if isinstance(chunks, str) or any(kind == b"eXIf" for kind, _ in chunks):
        return None
    out = bytearray(_PNG_SIGNATURE)
    for kind, body in chunks:
        if kind in _PNG_KEPT:
            out += len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")
    return bytes(out)


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
