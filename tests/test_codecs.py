"""Tests for edsr_ray.codecs: decoding and encoding real photos in every colour layout, recognising content, the
output formats and their limits, and broken or hostile input."""

from __future__ import annotations

import io
import logging
import math
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from edsr_ray import samples
from edsr_ray.codecs import (
    FORMAT_EXTENSIONS,
    MAX_PIXELS_DEFAULT,
    SNIFF_BYTES,
    DecodedImage,
    check_encoded_size,
    check_output_size,
    content_type,
    decode_image,
    encode_image,
    encoded_size,
    format_from_name,
    fpng_can_encode,
    normalize_format,
    probe_image,
    sniff,
)
from edsr_ray.errors import ImageError, ImageTooLargeError

# ----------------------------------------------------------------------------------------------------------------------
# helpers written independently of the module under test
# ----------------------------------------------------------------------------------------------------------------------


def _png(pixels: np.ndarray, color_type: int, extra_chunks: tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
    """A plain PNG writer (filter None on every row) used as an independent source of test files."""
    depth = 16 if pixels.dtype == np.uint16 else 8
    height, width = pixels.shape[:2]
    rows = pixels.astype(">u2" if depth == 16 else np.uint8).reshape(height, -1).view(np.uint8)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0))
    for kind, body in extra_chunks:
        out += chunk(kind, body)
    return out + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _pillow_png(im: Image.Image, **params) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", **params)
    return buf.getvalue()


def _psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * math.log10(peak**2 / mse)


@pytest.fixture(scope="module")
def coffee() -> np.ndarray:
    return samples.photo("coffee.png")


# ----------------------------------------------------------------------------------------------------------------------
# decode_image
# ----------------------------------------------------------------------------------------------------------------------


def test_decode_png_photo(coffee):
    img = decode_image(samples.photo_bytes("coffee.png"), name="coffee.png")
    assert (img.format, img.mode, img.bit_depth, img.grey, img.alpha) == ("PNG", "RGB", 8, False, None)
    assert img.rgb.flags.c_contiguous and img.rgb.flags.writeable
    np.testing.assert_array_equal(img.rgb, coffee)
    assert (img.height, img.width) == coffee.shape[:2]


@pytest.mark.parametrize("name", ["rocket.jpg", "retina.jpg"])
def test_decode_jpeg_photo(name):
    data = samples.photo_bytes(name)
    img = decode_image(data, name=name)
    assert img.format == "JPEG" and img.rgb.dtype == np.uint8
    assert img.rgb.flags.c_contiguous and img.rgb.flags.writeable
    with Image.open(io.BytesIO(data)) as im:
        np.testing.assert_array_equal(img.rgb, np.asarray(im.convert("RGB")))
    assert probe_image(data, name=name) == (img.width, img.height, "JPEG")


def test_decode_grey_png():
    data = (samples.data_dir() / "camera.png").read_bytes()
    img = decode_image(data)
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "L"
        grey = np.asarray(im)
    assert img.grey and img.mode == "L" and img.alpha is None
    for c in range(3):
        np.testing.assert_array_equal(img.rgb[..., c], grey)


def test_decode_rgba_png():
    data = (samples.data_dir() / "logo.png").read_bytes()
    img = decode_image(data, name="logo.png")
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "RGBA"
        rgba = np.asarray(im)
    assert img.alpha is not None and not img.grey
    np.testing.assert_array_equal(img.rgb, rgba[..., :3])
    np.testing.assert_array_equal(img.alpha, rgba[..., 3])


def test_decode_palette_png_with_and_without_transparency(coffee):
    pal = Image.fromarray(coffee[:64, :80]).quantize(16)
    img = decode_image(_pillow_png(pal))
    assert img.mode == "P" and img.alpha is None
    np.testing.assert_array_equal(img.rgb, np.asarray(pal.convert("RGB")))

    index = np.asarray(pal)
    transparent = int(index[0, 0])
    img = decode_image(_pillow_png(pal, transparency=transparent))
    assert img.alpha is not None
    np.testing.assert_array_equal(img.alpha == 0, index == transparent)
    assert np.all(img.alpha[index != transparent] == 255)


def test_decode_low_bit_depth_grey_png():
    bits = (np.indices((20, 30)).sum(axis=0) % 3 == 0).astype(np.uint8) * 255
    img = decode_image(_pillow_png(Image.fromarray(bits).convert("1")))
    assert img.grey and img.mode == "1"
    np.testing.assert_array_equal(img.rgb[..., 0], bits)


def test_decode_cmyk_jpeg():
    cmyk = np.zeros((32, 64, 4), np.uint8)
    cmyk[:, :32] = (200, 30, 60, 40)
    cmyk[:, 32:] = (0, 150, 10, 0)
    buf = io.BytesIO()
    Image.fromarray(cmyk, mode="CMYK").save(buf, "JPEG", quality=100)
    img = decode_image(buf.getvalue())
    assert img.mode == "CMYK" and img.rgb.shape == (32, 64, 3)
    # Naive CMYK -> RGB: channel = (255 - K) * (1 - C/255).
    for block, (c, m, y, k) in ((img.rgb[8:24, 8:24], cmyk[0, 0]), (img.rgb[8:24, 40:56], cmyk[0, 40])):
        expected = [(255 - k) * (1 - v / 255) for v in (c, m, y)]
        assert np.max(np.abs(block.reshape(-1, 3).astype(float) - expected)) <= 3


def test_decode_16bit_pngs(coffee):
    rng = np.random.default_rng(1)
    rgb16 = coffee[:30, :40].astype(np.uint16) * 256 + rng.integers(0, 256, (30, 40, 3), dtype=np.uint16)

    img = decode_image(_png(rgb16, color_type=2))
    assert img.bit_depth == 16 and img.rgb.dtype == np.uint16 and img.alpha is None and not img.grey
    np.testing.assert_array_equal(img.rgb, rgb16)

    rgba16 = np.concatenate([rgb16, rgb16[..., :1] ^ 0x5A5A], axis=2)
    img = decode_image(_png(rgba16, color_type=6))
    np.testing.assert_array_equal(img.rgb, rgb16)
    np.testing.assert_array_equal(img.alpha, rgba16[..., 3])

    grey16 = rgb16[..., 1]
    img = decode_image(_pillow_png(Image.fromarray(grey16)))  # Pillow writes 16-bit grey ('I;16') itself
    assert img.grey and img.bit_depth == 16 and img.mode == "I;16"
    np.testing.assert_array_equal(img.rgb[..., 2], grey16)

    ga16 = np.stack([grey16, rgb16[..., 0]], axis=2)
    img = decode_image(_png(ga16, color_type=4))
    assert img.grey and img.bit_depth == 16
    np.testing.assert_array_equal(img.rgb[..., 0], grey16)
    np.testing.assert_array_equal(img.alpha, rgb16[..., 0])


def test_decode_trns_colour_key(coffee):
    rgb = coffee[:30, :40]
    key = tuple(int(v) for v in rgb[5, 5])
    data = _pillow_png(Image.fromarray(rgb), transparency=key)
    img = decode_image(data)
    with Image.open(io.BytesIO(data)) as im:
        np.testing.assert_array_equal(img.alpha, np.asarray(im.convert("RGBA"))[..., 3])
    assert img.alpha[5, 5] == 0 and np.any(img.alpha == 255)

    grey16 = (np.arange(12, dtype=np.uint16) * 5000).reshape(3, 4)
    img = decode_image(_png(grey16, color_type=0, extra_chunks=((b"tRNS", struct.pack(">H", 10000)),)))
    np.testing.assert_array_equal(img.alpha, np.where(grey16 == 10000, 0, 65535))


def test_exif_orientation_6_on_jpeg(coffee):
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(coffee[:48, :80]).save(buf, "JPEG", quality=95, exif=exif.tobytes())
    data = buf.getvalue()
    with Image.open(io.BytesIO(data)) as im:
        stored = np.asarray(im.convert("RGB"))  # pixels as stored, orientation not applied
    img = decode_image(data)
    assert img.rgb.shape == (80, 48, 3)
    np.testing.assert_array_equal(img.rgb, np.rot90(stored, k=-1))  # tag 6 = rotate 90° clockwise to display


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow_on_png(coffee, orientation):
    rgba = np.concatenate([coffee[:20, :30], coffee[:20, :30, :1]], axis=2)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _pillow_png(Image.fromarray(rgba), exif=exif.tobytes())
    with Image.open(io.BytesIO(data)) as im:
        upright = np.asarray(ImageOps.exif_transpose(im))
    img = decode_image(data)
    np.testing.assert_array_equal(img.rgb, upright[..., :3])
    np.testing.assert_array_equal(img.alpha, upright[..., 3])


def test_decode_integer_and_float_tiffs():
    values = (np.arange(24, dtype=np.int32) * 2000).reshape(4, 6)
    buf = io.BytesIO()
    Image.fromarray(values, mode="I").save(buf, "TIFF")
    img = decode_image(buf.getvalue())
    assert img.bit_depth == 16 and img.grey
    np.testing.assert_array_equal(img.rgb[..., 0], values)

    buf = io.BytesIO()
    Image.fromarray(values * 100, mode="I").save(buf, "TIFF")
    with pytest.raises(ImageError, match=r"outside 0\.\.65535"):
        decode_image(buf.getvalue(), name="wide.tif")

    buf = io.BytesIO()
    Image.fromarray(values.astype(np.float32)).save(buf, "TIFF")
    with pytest.raises(ImageError, match="mode 'F'"):
        decode_image(buf.getvalue(), name="float.tif")


# ----------------------------------------------------------------------------------------------------------------------
# bad and hostile input
# ----------------------------------------------------------------------------------------------------------------------


def test_empty_and_non_image_bytes():
    with pytest.raises(ImageError, match=r"empty\.png: empty file"):
        decode_image(b"", name="empty.png")
    with pytest.raises(ImageError, match=r"notes\.txt: not a recognised image format"):
        decode_image(b"hello, this is plain text and not an image", name="notes.txt")
    with pytest.raises(TypeError):
        decode_image("coffee.png")


def _iso_box(kind: bytes, payload: bytes) -> bytes:
    """An ISO base media file box (MP4, MOV, AVIF, HEIF): 32-bit size, 4-byte type, payload."""
    return struct.pack(">I", 8 + len(payload)) + kind + payload


def _ftyp(brand: bytes, *compatible: bytes) -> bytes:
    return _iso_box(b"ftyp", brand + struct.pack(">I", 0) + b"".join(compatible)) + _iso_box(b"mdat", b"\0" * 64)


def _ebml(doctype: bytes) -> bytes:
    """A Matroska / WebM EBML header: the magic element, a one-byte size, then the DocType element."""
    doc = b"\x42\x82" + bytes([0x80 | len(doctype)]) + doctype
    return b"\x1a\x45\xdf\xa3" + bytes([0x80 | len(doc)]) + doc + b"\x18\x53\x80\x67" + b"\0" * 32


def _riff(form: bytes) -> bytes:
    return b"RIFF" + struct.pack("<I", 4 + 64) + form + b"\0" * 64


def _pillow(fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(samples.photos()["coffee"][:32, :48]).save(buf, fmt, **kwargs)
    return buf.getvalue()


def _archive(kind: str) -> bytes:
    import gzip
    import tarfile
    import zipfile

    buf = io.BytesIO()
    if kind == "zip":
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("a.txt", "inside")
        return buf.getvalue()
    if kind == "tar":
        with tarfile.open(fileobj=buf, mode="w") as t:
            info = tarfile.TarInfo("a.txt")
            info.size = 6
            t.addfile(info, io.BytesIO(b"inside"))
        return buf.getvalue()
    return gzip.compress(b"inside")


SNIFF_CASES = {
    # Images written by Pillow, so the signatures are checked against a real encoder.
    "png": (_pillow("PNG"), "image", "png", "a PNG image"),
    "jpeg": (_pillow("JPEG"), "image", "jpeg", "a JPEG image"),
    "webp": (_pillow("WEBP"), "image", "webp", "a WebP image"),
    "gif": (_pillow("GIF"), "image", "gif", "a GIF image"),
    "bmp": (_pillow("BMP"), "image", "bmp", "a BMP image"),
    "tiff": (_pillow("TIFF"), "image", "tiff", "a TIFF image"),
    "ppm": (_pillow("PPM"), "image", "pnm", "a Netpbm image"),
    "avif": (_ftyp(b"avif", b"mif1"), "image", "avif", "an AVIF image"),
    "heic": (_ftyp(b"heic", b"mif1"), "image", "heic", "a HEIF image"),
    # Videos, from their container headers as the specifications define them.
    "mp4": (_ftyp(b"isom", b"iso2", b"avc1", b"mp41"), "video", "mp4", "an MP4 video"),
    "mov": (_ftyp(b"qt  "), "video", "mov", "a QuickTime video"),
    "webm": (_ebml(b"webm"), "video", "webm", "a WebM video"),
    "mkv": (_ebml(b"matroska"), "video", "mkv", "a Matroska video"),
    "avi": (_riff(b"AVI "), "video", "avi", "an AVI video"),
    "ts": (bytes([0x47] + [0] * 187) * 4, "video", "ts", "an MPEG transport stream"),
    # Other things found in photo folders.
    "pdf": (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj", "other", None, "a PDF document"),
    "zip": (_archive("zip"), "other", None, "a ZIP archive"),
    "tar": (_archive("tar"), "other", None, "a tar archive"),
    "gzip": (_archive("gzip"), "other", None, "a gzip archive"),
    "wav": (_riff(b"WAVE"), "other", None, "a WAV audio file"),
    "svg": (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>', "other", None, "an SVG drawing"),
    "html": (b"  <!DOCTYPE html><html><body>secret</body></html>", "other", None, "an HTML page"),
    "text": ("password: hunter2\nnaïve café\n".encode(), "other", None, "31 bytes of UTF-8 text"),
    "binary": (bytes(range(256)) * 3, "other", None, "768 bytes of binary data"),
    "empty": (b"", "other", None, "an empty file"),
}


@pytest.mark.parametrize("case", list(SNIFF_CASES))
def test_sniff_names_the_type_of_content(case):
    data, kind, fmt, description = SNIFF_CASES[case]
    found = sniff(data)
    assert (found.kind, found.format, found.description) == (kind, fmt, description)
    assert sniff(data[:SNIFF_BYTES], len(data)) == found  # the first bytes are enough
    if fmt in FORMAT_EXTENSIONS:
        assert found.extension == FORMAT_EXTENSIONS[fmt]


def test_sniff_reports_the_whole_size_and_allows_a_character_cut_by_the_head():
    text = "é" * 1000  # two bytes each: a head of SNIFF_BYTES + 1 bytes ends in the middle of one
    head = text.encode()[: SNIFF_BYTES + 1]
    assert sniff(head, 2000).description == "2000 bytes of UTF-8 text"
    assert sniff(b"caf\xc3", 4).kind == "other" and "UTF-8 text" in sniff(b"caf\xc3", 4).description
    assert "binary data" in sniff(b"caf\xc3 and then more", 20).description  # not cut by the end: invalid


@pytest.mark.parametrize("case", ["pdf", "zip", "tar", "gzip", "mp4", "webm", "avi", "wav", "svg", "html", "text"])
def test_decode_failures_name_the_type_never_the_content(case):
    data, kind, _, description = SNIFF_CASES[case]
    with pytest.raises(ImageError) as info:
        decode_image(data, name="input.png")
    message = str(info.value)
    words = "not a recognised image format" if kind != "image" else "a format this decoder does not read"
    assert message == f"input.png: {words}: {description}" or message == f"input.png: {description}, {words}"
    assert data[:8].hex(" ") not in message and data[:8].hex() not in message
    for secret in (b"hunter2", b"secret", b"inside"):
        assert secret.decode() not in message


def test_truncated_and_corrupt_png():
    data = samples.photo_bytes("coffee.png")
    with pytest.raises(ImageError, match=r"cut\.png: truncated PNG: chunk 'IDAT'"):
        decode_image(data[: len(data) // 2], name="cut.png")
    with pytest.raises(ImageError, match="before the IEND chunk"):
        decode_image(data[:-12], name="no-iend.png")
    with pytest.raises(ImageError, match="truncated PNG"):
        decode_image(data[:20], name="header.png")
    # Flip one byte inside the first IDAT chunk's data: its checksum no longer matches.
    at = data.index(b"IDAT") + 100
    corrupt = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]
    with pytest.raises(ImageError, match="checksum mismatch in chunk 'IDAT'"):
        decode_image(corrupt, name="flipped.png")


def test_truncated_jpeg():
    data = samples.photo_bytes("rocket.jpg")
    with pytest.raises(ImageError, match=r"rocket\.jpg: cannot decode JPEG data"):
        decode_image(data[: len(data) * 2 // 3], name="rocket.jpg")
    # The header alone is enough to probe.
    assert probe_image(data[:4096], name="rocket.jpg")[2] == "JPEG"


def test_huge_declared_png_is_refused_from_its_header():
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    header = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + crc
    # No image data follows at all: refusing it as too large proves nothing past the header was read.
    assert probe_image(header) == (100_000, 100_000, "PNG")
    with pytest.raises(ImageTooLargeError, match=r"bomb\.png: 100000x100000 = 10,000,000,000 pixels exceeds"):
        decode_image(header, name="bomb.png")


def test_max_pixels_is_configurable(coffee):
    png = encode_image(coffee)
    jpeg = encode_image(coffee, "jpeg")
    assert MAX_PIXELS_DEFAULT == 40_000_000
    for data in (png, jpeg):
        with pytest.raises(ImageTooLargeError, match="limit of 200,000"):
            decode_image(data, name="photo", max_pixels=200_000)
        assert decode_image(data, max_pixels=240_000).rgb.shape == coffee.shape


def test_pillow_decompression_bomb_error_becomes_image_too_large():
    # A BMP header declaring 20000 x 20000 pixels, beyond Pillow's own hard limit (2 x MAX_IMAGE_PIXELS).
    width = height = 20_000
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    bmp = b"BM" + struct.pack("<IHHI", 14 + 40, 0, 0, 14 + 40) + info
    with pytest.raises(ImageTooLargeError, match="decompression-bomb"):
        probe_image(bmp, name="huge.bmp")
    with pytest.raises(ImageTooLargeError, match=r"huge\.bmp"):
        decode_image(bmp, name="huge.bmp", max_pixels=10**9)


# ----------------------------------------------------------------------------------------------------------------------
# encode_image
# ----------------------------------------------------------------------------------------------------------------------


def _layouts(photo: np.ndarray, dtype) -> dict[str, np.ndarray]:
    rgb = photo[:37, :53]
    if dtype == np.uint16:
        rng = np.random.default_rng(2)
        rgb = rgb.astype(np.uint16) * 256 + rng.integers(0, 256, rgb.shape, dtype=np.uint16)
    alpha = rgb[..., 1] ^ rgb[..., 2]
    return {
        "grey": rgb[..., 0],
        "grey+alpha": np.stack([rgb[..., 0], alpha], axis=2),
        "rgb": rgb,
        "rgba": np.concatenate([rgb, alpha[..., None]], axis=2),
    }


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("layout", ["grey", "grey+alpha", "rgb", "rgba"])
def test_png_round_trip_is_lossless(coffee, dtype, layout):
    array = _layouts(coffee, dtype)[layout]
    expected = DecodedImage.from_array(array)
    for source in (array, expected):
        img = decode_image(encode_image(source))
        assert img.bit_depth == expected.bit_depth and img.grey == expected.grey
        np.testing.assert_array_equal(img.rgb, expected.rgb)
        if expected.alpha is None:
            assert img.alpha is None
        else:
            np.testing.assert_array_equal(img.alpha, expected.alpha)


@pytest.mark.parametrize("layout", ["grey", "grey+alpha", "rgb", "rgba"])
def test_png_output_reads_back_in_pillow(coffee, layout):
    # An independent decoder: Pillow reads 8-bit files exactly and 16-bit colour files as their high bytes.
    for dtype in (np.uint8, np.uint16):
        array = _layouts(coffee, dtype)[layout]
        with Image.open(io.BytesIO(encode_image(array))) as im:
            pixels = np.asarray(im)
        if dtype == np.uint8:
            np.testing.assert_array_equal(pixels, array)
        elif layout == "grey":
            np.testing.assert_array_equal(pixels, array)  # 'I;16' keeps all 16 bits
        elif layout in ("rgb", "rgba"):
            np.testing.assert_array_equal(pixels, array >> 8)


def test_jpeg_encoding(coffee, caplog):
    img = decode_image(encode_image(coffee, "jpeg", quality=95))
    assert img.format == "JPEG" and _psnr(img.rgb, coffee) > 35
    assert len(encode_image(coffee, "jpeg", quality=30)) < len(encode_image(coffee, "jpeg", quality=95))

    grey = decode_image(encode_image(coffee[..., 0], "jpg"))
    assert grey.grey and grey.mode == "L"

    rgba = np.concatenate([coffee, coffee[..., :1]], axis=2)
    with caplog.at_level(logging.WARNING, logger="edsr_ray.imaging"):
        flat = decode_image(encode_image(rgba, "jpeg"))
    assert flat.alpha is None and "alpha channel is dropped" in caplog.text

    deep = decode_image(encode_image(coffee.astype(np.uint16) * 257, "jpeg"))
    assert deep.bit_depth == 8 and _psnr(deep.rgb, coffee) > 35

    with pytest.raises(ImageError, match="quality"):
        encode_image(coffee, "jpeg", quality=0)


def test_webp_encoding_keeps_alpha(coffee):
    rgba = np.concatenate([coffee[:64, :64], np.full((64, 64, 1), 255, np.uint8)], axis=2)
    rgba[:16, :16, 3] = 0
    img = decode_image(encode_image(rgba, "webp", quality=90))
    assert img.format == "WEBP" and img.alpha is not None
    np.testing.assert_array_equal(img.alpha, rgba[..., 3])
    assert _psnr(img.rgb[16:, 16:], rgba[16:, 16:, :3]) > 30
    grey = decode_image(encode_image(coffee[..., 1], "webp"))
    assert grey.rgb.shape == coffee.shape


def test_encode_rejects_bad_input(coffee):
    with pytest.raises(ImageError, match="'gif'"):
        encode_image(coffee, "gif")
    with pytest.raises(ImageError, match="int32"):
        encode_image(coffee.astype(np.int32))
    with pytest.raises(ImageError, match="shape"):
        encode_image(np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(ImageError, match="rgb must be"):
        DecodedImage(coffee.astype(np.uint16), bit_depth=8)


def test_format_helpers():
    assert content_type("png") == "image/png"
    assert content_type("JPG") == "image/jpeg"
    assert content_type("webp") == "image/webp"
    assert normalize_format(".Jpeg") == "jpeg"
    assert format_from_name("s3://bucket/a/IMG_01.JPG") == "jpeg"
    assert format_from_name("x.jpeg") == "jpeg"
    assert format_from_name("out/x.WebP") == "webp"
    assert FORMAT_EXTENSIONS == {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
    with pytest.raises(ImageError, match=r"notes\.txt.*'\.txt'"):
        format_from_name("notes.txt")
    with pytest.raises(ImageError, match="none"):
        format_from_name("README")


def _pillow_pixels(data: bytes) -> tuple[tuple[int, int], str, np.ndarray]:
    with Image.open(io.BytesIO(data)) as im:
        return im.size, im.format, np.asarray(im)


# (format, array shape, dtype, written: exact size and pixels | refused before encoding)
OUTPUT_LIMITS = [
    # PNG 8-bit RGB/RGBA: fpng up to 65535 a side; past it the zlib writer, never a truncated header.
    ("png", (1, 65535, 3), np.uint8, True),
    ("png", (65535, 1, 3), np.uint8, True),
    ("png", (1, 65536, 3), np.uint8, True),
    ("png", (65536, 1, 3), np.uint8, True),
    ("png", (1, 70000, 3), np.uint8, True),  # fpng wrote this as 4464 wide
    ("png", (40000, 1, 4), np.uint8, True),
    ("png", (80000, 1, 4), np.uint8, True),  # the x2 of a 40000x1 input: fpng wrote a header of 14464 high
    # PNG 16-bit and grey: the built-in writer, 32-bit header fields.
    ("png", (1, 65536, 3), np.uint16, True),
    ("png", (70000, 1), np.uint16, True),
    ("png", (1, 70000), np.uint8, True),
    ("png", (65536, 1, 2), np.uint8, True),
    # JPEG: libjpeg's 65500.
    ("jpeg", (1, 65500, 3), np.uint8, True),
    ("jpeg", (65500, 1), np.uint8, True),
    ("jpeg", (1, 65501, 3), np.uint8, False),
    ("jpeg", (65501, 1, 3), np.uint8, False),
    # WebP: 16383.
    ("webp", (1, 16383, 3), np.uint8, True),
    ("webp", (16383, 1, 4), np.uint8, True),
    ("webp", (1, 16384, 3), np.uint8, False),
    ("webp", (16384, 1, 3), np.uint8, False),
]


@pytest.mark.parametrize(
    ("fmt", "shape", "dtype", "written"),
    OUTPUT_LIMITS,
    ids=[f"{f}-{'x'.join(map(str, s))}-{np.dtype(d).name}" for f, s, d, _ in OUTPUT_LIMITS],
)
def test_each_format_at_and_just_past_its_size_limits(strip, fmt, shape, dtype, written):
    array = strip(shape, dtype)
    height, width = shape[:2]
    if not written:
        with pytest.raises(ImageError, match=rf"{width}x{height} image is too large for {fmt.upper()} \(at most"):
            encode_image(array, fmt)
        return
    data = encode_image(array, fmt)
    size, pillow_format, pixels = _pillow_pixels(data)  # an independent decoder reads the size back
    assert size == (width, height) and pillow_format == {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[fmt]
    if fmt != "png":
        return
    expected, back = DecodedImage.from_array(array), decode_image(data)  # lossless: every sample back, in place
    assert (back.bit_depth, back.grey) == (expected.bit_depth, expected.grey)
    np.testing.assert_array_equal(back.rgb, expected.rgb)
    assert (back.alpha is None) == (expected.alpha is None)
    if expected.alpha is not None:
        np.testing.assert_array_equal(back.alpha, expected.alpha)
    eight_bit_colour = dtype == np.uint8 and array.ndim == 3 and array.shape[2] in (3, 4)
    if eight_bit_colour:
        np.testing.assert_array_equal(pixels, array)  # and Pillow reads the same samples
    assert (b"fdEC" in data[:64]) == (eight_bit_colour and max(height, width) <= 65535), "fpng's private chunk"


def test_fpng_is_used_only_within_its_side_and_size_limits():
    assert fpng_can_encode(1, 65535, 3) and fpng_can_encode(65535, 1, 4)
    assert not fpng_can_encode(1, 65536, 3) and not fpng_can_encode(65536, 1, 4)
    # (width * channels + 1) * height bytes of filtered rows: past 4 GiB fpng overflows a 32-bit buffer size and
    # crashes the process; the limit stays at 2**31 - 1.
    assert (65535 * 3 + 1) * 10922 < 2**31 <= (65535 * 3 + 1) * 10923
    assert fpng_can_encode(10922, 65535, 3) and not fpng_can_encode(10923, 65535, 3)
    assert fpng_can_encode(8192, 65535, 4) and not fpng_can_encode(8193, 65535, 4)
    assert not fpng_can_encode(4, 4, 2)  # grey + alpha: not an fpng layout


def test_output_size_check_covers_every_format_and_empty_images():
    check_output_size(2**31 - 1, 1, "png")
    with pytest.raises(ImageError, match="too large for PNG"):
        check_output_size(2**31, 1, "png")
    check_output_size(65500, 65500, "jpg")
    with pytest.raises(ImageError, match="choose PNG"):
        check_output_size(1, 16384, "webp")
    with pytest.raises(ImageError, match="empty 0x3 image"):
        check_output_size(0, 3, "png")
    with pytest.raises(ImageError, match="empty"):
        encode_image(np.zeros((0, 5, 3), np.uint8))  # fpng would return no bytes at all


def _pillow_bytes(array: np.ndarray, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt, **options)
    return buffer.getvalue()


def test_encoded_size_reads_every_header_kind_the_encoders_write(coffee):
    rgb, rgba = coffee[:37, :53], np.dstack([coffee[:37, :53], coffee[:37, :53, 0]])
    cases = {
        "png fpng": (encode_image(rgb), "png"),
        "png zlib": (encode_image(rgb, png_compress_level=6), "png"),
        "png 16-bit": (encode_image(rgb.astype(np.uint16) * 257), "png"),
        "jpeg": (encode_image(rgb, "jpeg"), "jpeg"),
        "jpeg grey": (encode_image(rgb[..., 0], "jpeg"), "jpeg"),
        "jpeg progressive": (_pillow_bytes(rgb, "JPEG", progressive=True), "jpeg"),
        "webp lossy (VP8)": (encode_image(rgb, "webp"), "webp"),
        "webp alpha (VP8X)": (encode_image(rgba, "webp"), "webp"),
        "webp lossless (VP8L)": (_pillow_bytes(rgb, "WEBP", lossless=True), "webp"),
    }
    for name, (data, fmt) in cases.items():
        with Image.open(io.BytesIO(data)) as im:
            assert encoded_size(data, fmt) == im.size == (53, 37), name


def test_an_encoder_output_of_another_size_is_an_error_not_a_file():
    import fpng

    # What fpng itself writes past 65535 a side: the low 16 bits of the width in the header.
    wrapped = fpng.from_ndarray(np.zeros((1, 70000, 3), np.uint8))
    assert encoded_size(wrapped, "png") == (4464, 1)
    with pytest.raises(ImageError, match=r"PNG encoder wrote a header of 4464x1 for a 70000x1 image; refusing"):
        check_encoded_size(wrapped, "png", 70000, 1)
    zero = fpng.from_ndarray(np.zeros((1, 65536, 3), np.uint8))  # a width of 0 in the header
    with pytest.raises(ImageError, match="no readable size for a 65536x1 image"):
        check_encoded_size(zero, "png", 65536, 1)
    with pytest.raises(ImageError, match="produced 0 bytes"):
        check_encoded_size(b"", "png", 4, 4)
    jpeg = encode_image(np.zeros((4, 6, 3), np.uint8), "jpeg")
    check_encoded_size(jpeg, "jpeg", 6, 4)
    with pytest.raises(ImageError, match="6x4 for a 4x6 image"):
        check_encoded_size(jpeg, "jpeg", 4, 6)
    with pytest.raises(ImageError, match="no JPEG frame header"):
        check_encoded_size(jpeg[:20], "jpeg", 6, 4)
    with pytest.raises(ImageError, match="no RIFF/WEBP header"):
        check_encoded_size(jpeg, "webp", 6, 4)


def test_a_trns_chunk_of_the_wrong_length_is_ignored_as_libpng_does():
    rgb = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    # A 4-byte tRNS (an RGB key needs 6) with a valid CRC: a broken key, not a broken file.
    decoded = decode_image(_png(rgb, 2, extra_chunks=((b"tRNS", b"\x00\x01\x00\x02"),)))
    assert decoded.alpha is None
    np.testing.assert_array_equal(decoded.rgb, rgb)
