"""Image files: what a file is, decoding it safely, encoding outputs; the one owner of every file-format fact.

* :func:`sniff` tells what a file is from its first bytes (image, video or something else, and which), for inputs
  without an extension and for failure reasons that name a file's type instead of quoting its content;
  :data:`IMAGE_SUFFIXES` are the names taken for images when a folder is searched.
* :func:`decode_image` turns untrusted bytes into arrays (RGB, optional alpha, 8 or 16 bit) behind the pixel limit
  (:data:`MAX_PIXELS_DEFAULT`, :func:`check_pixels`: a decompression-bomb guard checked on the header);
  :func:`decode_rgb8` is the fast path for the 8-bit RGB PNGs a dataset holds.
* :func:`encode_image` writes PNG (lossless, fast), JPEG or WebP: the output formats (:data:`OUTPUT_FORMATS`, with
  their aliases, extensions, content types and the largest size each can store; :func:`output_format` resolves a
  requested format, ``same`` included).

Pixel arithmetic (resizing, luma) is :mod:`edsr_ray.imaging`.
"""

from __future__ import annotations

import io
import logging
import struct
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np
from PIL import Image, UnidentifiedImageError

from edsr_ray.errors import ImageError, ImageTooLargeError

log = logging.getLogger(__name__)
# Largest side each output format can store: PNG's 31-bit header fields; libjpeg's JPEG_MAX_DIMENSION (the format's
# 16-bit fields would allow 65535); libwebp's 14-bit fields. check_output_size is the one place that applies them.
MAX_SIDE = {"png": 2**31 - 1, "jpeg": 65500, "webp": 16383}
# fpng (the fast PNG writer) writes only the low 16 bits of each side into the header, so a wider or taller image
# gets a wrong size (65536 wide comes out as 0, 70000 as 4464), and it sizes its buffers with 32-bit arithmetic, so
# more than 4 GiB of filtered rows overflows one and crashes the process (both seen with fpng 0.1.0). Its output is
# also unchecked by the binding: a failure comes back as empty bytes. Images past these bounds, (width * channels + 1)
# * height bytes of filtered rows kept a factor two below the overflow, go to Pillow's zlib writer instead.
FPNG_MAX_SIDE = 65535
FPNG_MAX_FILTERED_BYTES = 2**31 - 1

MAX_PIXELS_DEFAULT = 40_000_000
"""Default decompression-bomb limit: width × height above this is refused before decoding (40 MP ≈ 7750×5160)."""

# The formats outputs are written in. A requested output format may also be SAME_FORMAT: the input's format when it
# is one of these, else PNG (output_format).
OUTPUT_FORMATS = ("png", "jpeg", "webp")
SAME_FORMAT = "same"
# Canonical extension written for each output format.
FORMAT_EXTENSIONS: dict[str, str] = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
_CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_FORMAT_ALIASES = {"png": "png", "jpeg": "jpeg", "jpg": "jpeg", "webp": "webp"}
_EXTENSION_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}
# File names that say an output format (an output named so keeps its name when its format is kept).
OUTPUT_SUFFIXES = tuple(_EXTENSION_FORMATS)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_EXIF_ORIENTATION = 0x0112

# File names taken for images when a folder is searched (case-insensitive).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


# ----------------------------------------------------------------------------------------------------------------------
# Recognising content
# ----------------------------------------------------------------------------------------------------------------------

SNIFF_BYTES = 512
"""Bytes :func:`sniff` looks at: enough for every signature it knows (a tar header's magic sits at byte 257)."""


@dataclass(frozen=True)
class Sniffed:
    """What a file's first bytes say it is.

    ``kind`` is "image" (a still-image format; :func:`decode_image` reads png, jpeg, webp, gif, bmp, tiff, pnm and a
    few more), "video" or "other"; ``format`` a short name for images and videos ("png", "mp4", ...); ``description``
    names the type for messages ("a PNG image", "an MP4 video", "a PDF document", "1234 bytes of UTF-8 text") and
    never quotes the content.
    """

    kind: str
    description: str
    format: str | None = None

    @property
    def extension(self) -> str | None:
        """The extension a file of this format is written with (".png", ".jpg", ...); None when unknown."""
        if self.format is None:
            return None
        return FORMAT_EXTENSIONS.get(self.format, f".{self.format}")


# (kind, format, description, test on the head): the first match wins, so specific signatures come first.
_SIGNATURES: tuple[tuple[str, str | None, str, Callable[[bytes], bool]], ...] = (
    ("image", "png", "a PNG image", lambda h: h.startswith(_PNG_SIGNATURE)),
    ("image", "jpeg", "a JPEG image", lambda h: h.startswith(b"\xff\xd8\xff")),
    ("image", "webp", "a WebP image", lambda h: h[:4] == b"RIFF" and h[8:12] == b"WEBP"),
    ("image", "gif", "a GIF image", lambda h: h[:6] in (b"GIF87a", b"GIF89a")),
    ("image", "tiff", "a TIFF image", lambda h: h[:4] in (b"II*\x00", b"MM\x00*")),
    ("image", "bmp", "a BMP image", lambda h: h[:2] == b"BM" and len(h) >= 26 and h[6:10] == b"\x00" * 4),
    (
        "image",
        "pnm",
        "a Netpbm image",
        lambda h: len(h) > 2 and h[0:1] == b"P" and h[1] in b"123456" and h[2] in b" \t\r\n",
    ),
    ("image", "qoi", "a QOI image", lambda h: h.startswith(b"qoif")),
    ("image", "psd", "a Photoshop image", lambda h: h.startswith(b"8BPS")),
    (
        "image",
        "jp2",
        "a JPEG 2000 image",
        lambda h: h.startswith((b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51")),
    ),
    ("image", "jxl", "a JPEG XL image", lambda h: h.startswith((b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n"))),
    ("image", "avif", "an AVIF image", lambda h: h[4:8] == b"ftyp" and h[8:12] in (b"avif", b"avis")),
    ("image", "heic", "a HEIF image", lambda h: h[4:8] == b"ftyp" and h[8:12] in (b"heic", b"heix", b"mif1", b"msf1")),
    ("image", "ico", "an ICO icon", lambda h: h.startswith(b"\x00\x00\x01\x00") and len(h) > 6 and h[4] > 0),
    ("video", "mov", "a QuickTime video", lambda h: h[4:12] == b"ftypqt  " or h[4:8] in (b"moov", b"mdat", b"wide")),
    ("video", "3gp", "a 3GP video", lambda h: h[4:8] == b"ftyp" and h[8:11] in (b"3gp", b"3g2")),
    ("other", "m4a", "an M4A audio file", lambda h: h[4:8] == b"ftyp" and h[8:12] in (b"M4A ", b"M4B ")),
    ("video", "mp4", "an MP4 video", lambda h: h[4:8] == b"ftyp"),
    ("video", "webm", "a WebM video", lambda h: h.startswith(b"\x1a\x45\xdf\xa3") and b"webm" in h[:64]),
    ("video", "mkv", "a Matroska video", lambda h: h.startswith(b"\x1a\x45\xdf\xa3")),
    ("video", "avi", "an AVI video", lambda h: h[:4] == b"RIFF" and h[8:12] == b"AVI "),
    ("video", "flv", "an FLV video", lambda h: h.startswith(b"FLV\x01")),
    ("video", "mpg", "an MPEG video", lambda h: h.startswith((b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3"))),
    ("video", "ts", "an MPEG transport stream", lambda h: len(h) > 376 and h[0] == h[188] == h[376] == 0x47),
    ("video", "wmv", "a Windows Media file", lambda h: h.startswith(b"\x30\x26\xb2\x75\x8e\x66\xcf\x11")),
    ("other", None, "an Ogg media file", lambda h: h.startswith(b"OggS")),
    ("other", None, "a WAV audio file", lambda h: h[:4] == b"RIFF" and h[8:12] == b"WAVE"),
    ("other", None, "an MP3 audio file", lambda h: h.startswith(b"ID3")),
    ("other", None, "a PDF document", lambda h: h.startswith(b"%PDF-")),
    ("other", None, "a ZIP archive", lambda h: h[:4] in (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")),
    ("other", None, "a gzip archive", lambda h: h.startswith(b"\x1f\x8b")),
    ("other", None, "a bzip2 archive", lambda h: h.startswith(b"BZh") and len(h) > 3 and h[3] in b"123456789"),
    ("other", None, "an xz archive", lambda h: h.startswith(b"\xfd7zXZ\x00")),
    ("other", None, "a Zstandard archive", lambda h: h.startswith(b"\x28\xb5\x2f\xfd")),
    ("other", None, "a 7-Zip archive", lambda h: h.startswith(b"7z\xbc\xaf\x27\x1c")),
    ("other", None, "a RAR archive", lambda h: h.startswith(b"Rar!\x1a\x07")),
    ("other", None, "a tar archive", lambda h: h[257:262] == b"ustar"),
    ("other", None, "a Parquet file", lambda h: h.startswith(b"PAR1")),
    ("other", None, "an SQLite database", lambda h: h.startswith(b"SQLite format 3\x00")),
    ("other", None, "a Python pickle", lambda h: len(h) > 1 and h[0] == 0x80 and 2 <= h[1] <= 5),
    ("other", None, "an ELF executable", lambda h: h.startswith(b"\x7fELF")),
    ("other", None, "a Windows executable", lambda h: h.startswith(b"MZ") and b"\x00" in h[:64]),
)
# Markup recognised at the start of a text file (after white space, case-insensitive).
_MARKUP = ((b"<svg", "an SVG drawing"), (b"<!doctype html", "an HTML page"), (b"<html", "an HTML page"))


def sniff(head: bytes, size: int | None = None) -> Sniffed:
    """What a file is, from its first bytes: ``head`` may be the whole file; only :data:`SNIFF_BYTES` are looked at.

    ``size`` is the whole file's size, when ``head`` is only its start (it appears in the description of text and
    unrecognised data). The one place content is recognised: decoding failures, model loading and the listing of
    inputs without an extension all describe files through it.
    """
    size = len(head) if size is None else size
    head = bytes(head[:SNIFF_BYTES])
    if not head:
        return Sniffed("other", "an empty file")
    for kind, fmt, description, test in _SIGNATURES:
        if test(head):
            return Sniffed(kind, description, fmt)
    if _is_text(head):
        start = head.removeprefix(b"\xef\xbb\xbf").lstrip().lower()
        if start.startswith(b"<?xml"):
            return Sniffed("other", "an SVG drawing" if b"<svg" in head.lower() else "an XML document")
        for tag, description in _MARKUP:
            if start.startswith(tag):
                return Sniffed("other", description)
        return Sniffed("other", f"{size} bytes of UTF-8 text")
    return Sniffed("other", f"{size} bytes of binary data")


def _is_text(head: bytes) -> bool:
    """UTF-8 without control characters other than white space (a character cut by the end of ``head`` is allowed)."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.reason != "unexpected end of data":
            return False
        text = head[: exc.start].decode("utf-8")
    return not any((ord(c) < 32 and c not in "\t\n\r\f\v\x1b") or c == "\x7f" for c in text)


def not_an_image(data: bytes, name: str) -> ImageError:
    """The error for bytes no decoder recognises, naming what they are instead (never their content)."""
    found = sniff(data)
    if found.kind == "image":
        return ImageError(f"{name}: {found.description}, a format this decoder does not read")
    return ImageError(f"{name}: not a recognised image format: {found.description}")


# ----------------------------------------------------------------------------------------------------------------------
# Decoded image container
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class DecodedImage:
    """Pixels of one decoded image, always RGB so models see 3 channels, plus what is needed to write it back.

    ``rgb`` is (H, W, 3) uint8 or uint16 (``bit_depth`` 8 or 16); ``alpha`` is (H, W) in the same dtype or None;
    ``grey`` says the source had no colour (its three channels are equal), so an encoder can write it back as grey;
    ``format`` is Pillow's format name ("PNG", "JPEG", "WEBP", ...; None for arrays) and ``mode`` the source's
    Pillow mode ("RGB", "P", "CMYK", "I;16", ...), kept for logs and diagnostics.
    """

    rgb: np.ndarray
    alpha: np.ndarray | None = None
    bit_depth: int = 8
    grey: bool = False
    format: str | None = None
    mode: str = "RGB"

    def __post_init__(self) -> None:
        expected = {8: np.uint8, 16: np.uint16}.get(self.bit_depth)
        if expected is None:
            raise ImageError(f"bit_depth must be 8 or 16, got {self.bit_depth!r}")
        if self.rgb.ndim != 3 or self.rgb.shape[2] != 3 or self.rgb.dtype != expected:
            raise ImageError(
                f"DecodedImage.rgb must be (H, W, 3) {np.dtype(expected).name} for bit_depth {self.bit_depth}, "
                f"got {self.rgb.shape} {self.rgb.dtype}"
            )
        if self.alpha is not None and (self.alpha.shape != self.rgb.shape[:2] or self.alpha.dtype != expected):
            raise ImageError(
                f"DecodedImage.alpha must be {self.rgb.shape[:2]} {np.dtype(expected).name}, "
                f"got {self.alpha.shape} {self.alpha.dtype}"
            )

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    @classmethod
    def from_array(cls, array: np.ndarray) -> DecodedImage:
        """Wrap an (H, W) grey, (H, W, 2) grey+alpha, (H, W, 3) RGB or (H, W, 4) RGBA uint8/uint16 array."""
        array = np.asarray(array)
        if array.dtype not in (np.uint8, np.uint16):
            raise ImageError(f"image arrays must be uint8 or uint16, got dtype {array.dtype}")
        bit_depth = 8 if array.dtype == np.uint8 else 16
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[..., 0]
        if array.ndim == 2:
            return cls(np.repeat(array[..., None], 3, axis=2), None, bit_depth, True, None, "L")
        if array.ndim == 3 and array.shape[2] == 2:
            rgb = np.repeat(array[..., :1], 3, axis=2)
            return cls(rgb, np.ascontiguousarray(array[..., 1]), bit_depth, True, None, "LA")
        if array.ndim == 3 and array.shape[2] in (3, 4):
            alpha = np.ascontiguousarray(array[..., 3]) if array.shape[2] == 4 else None
            mode = "RGBA" if alpha is not None else "RGB"
            return cls(np.ascontiguousarray(array[..., :3]), alpha, bit_depth, False, None, mode)
        raise ImageError(f"image arrays must be (H, W), (H, W, 2), (H, W, 3) or (H, W, 4), got shape {array.shape}")


# ----------------------------------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _PngInfo:
    width: int
    height: int
    bit_depth: int
    color_type: int
    trns: bytes | None
    exif: bytes | None


def _png_ihdr(data: bytes, name: str) -> tuple[int, int, int, int]:
    """(width, height, bit_depth, color_type) from the IHDR chunk, which must directly follow the signature."""
    if len(data) < 33:
        raise ImageError(f"{name}: truncated PNG ({len(data)} bytes, the header alone needs 33)")
    length, ctype = struct.unpack(">I4s", data[8:16])
    if ctype != b"IHDR" or length != 13:
        raise ImageError(f"{name}: corrupt PNG: the first chunk is {ctype!r} of {length} bytes, not a 13-byte IHDR")
    if zlib.crc32(data[12:29]) != struct.unpack(">I", data[29:33])[0]:
        raise ImageError(f"{name}: corrupt PNG: IHDR checksum mismatch")
    width, height, bit_depth, color_type = struct.unpack(">IIBB", data[16:26])
    if width == 0 or height == 0:
        raise ImageError(f"{name}: corrupt PNG: declares a {width}x{height} image")
    return width, height, bit_depth, color_type


def _png_info(data: bytes, name: str) -> _PngInfo:
    """Walk every chunk: check structure and checksums, find tRNS and eXIf, insist on IDAT and IEND.

    libspng (our fast decoder) is told to trust checksums and stops reading after the image data, so truncation and
    corruption are caught here, with the chunk and offset named.
    """
    width, height, bit_depth, color_type = _png_ihdr(data, name)
    view = memoryview(data)
    pos, trns, exif, seen_idat = 8, None, None, False
    while True:
        if pos + 12 > len(data):
            raise ImageError(f"{name}: truncated PNG: the file ends at byte {len(data)} before the IEND chunk")
        length, ctype = struct.unpack(">I4s", view[pos : pos + 8])
        end = pos + 12 + length
        if end > len(data):
            raise ImageError(
                f"{name}: truncated PNG: chunk {ctype.decode('latin-1')!r} at byte {pos} declares {length} bytes "
                f"but the file ends at byte {len(data)}"
            )
        crc_ok = zlib.crc32(view[pos + 4 : pos + 8 + length]) == struct.unpack(">I", view[end - 4 : end])[0]
        critical = not (ctype[0] & 0x20)  # lowercase first letter = ancillary chunk
        if not crc_ok and critical:
            raise ImageError(f"{name}: corrupt PNG: checksum mismatch in chunk {ctype.decode('latin-1')!r}")
        if not crc_ok:
            # As libpng does by default: a damaged ancillary chunk is dropped, the image is still good.
            log.warning("%s: ignoring PNG chunk %r with a bad checksum", name, ctype)
        elif ctype == b"IDAT":
            seen_idat = True
        elif ctype == b"tRNS":
            trns = bytes(view[pos + 8 : pos + 8 + length])
        elif ctype == b"eXIf":
            exif = bytes(view[pos + 8 : pos + 8 + length])
        elif ctype == b"IEND":
            break
        pos = end
    if not seen_idat:
        raise ImageError(f"{name}: corrupt PNG: no image data (IDAT chunk)")
    return _PngInfo(width, height, bit_depth, color_type, trns, exif)


def _open_pillow(data: bytes, name: str) -> Image.Image:
    """Image.open on bytes, with Pillow's failures turned into ImageError naming the input."""
    try:
        # Our own max_pixels check (made by the caller or right after this) is the authority on size, so Pillow's
        # generic decompression-bomb warning is noise here; its hard error is still converted below. (The filter
        # change is process-wide; a race with another thread can at worst show or hide this one warning.)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{name}: refused by Pillow's decompression-bomb limit: {exc}") from None
    except UnidentifiedImageError:
        raise not_an_image(data, name) from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise ImageError(f"{name}: corrupt image header: {exc}") from None


def probe_image(data: bytes, *, name: str = "<bytes>") -> tuple[int, int, str | None]:
    """(width, height, format) read from the header only, without decoding pixels."""
    if not data:
        raise ImageError(f"{name}: empty file (0 bytes)")
    if data[:8] == _PNG_SIGNATURE:
        width, height, _, _ = _png_ihdr(data, name)
        return width, height, "PNG"
    with _open_pillow(data, name) as im:
        return im.width, im.height, im.format


def check_pixels(width: int, height: int, max_pixels: int, name: str) -> None:
    """The pixel limit: an :class:`ImageTooLargeError` naming ``name`` when ``width`` x ``height`` is over
    ``max_pixels``."""
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"{name}: {width}x{height} = {width * height:,} pixels exceeds the limit of {max_pixels:,} "
            "(decompression-bomb guard; raise max_pixels to accept larger images)"
        )


def _orient(array: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1-8) to an (H, W, ...) array so it displays upright."""
    if orientation == 2:
        return array[:, ::-1]
    if orientation == 3:
        return array[::-1, ::-1]
    if orientation == 4:
        return array[::-1]
    if orientation == 5:
        return array.swapaxes(0, 1)
    if orientation == 6:
        return array[::-1].swapaxes(0, 1)  # 90° clockwise
    if orientation == 7:
        return array[::-1, ::-1].swapaxes(0, 1)
    if orientation == 8:
        return array[:, ::-1].swapaxes(0, 1)  # 90° counter-clockwise
    return array


def _exif_orientation(exif: Image.Exif | bytes | None, name: str) -> int:
    """The EXIF orientation tag (1 when absent, unreadable or out of range)."""
    try:
        if isinstance(exif, bytes):
            parsed = Image.Exif()
            parsed.load(exif)
            exif = parsed
        value = int(exif.get(_EXIF_ORIENTATION, 1)) if exif is not None else 1
    except Exception as exc:  # broken metadata must not make the pixels unreadable
        log.warning("%s: ignoring unreadable EXIF data: %s", name, exc)
        return 1
    return value if 1 <= value <= 8 else 1


def _finish(
    luma_or_rgb: np.ndarray, alpha: np.ndarray | None, orientation: int, fmt: str | None, mode: str
) -> DecodedImage:
    """Build the DecodedImage: expand grey to RGB, apply the orientation, make arrays contiguous and writable."""

    def own(array: np.ndarray) -> np.ndarray:
        array = np.ascontiguousarray(_orient(array, orientation))
        return array if array.flags.writeable else array.copy()  # views of Pillow's buffer are read-only

    grey = luma_or_rgb.ndim == 2
    rgb = own(np.repeat(luma_or_rgb[..., None], 3, axis=2) if grey else luma_or_rgb)
    alpha = None if alpha is None else own(alpha)
    bit_depth = 16 if rgb.dtype == np.uint16 else 8
    return DecodedImage(rgb, alpha, bit_depth, grey, fmt, mode)


def _decode_png_fast(data: bytes, info: _PngInfo, name: str) -> DecodedImage:
    """8/16-bit grey, grey+alpha, RGB and RGBA PNGs through libspng (faster than Pillow, and keeps 16 bit)."""
    import pyspng

    ct, depth = info.color_type, info.bit_depth
    try:
        if ct == 4 and depth == 16:
            # libspng cannot output grey+alpha for grey+alpha sources, and pyspng's public load() offers no 16-bit
            # format choice, so ask its binding for RGBA16 directly: (H, W, 4) with R = G = B = grey.
            from pyspng import _pyspng_c

            pixels = _pyspng_c.spng_decode_image_bytes(data, _pyspng_c.SPNG_FMT_RGBA16)
        elif ct == 4:
            pixels = pyspng.load(data, "RGBA")  # (H, W, 4) with R = G = B = grey, for the same reason
        else:
            pixels = pyspng.load(data)  # grey 8 → (H, W), else (H, W, C); 16-bit grey/RGB come with opaque alpha
    except RuntimeError as exc:
        raise ImageError(f"{name}: corrupt PNG: {exc}") from None
    alpha = None
    if ct in (0, 2):
        colour = pixels if pixels.ndim == 2 else pixels[..., 0] if ct == 0 else pixels[..., :3]
        # tRNS on grey/RGB names one sample value (2 bytes per channel, big-endian) that is fully transparent; a
        # chunk of any other length is ignored, as libpng does.
        if info.trns is not None and len(info.trns) == (2 if ct == 0 else 6):
            key = np.array(struct.unpack(f">{len(info.trns) // 2}H", info.trns))
            match = colour == key[0] if ct == 0 else np.all(colour == key, axis=-1)
            alpha = np.where(match, 0, (1 << depth) - 1).astype(colour.dtype)
    else:  # 4 = grey + alpha, 6 = RGBA
        colour = pixels[..., 0] if ct == 4 else pixels[..., :3]
        alpha = pixels[..., -1]
    mode = {0: "I;16" if depth == 16 else "L", 2: "RGB", 4: "LA", 6: "RGBA"}[ct]
    return _finish(colour, alpha, _exif_orientation(info.exif, name), "PNG", mode)


_GREY_MODES = {"1", "L", "LA", "La"}
_SIXTEEN_BIT_GREY_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}
_COLOUR_MODES = {"RGB", "RGBA", "RGBa", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"}


def _pixels(im: Image.Image, mode: str) -> np.ndarray:
    """Pixels of ``im`` in ``mode``, skipping the copy convert() makes when the mode already matches."""
    return np.asarray(im if im.mode == mode else im.convert(mode))


def _decode_pillow(data: bytes, name: str) -> DecodedImage:
    """Everything that is not a plain 8/16-bit PNG: JPEG, WebP, palette PNG, GIF, BMP, TIFF, ... (first frame)."""
    with _open_pillow(data, name) as im:
        fmt, mode = im.format, im.mode
        try:
            # Decode now, so truncation surfaces here. Pillow raises on truncated data unless some other code set
            # ImageFile.LOAD_TRUNCATED_IMAGES globally; this module never does.
            im.load()
        except Image.DecompressionBombError as exc:
            raise ImageTooLargeError(f"{name}: refused by Pillow's decompression-bomb limit: {exc}") from None
        except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error) as exc:
            raise ImageError(f"{name}: cannot decode {fmt or 'image'} data: {exc}") from None
        orientation = _exif_orientation(im.getexif(), name)
        has_alpha = im.has_transparency_data
        if mode in _SIXTEEN_BIT_GREY_MODES:
            colour, alpha = np.array(im).astype(np.uint16), None
        elif mode == "I":
            values = np.array(im)
            if values.size and (values.min() < 0 or values.max() > 65535):
                raise ImageError(
                    f"{name}: 32-bit integer samples span {values.min()}..{values.max()}, outside 0..65535; "
                    "convert the image to 8 or 16 bit first"
                )
            colour, alpha = values.astype(np.uint16), None
        elif mode in _GREY_MODES:
            arr = _pixels(im, "LA" if has_alpha else "L")
            colour, alpha = (arr[..., 0], arr[..., 1]) if has_alpha else (arr, None)
        elif mode in _COLOUR_MODES:
            arr = _pixels(im, "RGBA" if has_alpha else "RGB")
            colour, alpha = (arr[..., :3], arr[..., 3]) if has_alpha else (arr, None)
        elif mode == "F":
            raise ImageError(
                f"{name}: floating-point samples (Pillow mode 'F') have no defined display range; "
                "convert the image to 8 or 16 bit first"
            )
        else:
            raise ImageError(f"{name}: unsupported pixel mode {mode!r} in {fmt or 'image'} data")
    return _finish(colour, alpha, orientation, fmt, mode)


def decode_image(data: bytes, *, name: str = "<bytes>", max_pixels: int = MAX_PIXELS_DEFAULT) -> DecodedImage:
    """Decode image bytes into a :class:`DecodedImage`, refusing anything unsafe or broken with a clear error.

    The header is read first and images with more than ``max_pixels`` pixels are refused with
    :class:`ImageTooLargeError` before any pixel memory is allocated. Pillow's own ceiling (twice
    ``PIL.Image.MAX_IMAGE_PIXELS``) still applies to the formats it decodes. Empty, unrecognised, truncated or
    corrupt data raises :class:`ImageError` naming ``name``.

    The EXIF orientation is applied. Palette, CMYK, YCbCr, 1-bit and grey sources become RGB (``grey`` records a
    grey source); transparency (alpha channel, tRNS, palette alpha) becomes ``alpha``. 16-bit PNGs (grey, grey+alpha,
    RGB, RGBA) stay 16 bit. Colour profiles are not applied; multi-frame files give their first frame.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"decode_image expects bytes, got {type(data).__name__}")
    data = bytes(data)
    width, height, fmt = probe_image(data, name=name)
    check_pixels(width, height, max_pixels, name)
    if fmt == "PNG":
        info = _png_info(data, name)
        if info.color_type in (0, 2, 4, 6) and info.bit_depth in (8, 16):
            return _decode_png_fast(data, info, name)
    # Palette and 1/2/4-bit PNGs go through Pillow, which expands palettes and low bit depths correctly.
    return _decode_pillow(data, name)


def decode_rgb8(data: bytes, name: str, *, max_pixels: int = MAX_PIXELS_DEFAULT) -> np.ndarray:
    """(H, W, 3) uint8 pixels of a dataset image.

    Ingest stores every image as an 8-bit RGB PNG, which goes straight to libspng (pyspng, faster than Pillow on a
    2K photo: ``benchmarks/RESULTS.md``) after a header check against ``max_pixels``; without the chunk walk of
    :func:`decode_image`, since the files are the project's own. Anything else takes :func:`decode_image` (16-bit
    rounded to 8 bit, grey expanded, alpha ignored).
    """
    if data[:8] == _PNG_SIGNATURE and len(data) >= 33 and data[12:16] == b"IHDR":
        width, height, bit_depth, color_type = struct.unpack(">IIBB", data[16:26])
        check_pixels(width, height, max_pixels, name)
        if bit_depth == 8 and color_type == 2:
            import pyspng

            try:
                pixels = pyspng.load(data)  # (H, W, 3) uint8
            except RuntimeError as exc:
                raise ImageError(f"{name}: corrupt PNG: {exc}") from None
            if pixels.shape == (height, width, 3):
                return pixels
    image = decode_image(data, name=name, max_pixels=max_pixels)
    rgb = image.rgb
    if rgb.dtype == np.uint16:
        rgb = ((rgb.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    return rgb


# ----------------------------------------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------------------------------------


def output_format(requested: str, source_format: str | None = None) -> str:
    """The canonical output format for a requested one: a name or alias ("JPG"), or :data:`SAME_FORMAT`, which keeps
    ``source_format`` (a format name such as "PNG" or "jpeg", or None) when it is an output format, else gives PNG."""
    if str(requested).strip().lower() == SAME_FORMAT:
        return _FORMAT_ALIASES.get(str(source_format or "").lower(), "png")
    return normalize_format(requested)


def normalize_format(fmt: str) -> str:
    """Canonical output format name ("png", "jpeg" or "webp") for a name or alias such as "JPG"."""
    key = str(fmt).strip().lower().lstrip(".")
    if key not in _FORMAT_ALIASES:
        raise ImageError(f"unsupported image format {fmt!r}; expected one of png, jpeg (jpg), webp")
    return _FORMAT_ALIASES[key]


def content_type(fmt: str) -> str:
    """HTTP content type of an output format (png → image/png, ...)."""
    return _CONTENT_TYPES[normalize_format(fmt)]


def format_from_name(filename: str) -> str:
    """Output format implied by a file name's extension (.png, .jpg/.jpeg, .webp; case-insensitive)."""
    suffix = PurePosixPath(str(filename).replace("\\", "/")).suffix.lower()
    if suffix not in _EXTENSION_FORMATS:
        raise ImageError(
            f"{filename}: cannot tell the image format from extension {suffix or '(none)'!r}; "
            f"expected one of {', '.join(sorted(_EXTENSION_FORMATS))}"
        )
    return _EXTENSION_FORMATS[suffix]


def _to_8bit(array: np.ndarray) -> np.ndarray:
    """Round 16-bit samples to the nearest 8-bit value (x · 255 / 65535)."""
    if array.dtype == np.uint8:
        return array
    return ((array.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _png_chunk(ctype: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + ctype + payload + struct.pack(">I", zlib.crc32(ctype + payload))


def _write_png(array: np.ndarray, compress_level: int) -> bytes:
    """Minimal PNG writer for (H, W, C) uint8/uint16 with C in 1..4 (grey, grey+alpha, RGB, RGBA).

    Pillow cannot write 16-bit RGB(A) PNGs, so this covers them (and 8-bit grey). Every row uses the 'Sub' filter
    (each byte minus the same byte one pixel to the left), which is cheap to vectorise and compresses photos far
    better than no filter.
    """
    height, width, channels = array.shape
    depth = 16 if array.dtype == np.uint16 else 8
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = np.ascontiguousarray(array, dtype=">u2" if depth == 16 else np.uint8).view(np.uint8)
    rows = rows.reshape(height, width * channels * depth // 8)  # (H, row bytes), samples big-endian
    bpp = channels * depth // 8
    filtered = np.empty((height, rows.shape[1] + 1), dtype=np.uint8)
    filtered[:, 0] = 1  # filter type Sub
    filtered[:, 1 : 1 + bpp] = rows[:, :bpp]
    np.subtract(rows[:, bpp:], rows[:, :-bpp], out=filtered[:, 1 + bpp :])  # wraps modulo 256, as PNG requires
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    idat = zlib.compress(filtered.tobytes(), compress_level)
    return _PNG_SIGNATURE + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def fpng_can_encode(height: int, width: int, channels: int) -> bool:
    """Whether fpng writes an image of this shape exactly (see :data:`FPNG_MAX_SIDE`)."""
    return (
        channels in (3, 4)
        and max(height, width) <= FPNG_MAX_SIDE
        and (width * channels + 1) * height <= FPNG_MAX_FILTERED_BYTES
    )


def _encode_png(pixels: np.ndarray, compress_level: int) -> bytes:
    """``pixels`` (H, W, C) as PNG: fpng where it can store them exactly, else zlib (Pillow or the built-in writer)."""
    height, width, channels = pixels.shape
    if pixels.dtype == np.uint8 and channels in (3, 4):
        if compress_level <= 1 and fpng_can_encode(height, width, channels):
            import fpng

            # fpng writes 8-bit RGB/RGBA PNGs several times faster than zlib at level 1, at a similar size.
            return fpng.from_ndarray(np.ascontiguousarray(pixels))
        # Pillow's zlib writer: a higher level asks for smaller files than fpng makes, or fpng cannot store the image.
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, "PNG", compress_level=compress_level)
        return buffer.getvalue()
    return _write_png(pixels, compress_level)


def check_output_size(width: int, height: int, fmt: str) -> None:
    """Raise :class:`ImageError` if ``fmt`` cannot store a ``width`` x ``height`` image (:data:`MAX_SIDE`).

    :func:`encode_image` checks here before encoding; callers that know an output's size before computing it (the
    batch job after decoding, the service after reading the header) check here first, instead of after the work.
    """
    fmt = normalize_format(fmt)
    if width < 1 or height < 1:
        raise ImageError(f"cannot write an empty {width}x{height} image")
    limit = MAX_SIDE[fmt]
    if max(width, height) > limit:
        advice = "choose PNG for this output" if fmt != "png" else "split the image"
        raise ImageError(
            f"a {width}x{height} image is too large for {fmt.upper()} (at most {limit} pixels a side): {advice}"
        )


_JPEG_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # DHT, JPG and DAC share the range


def _jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the first start-of-frame segment of a JPEG stream."""
    if data[:2] != b"\xff\xd8":
        raise ImageError("no JPEG start-of-image marker")
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise ImageError(f"no JPEG marker at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD7:  # segments without a length
            pos += 2
        elif marker in _JPEG_SOF_MARKERS and pos + 9 <= len(data):
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return width, height
        elif marker == 0xDA:
            break  # scan data before any frame header
        else:
            pos += 2 + struct.unpack(">H", data[pos + 2 : pos + 4])[0]
    raise ImageError("no JPEG frame header before the image data")


def _webp_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the first chunk of a WebP file: VP8X (extended), VP8L (lossless) or VP8 (lossy)."""
    if len(data) < 30 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        raise ImageError("no RIFF/WEBP header")
    kind = data[12:16]
    if kind == b"VP8X":  # canvas size minus one, 24 bits each
        return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
    if kind == b"VP8L" and data[20] == 0x2F:  # 14 bits each, minus one
        bits = int.from_bytes(data[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if kind == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":  # after the 3-byte frame tag and the start code
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    raise ImageError(f"unknown WebP chunk {kind!r}")


def encoded_size(data: bytes, fmt: str) -> tuple[int, int]:
    """(width, height) that encoded image data declares in its header: PNG IHDR, JPEG SOF, WebP VP8/VP8L/VP8X."""
    fmt = normalize_format(fmt)
    if fmt == "png":
        if data[:8] != _PNG_SIGNATURE:
            raise ImageError("no PNG signature")
        width, height, _, _ = _png_ihdr(data, "PNG")
        return width, height
    return _jpeg_size(data) if fmt == "jpeg" else _webp_size(data)


def check_encoded_size(data: bytes, fmt: str, width: int, height: int) -> None:
    """Raise :class:`ImageError` unless ``data`` declares exactly ``width`` x ``height``: an encoder that silently
    writes another size (or nothing) must fail the image, never leave a wrong file behind."""
    try:
        written = encoded_size(data, fmt)
    except ImageError as exc:
        raise ImageError(
            f"the {fmt.upper()} encoder produced {len(data):,} bytes with no readable size for a {width}x{height} "
            f"image ({exc}); refusing to store it"
        ) from None
    if written != (width, height):
        raise ImageError(
            f"the {fmt.upper()} encoder wrote a header of {written[0]}x{written[1]} for a {width}x{height} image; "
            "refusing to store it"
        )


def encode_image(
    image: DecodedImage | np.ndarray,
    fmt: str = "png",
    *,
    quality: int = 95,
    png_compress_level: int = 1,
) -> bytes:
    """Encode a :class:`DecodedImage` or an (H, W) / (H, W, 2|3|4) uint8/uint16 array as PNG, JPEG or WebP.

    PNG is lossless: bit depth, alpha and grey are kept, so ``decode_image(encode_image(x))`` gives ``x`` back.
    8-bit RGB/RGBA goes through fpng (fast) at ``png_compress_level`` 0-1 within its limits (:data:`FPNG_MAX_SIDE`),
    else through Pillow's zlib writer (also at a higher level: smaller files); other layouts through a small built-in
    writer (zlib at ``png_compress_level``). JPEG and WebP are 8 bit (16-bit samples are rounded to 8 bit) at
    ``quality``. JPEG cannot store alpha: it is dropped with a warning, leaving the colour as it is. WebP keeps alpha
    but has no grey mode, so grey images are written as RGB.

    A size the format cannot store is refused before encoding (:func:`check_output_size`), and the result's header is
    read back (:func:`check_encoded_size`): bytes that declare any other size than the image's raise
    :class:`ImageError` instead of being returned.
    """
    fmt = normalize_format(fmt)
    if not isinstance(image, DecodedImage):
        image = DecodedImage.from_array(image)
    if fmt != "png" and not 1 <= int(quality) <= 100:
        raise ImageError(f"quality must be in 1..100, got {quality!r}")
    check_output_size(image.width, image.height, fmt)
    colour = image.rgb[..., :1] if image.grey else image.rgb  # (H, W, 1) or (H, W, 3)
    pixels = colour if image.alpha is None else np.concatenate([colour, image.alpha[..., None]], axis=2)

    level = png_compress_level
    data = _encode_png(pixels, level) if fmt == "png" else _encode_lossy(image, pixels, fmt, int(quality))
    check_encoded_size(data, fmt, image.width, image.height)
    return data


def _encode_lossy(image: DecodedImage, pixels: np.ndarray, fmt: str, quality: int) -> bytes:
    """``pixels`` (H, W, C) as 8-bit JPEG or WebP at ``quality``."""
    pixels = _to_8bit(pixels)
    buffer = io.BytesIO()
    if fmt == "jpeg":
        if image.alpha is not None:
            log.warning("JPEG cannot store transparency: the alpha channel is dropped")
            pixels = pixels[..., :-1]
        Image.fromarray(np.ascontiguousarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels)).save(
            buffer, "JPEG", quality=quality
        )
    else:
        if pixels.shape[2] in (1, 2):  # WebP has no grey modes: expand the grey channel to RGB
            pixels = np.concatenate([np.repeat(pixels[..., :1], 3, axis=2), pixels[..., 1:]], axis=2)
        Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, "WEBP", quality=quality)
    return buffer.getvalue()
