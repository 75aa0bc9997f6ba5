"""edsr_ray.batch.stages: images cross the stages unchanged, the model stage batches what it can and equals the
shared inference path, outputs are encoded as asked and never written through a link, and the codec stages stay
free of torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from batch_cases import assert_same_image, crop, expected_output, grey, job_env, lossy

from edsr_ray.batch.stages import (
    CodecOptions,
    UpscaleBatch,
    decode_batch,
    encode_and_write,
    encode_output,
    pack_image,
    unpack_image,
    write_batch,
)
from edsr_ray.codecs import DecodedImage, decode_image, encode_image
from edsr_ray.config import InferenceConfig
from edsr_ray.errors import StorageError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_images_cross_stages_unchanged(photos):
    """16-bit samples, alpha, greyness, format and mode survive the trip through a pipeline row."""
    alpha16 = np.arange(6 * 7, dtype=np.uint16).reshape(6, 7) * 1000
    cases = [
        DecodedImage(crop(photos, "coffee", 6, 7), None, 8, False, "JPEG", "RGB"),
        DecodedImage((crop(photos, "coffee", 6, 7).astype(np.uint16) * 257 + 3), alpha16, 16, False, "PNG", "RGBA"),
        DecodedImage(np.repeat(grey(photos, "coffee", 6, 7)[..., None], 3, axis=2), None, 8, True, "PNG", "L"),
    ]
    for img in cases:
        row = {"input": "x", **pack_image(img)}
        back = unpack_image(row, pa.py_buffer(row["pixels"]))
        assert_same_image(back, img, img.mode)
        assert (back.format, back.mode, back.bit_depth) == (img.format, img.mode, img.bit_depth)


def test_model_stage_batches_same_size_images_and_equals_one_by_one(model, photos):
    """Rows of mixed sizes and kinds through UpscaleBatch in-process; failed rows pass through untouched."""
    images = {
        "a.png": encode_image(crop(photos, "coffee", 24, 40)),
        "b.png": encode_image(crop(photos, "astronaut", 24, 40)),
        "c.png": encode_image(crop(photos, "chelsea", 24, 40)),
        "grey.png": encode_image(grey(photos, "coffee", 24, 40)),
        "odd.png": encode_image(crop(photos, "rocket", 30, 20)),
        "bad.png": b"nope",
    }
    decoded = _decode_in_memory(images)
    stage = UpscaleBatch(model, 2, InferenceConfig(), device="cpu")
    result = stage(decoded)
    rows = result.drop_columns(["pixels"]).to_pylist()
    pixels = [v.as_buffer() for v in result.column("pixels").combine_chunks()]
    assert sorted(Path(row["input"]).name for row in rows) == sorted(images)  # every row comes back, failed or not
    for row, buf in zip(rows, pixels):
        if row["input"] == "bad.png":
            assert "not a recognised image format" in row["reason"] and buf.size == 0
            continue
        assert row["reason"] == "" and (row["pixel_width"], row["pixel_height"]) == (
            2 * row["width"],
            2 * row["height"],
        )
        assert_same_image(unpack_image(row, buf), expected_output(model, images[row["input"]]), row["input"])


def test_each_row_runs_at_its_own_scale_and_is_resized_in_the_encode_stage(photos, tmp_path):
    """Same-size images whose sizes need different MDSR scales: planned by the decode stage, grouped by (size, scale)
    in the model stage, resized to the final size by write_batch (the model stage's rows stay the model's output)."""
    import torch

    from edsr_ray.imaging import imresize
    from edsr_ray.inference import upscale
    from edsr_ray.models import MDSR

    torch.manual_seed(2)
    mdsr = MDSR(1, 8, (2, 3, 4)).eval()
    images = {n: encode_image(crop(photos, n, 24, 40)) for n in ("coffee", "astronaut", "chelsea")}
    outputs = {n: f"{n}.png" for n in images}
    # A 100 x 60 box over 24 x 40 inputs needs x3 (60 / 24 = 2.5); --width 70 needs x2 (70 / 40 = 1.75).
    planned = {"coffee": ({"width": 100, "height": 60}, 3, (60, 100)), "astronaut": ({"width": 70}, 2, (42, 70))}
    planned["chelsea"] = planned["astronaut"]
    decoded = pa.concat_tables(
        [
            _decode_in_memory({outputs[name]: images[name]}, scale=None, size=size, scales=(2, 3, 4))
            for name, (size, _, _) in planned.items()
        ]
    )
    assert decoded.column("reason").to_pylist() == [""] * 3
    assert decoded.column("scale").to_pylist() == [3, 2, 2]
    assert decoded.column("final_width").to_pylist() == [100, 70, 70]
    upscaled = UpscaleBatch(mdsr, 4, InferenceConfig(), device="cpu")(decoded)
    assert upscaled.column("pixel_height").to_pylist() == [72, 48, 48]  # the model's output, not yet resized
    out = tmp_path / "out"
    upscaled = upscaled.set_column(1, "output", pa.array([str(out / f"{n}.png") for n in planned]))
    manifest = write_batch(upscaled, output_uri=str(out), options=CodecOptions(fmt="png"))
    assert manifest.column("status").to_pylist() == ["ok"] * 3
    for name, (_, scale, final) in planned.items():
        expected = imresize(upscale(mdsr, decode_image(images[name]).rgb, scale), output_shape=final)
        np.testing.assert_array_equal(decode_image((out / f"{name}.png").read_bytes()).rgb, expected, err_msg=name)


def _decode_in_memory(images: dict[str, bytes], **options) -> pa.Table:
    """decode_batch on files written to a temporary folder (the stage reads through edsr_ray.storage)."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        for name, data in images.items():
            Path(folder, name).write_bytes(data)
        tasks = pa.table({"input": [os.path.join(folder, n) for n in images], "output": list(images)})
        decoded = decode_batch(tasks, **options)
    names = {os.path.join(folder, n): n for n in images}
    return decoded.set_column(0, "input", pa.array([names[s] for s in decoded.column("input").to_pylist()]))


def test_png_compression_small_is_smaller_and_the_same_pixels(photos):
    img = DecodedImage.from_array(crop(photos, "coffee", 200, 300))
    fast = encode_output(img, "png", CodecOptions(png_compression="fast"))
    small = encode_output(img, "png", CodecOptions(png_compression="small"))
    assert len(small) < len(fast)
    np.testing.assert_array_equal(decode_image(small).rgb, decode_image(fast).rgb)
    grey16 = DecodedImage.from_array(grey(photos, "coffee", 50, 60).astype(np.uint16) * 257)
    back = decode_image(encode_output(grey16, "png", CodecOptions(png_compression="small")))
    assert back.grey and back.bit_depth == 16 and np.array_equal(back.rgb, grey16.rgb)


def test_codec_stages_do_not_import_torch():
    """Read/decode and encode/write workers stay light: only the model actors load torch."""
    code = "import sys, edsr_ray.batch.stages, edsr_ray.imaging; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], env=job_env()).returncode == 0


def test_never_writes_through_a_link_out_of_the_output_folder(tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "sub").symlink_to(elsewhere, target_is_directory=True)
    image = DecodedImage.from_array(np.zeros((4, 4, 3), dtype=np.uint8))
    with pytest.raises(StorageError, match="outside the output folder"):
        encode_and_write(str(out / "sub" / "x.png"), image, CodecOptions(), str(out))
    assert not list(elsewhere.iterdir())


def test_an_output_its_format_cannot_store_fails_at_decoding_before_the_model_stage(strip):
    images = {
        "fits.jpg": lossy(strip((1, 8200, 3)), "JPEG"),  # 16400 wide: JPEG and PNG, not WebP
        "past.jpg": lossy(strip((1, 32751, 3)), "JPEG"),
        "past.png": encode_image(strip((1, 32751, 3))),
    }
    for fmt, failing in (("jpeg", {"past.jpg", "past.png"}), ("same", {"past.jpg"}), ("png", set()), ("webp", None)):
        decoded = _decode_in_memory(images, scale=2, fmt=fmt)
        rows = {r["input"]: r for r in decoded.drop_columns(["pixels"]).to_pylist()}
        pixels = dict(zip(decoded.column("input").to_pylist(), decoded.column("pixels").to_pylist()))
        refused = {name for name, row in rows.items() if row["reason"]}
        assert refused == (failing if failing is not None else set(images)), fmt
        for name in refused:  # no pixels travel on to the model stage; the input's size is kept for the manifest
            assert "its x2 output cannot be written" in rows[name]["reason"] and pixels[name] == b""
            assert rows[name]["width"] == decode_image(images[name]).width
    # Without a scale (the stage on its own), nothing is refused for its output size.
    assert not any(_decode_in_memory(images).column("reason").to_pylist())
