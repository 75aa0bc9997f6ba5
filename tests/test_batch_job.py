"""The upscale job: jobs/upscale.py and its driver, edsr_ray.batch.job, end to end.

Real services only: the embedded S3 server and a small local Ray instance shared by the module. Collections of real
photos in several sizes and modes (RGB, grey, RGBA, 16-bit PNG, JPEG, EXIF-rotated JPEG, WebP) plus broken files go
through the Ray Data pipeline and the in-process (--local) run; every output is compared pixel for pixel with
``edsr_ray.inference`` on the same decoded input, and every bad file must be in the manifest with its reason.
"""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from batch_cases import assert_same_image, crop, expected_output, job_env, lossy
from PIL import Image

from edsr_ray import storage
from edsr_ray.batch.inputs import output_key, read_list_file
from edsr_ray.batch.job import CPU_ACTOR_ENV, ComputeOptions, model_workers, run_upscale
from edsr_ray.batch.reports import MANIFEST_NAME, SUMMARY_NAME
from edsr_ray.batch.stages import (
    CodecOptions,
    tasks_table,
)
from edsr_ray.codecs import DecodedImage, decode_image, encode_image
from edsr_ray.config import InferenceConfig
from edsr_ray.errors import ConfigError
from edsr_ray.imaging import imresize
from edsr_ray.inference import upscale, upscale_decoded
from edsr_ray.models import EDSR, MDSR
from edsr_ray.samples import photo_bytes
from edsr_ray.weights import load_model, save_model

ROOT = Path(__file__).parents[1]
JOB = ROOT / "jobs" / "upscale.py"
GOOD = ["chelsea.png", "nested/deeper/coffee.png", "nested/rocket.jpg", "nested/camera.png", "nested/rgba.png"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ray_cluster(s3):
    """A small local Ray, started after the S3 variables are set, so that its workers reach the server."""
    import ray

    ray.init(
        address="local",
        num_cpus=3,
        object_store_memory=250 * 2**20,
        include_dashboard=False,
        log_to_driver=False,
    )
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


# --------------------------------------------------------------------------------------------------------------------
# Collections of real photos and broken files


def _jpeg(array: np.ndarray, orientation: int | None = None) -> bytes:
    buffer = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    Image.fromarray(array).save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


def _png_bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height pixels (never decoded: refused by its header)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def good_images(photos) -> dict[str, bytes]:
    """Mixed sizes and modes; two of one size, so they share a model batch."""
    alpha = np.linspace(0, 255, 64 * 80).reshape(64, 80).astype(np.uint8)
    noise = (np.arange(48 * 64 * 3, dtype=np.uint16) % 251).reshape(48, 64, 3)  # uses the 16 bits
    deep = crop(photos, "coffee", 48, 64).astype(np.uint16) * 256 + noise
    webp = io.BytesIO()
    Image.fromarray(crop(photos, "rocket", 40, 52)).save(webp, "WEBP", quality=90)
    return {
        "chelsea.png": photo_bytes("chelsea.png"),  # RGB 300x451
        "same/a.png": encode_image(crop(photos, "coffee", 64, 96)),
        "same/b.png": encode_image(crop(photos, "astronaut", 64, 96)),
        "nested/camera.png": photo_bytes("camera.png"),  # grey 512x512
        "nested/rgba.png": encode_image(np.dstack([crop(photos, "astronaut", 64, 80, 100), alpha])),
        "nested/deep16.png": encode_image(deep),  # 16-bit RGB
        "photo.jpg": _jpeg(crop(photos, "chelsea", 72, 88)),
        "rotated.jpg": _jpeg(crop(photos, "coffee", 40, 60), orientation=6),  # shown as 60 high, 40 wide
        "small.webp": webp.getvalue(),
    }


def bad_images(photos) -> dict[str, tuple[bytes, str]]:
    """Broken inputs and the words their failure reason must contain."""
    png = bytearray(encode_image(crop(photos, "coffee", 32, 32)))
    png[len(png) // 2] ^= 0xFF  # inside the image data: its checksum no longer matches
    floats = io.BytesIO()
    Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8), mode="F").save(floats, "TIFF")
    return {
        "bad/corrupt.png": (bytes(png), "checksum mismatch"),
        "bad/truncated.jpg": (photo_bytes("rocket.jpg")[:2000], "truncated"),
        "bad/empty.png": (b"", "empty file"),
        "bad/notes.jpg": (b"just some text, not a picture\n" * 4, "not a recognised image format"),
        "bad/bomb.png": (_png_bomb(30000, 30000), "exceeds the limit"),
        "bad/float.tif": (floats.getvalue(), "floating-point samples"),
    }


def _objects(prefix: str) -> dict[str, dict]:
    """key (relative to prefix) -> {ETag, LastModified, Size} for every object below an s3:// prefix."""
    bucket, key = storage.split_s3(prefix)
    client = storage.s3_client()
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key.rstrip("/") + "/"):
        for obj in page.get("Contents", []):
            out[obj["Key"][len(key.rstrip("/")) + 1 :]] = {k: obj[k] for k in ("ETag", "LastModified", "Size")}
    return out


def _upload(prefix: str, files: dict[str, bytes]) -> None:
    for key, data in files.items():
        storage.write_bytes(storage.join(prefix, key), data)


def _manifest(output: str) -> list[dict]:
    return pq.read_table(io.BytesIO(storage.read_bytes(storage.join(output, MANIFEST_NAME)))).to_pylist()


# --------------------------------------------------------------------------------------------------------------------
# The Ray pipeline against the embedded S3


@pytest.mark.slow
def test_s3_collection_through_the_ray_pipeline(ray_cluster, model_file, model, photos):
    good, bad = good_images(photos), bad_images(photos)
    src, out = "s3://edsr/upscale/in", "s3://edsr/upscale/out"
    _upload(src, {**good, **{k: v for k, (v, _) in bad.items()}})
    options = CodecOptions(fmt="png")
    compute = ComputeOptions(workers=1)

    summary = run_upscale(str(model_file), src, out, options=options, compute=compute, progress=False)
    assert (summary.count("ok"), summary.count("skipped"), summary.count("failed")) == (len(good), 0, len(bad))
    assert summary.exit_code(0) == 1 and summary.exit_code(len(bad)) == 0
    pixels = sum(decode_image(d).width * decode_image(d).height for d in good.values())
    assert summary.megapixels == pytest.approx(pixels / 1e6)

    objects = _objects(out)
    wanted = {output_key(k, "png") for k in good}
    assert set(objects) == wanted | {MANIFEST_NAME, SUMMARY_NAME}, "the outputs and the reports, nothing else"
    for key, data in good.items():
        result = decode_image(storage.read_bytes(storage.join(out, output_key(key, "png"))))
        source = decode_image(data)
        assert (result.height, result.width) == (2 * source.height, 2 * source.width), key
        assert_same_image(result, expected_output(model, data), key)
    rotated = decode_image(storage.read_bytes(storage.join(out, "rotated.png")))
    assert (rotated.height, rotated.width) == (120, 80), "EXIF orientation applied before upscaling"

    rows = {r["input"]: r for r in _manifest(out)}
    assert len(rows) == len(good) + len(bad)
    for key, (_, words) in bad.items():
        row = rows[storage.join(src, key)]
        assert row["status"] == "failed" and words in row["reason"] and key in row["reason"], row
        assert row["bytes"] is None
    for key in good:
        row = rows[storage.join(src, key)]
        assert row["status"] == "ok" and row["reason"] == "" and row["seconds"] > 0, row
        assert row["output"] == storage.join(out, output_key(key, "png"))
        assert row["bytes"] == objects[output_key(key, "png")]["Size"] and row["input_bytes"] == len(good[key])
        assert (row["width"], row["height"]) == (decode_image(good[key]).width, decode_image(good[key]).height)
    report = json.loads(storage.read_bytes(storage.join(out, SUMMARY_NAME)))
    assert (report["written"], report["failed"], report["exit_code"]) == (len(good), len(bad), 1)
    assert report["settings"]["mode"] == "ray" and report["settings"]["scale"] == 2

    # A second run finds every output in its one listing and writes none of them again; bad inputs fail again.
    again = run_upscale(str(model_file), src, out, options=options, compute=compute, progress=False)
    assert (again.written, again.count("skipped"), again.count("failed")) == (0, len(good), len(bad))
    after = _objects(out)
    assert {k: after[k] for k in wanted} == {k: objects[k] for k in wanted}, "no image object rewritten"
    assert json.loads(storage.read_bytes(storage.join(out, SUMMARY_NAME)))["written"] == 0
    assert {r["status"] for r in _manifest(out) if r["input"].endswith(tuple(good))} == {"skipped"}


@pytest.mark.slow
def test_local_folder_to_local_folder_through_ray(ray_cluster, model_file, model, photos, tmp_path):
    good, bad = good_images(photos), bad_images(photos)
    src, out = tmp_path / "in", tmp_path / "out"
    for key, data in {**good, **{k: v for k, (v, _) in bad.items()}}.items():
        (src / key).parent.mkdir(parents=True, exist_ok=True)
        (src / key).write_bytes(data)
    (out / "nested").mkdir(parents=True)
    stale = out / "nested" / ".rgba.png.k3j4.edsr-tmp"  # what a killed run leaves behind
    stale.write_bytes(b"half an image")

    summary = run_upscale(
        str(model_file), str(src), str(out), compute=ComputeOptions(workers=1, batch_size=3), progress=False
    )
    assert (summary.written, summary.count("failed"), summary.removed_temp_files) == (len(good), len(bad), 1)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == sorted([*(output_key(k, "same") for k in good), MANIFEST_NAME, SUMMARY_NAME])
    for key, data in good.items():
        result = decode_image((out / output_key(key, "same")).read_bytes())
        if key.endswith(".png"):  # lossless: exactly the shared inference path
            assert_same_image(result, expected_output(model, data), key)
        else:  # "same" format: JPEG stays JPEG, WebP stays WebP, at twice the size
            assert result.format == decode_image(data).format and result.width == 2 * decode_image(data).width
    assert decode_image((out / "nested" / "deep16.png").read_bytes()).bit_depth == 16
    assert decode_image((out / "nested" / "camera.png").read_bytes()).grey


@pytest.mark.slow
def test_killed_job_rerun_completes_every_output_exactly_once(ray_cluster, model_file, model, photos):
    """The command as a subprocess on the module's Ray cluster, killed with SIGKILL once a few outputs exist, then run
    again: the second run writes exactly what is missing, and no partial or temporary object is ever left."""
    names = ("astronaut", "coffee", "chelsea", "rocket")
    inputs = {f"kill/{i:02d}.png": encode_image(crop(photos, names[i % 4], 160, 224, 8 * i)) for i in range(32)}
    inputs["kill/zz-broken.png"] = b"\x89PNG\r\n\x1a\n broken"
    src, out = "s3://edsr/killed/in", "s3://edsr/killed/out"
    _upload(src, inputs)
    args = [str(JOB), "--model", str(model_file), "--input", src, "--output", out]
    args += ["--format", "png", "--workers", "1", "--batch-size", "1", "-q"]
    env = job_env(RAY_ADDRESS=ray_cluster)

    first = subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    seen: dict[str, dict] = {}
    while time.monotonic() < deadline and first.poll() is None:
        seen = _objects(out)
        if len(seen) >= 3:
            break
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.communicate()
    assert 3 <= len(seen) < 32 and SUMMARY_NAME not in seen, f"killed with {len(seen)} outputs written"

    second = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True)
    assert second.returncode == 1, second.stderr  # the broken file
    line = second.stdout.strip().splitlines()[-1]
    report = json.loads(storage.read_bytes(storage.join(out, SUMMARY_NAME)))
    assert report["skipped"] >= len(seen) and report["written"] + report["skipped"] == 32, report
    assert f"upscaled {report['written']} images" in line and "1 failed" in line, line

    objects = _objects(out)
    assert set(objects) == {k for k in inputs if "broken" not in k} | {
        MANIFEST_NAME,
        SUMMARY_NAME,
    }
    for key, data in inputs.items():
        if "broken" not in key:
            result = decode_image(storage.read_bytes(storage.join(out, key)))
            assert_same_image(result, expected_output(model, data), key)

    # Exit 0 when the failure is within the budget; nothing left to write.
    assert _main([*args[1:], "--allow-failures", "1"]) == 0
    assert json.loads(storage.read_bytes(storage.join(out, SUMMARY_NAME)))["written"] == 0


# --------------------------------------------------------------------------------------------------------------------
# The command in-process (--local) and its errors


@pytest.fixture(scope="module")
def photo_tree(tmp_path_factory, photos) -> Path:
    """Real photos in nested folders (RGB PNG, JPEG, grey PNG, RGBA PNG), a truncated PNG and a text file."""
    root = tmp_path_factory.mktemp("photos")
    (root / "nested" / "deeper").mkdir(parents=True)
    (root / "chelsea.png").write_bytes(photo_bytes("chelsea.png"))
    (root / "nested" / "deeper" / "coffee.png").write_bytes(encode_image(crop(photos, "coffee", 120, 160)))
    (root / "nested" / "rocket.jpg").write_bytes(photo_bytes("rocket.jpg"))
    (root / "nested" / "camera.png").write_bytes(photo_bytes("camera.png"))  # greyscale
    alpha = np.linspace(0, 255, 80 * 64).reshape(64, 80).astype(np.uint8)
    (root / "nested" / "rgba.png").write_bytes(encode_image(np.dstack([crop(photos, "astronaut", 64, 80), alpha])))
    (root / "nested" / "broken.png").write_bytes(photo_bytes("coffee.png")[:3000])
    (root / "notes.txt").write_text("not an image")
    return root


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(JOB), *map(str, args)], capture_output=True, text=True, env=job_env())


def _main(argv: list) -> int:
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("upscale_job", JOB)
    job = module_from_spec(spec)
    spec.loader.exec_module(job)
    return job.main([str(a) for a in argv])


@pytest.mark.slow
def test_local_command_upscales_a_folder_tree(model_file, model, photo_tree, tmp_path):
    out = tmp_path / "out"
    args = ("--model", model_file, "--input", photo_tree, "--output", out, "--format", "png", "--local")
    first = _run(*args)
    assert first.returncode == 1, first.stderr  # the broken file failed
    assert "broken.png" in first.stderr and "truncated" in first.stderr
    assert "upscaled 5 images" in first.stdout and "1 failed" in first.stdout, first.stdout
    assert "Traceback" not in first.stderr

    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    expected = sorted([*(output_key(k, "png") for k in GOOD), MANIFEST_NAME, SUMMARY_NAME])
    assert written == expected, "same relative paths, the reports, nothing else (no temp files)"
    for key in GOOD:
        data = (photo_tree / key).read_bytes()
        assert_same_image(decode_image((out / output_key(key, "png")).read_bytes()), expected_output(model, data), key)
    assert decode_image((out / "nested" / "camera.png").read_bytes()).grey
    assert json.loads((out / SUMMARY_NAME).read_text())["settings"]["mode"] == "local"

    # A second run finds every output and writes nothing; the corrupt file still fails unless allowed.
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    again = _run(*args, "--allow-failures", 1)
    assert again.returncode == 0, again.stderr
    assert "upscaled 0 images" in again.stdout and "skipped 5 existing" in again.stdout and "1 failed" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == mtimes


def test_missing_model_is_one_clear_line(photo_tree, tmp_path):
    result = _run("--model", tmp_path / "nope.pt", "--input", photo_tree, "--output", tmp_path / "out", "--local")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "nope.pt" in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_bad_model_file_scale_and_options_errors(photo_tree, model_file, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a checkpoint")
    mdsr = tmp_path / "mdsr.pt"
    save_model(MDSR(1, 8, (2, 4)), mdsr)
    (tmp_path / "afile").write_text("x")
    cases = [
        (["--model", bad], "bad.pt"),
        (["--model", model_file, "--scale", 3], "scale 3"),
        (["--model", mdsr], "[2, 4]"),
        (["--model", model_file, "--tile", 2], "tile"),
        (["--model", model_file, "--input", tmp_path / "missing"], "missing"),
        (["--model", model_file, "--output", tmp_path / "afile"], "is a file"),
        (["--model", model_file, "--workers", 0], "workers"),
        (["--model", model_file, "--quality", 0], "quality"),
        (["--model", model_file, "--allow-failures", -1], "allow_failures"),
    ]
    for extra, needle in cases:
        argv = ["--input", photo_tree, "--output", tmp_path / "out", "--local", "-q", *extra]
        assert _main(argv) == 2, extra
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and needle in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()


def test_reports_that_cannot_be_written_end_the_run_as_interrupted(photo_tree, tmp_path, capsys):
    torch.manual_seed(1)
    model = save_model(EDSR(1, 4, 2), tmp_path / "m.pt")
    out = tmp_path / "out"
    (out / MANIFEST_NAME).mkdir(parents=True)  # a folder where the manifest file must go: its write fails
    argv = ["--model", model, "--input", photo_tree / "chelsea.png", "--output", out, "--local", "-q"]
    assert _main(argv) == 3  # not 2 ("could not start"): the image is done, only the reports are missing
    captured = capsys.readouterr()
    assert "upscaled 1 images" in captured.out
    assert "reports could not be written" in captured.err and "Traceback" not in captured.err
    assert decode_image((out / "chelsea.png").read_bytes()).rgb.shape[:2] == (600, 902)


def test_mdsr_scale_picks_the_branch(photo_tree, tmp_path, capsys):
    torch.manual_seed(1)
    mdsr = MDSR(1, 8, (2, 4))
    path = tmp_path / "mdsr.pt"
    save_model(mdsr, path)
    argv = ["--model", path, "--input", photo_tree / "nested" / "rgba.png", "--output", tmp_path, "--scale", 4]
    assert _main([*argv, "--local", "-q"]) == 0
    assert "upscaled 1 images" in capsys.readouterr().out
    source = decode_image((photo_tree / "nested" / "rgba.png").read_bytes())
    result = decode_image((tmp_path / "rgba.png").read_bytes())
    np.testing.assert_array_equal(result.rgb, upscale(mdsr.eval(), source.rgb, 4))
    np.testing.assert_array_equal(result.alpha, upscale_decoded(mdsr, source, 4).alpha)


def test_list_files_local_and_s3_entries_same_format_and_quality(s3, model_file, model, photo_tree, photos, tmp_path):
    """A text list mixing relative paths, an absolute path and an S3 URI; a Parquet list with a ``uri`` column."""
    storage.write_bytes("s3://edsr/lists/far/away.png", encode_image(crop(photos, "chelsea", 40, 48)))
    listing = tmp_path / "inputs.txt"
    listing.write_text(
        "# photos to upscale\n"
        f"{os.path.relpath(photo_tree / 'nested' / 'rocket.jpg', tmp_path)}\n\n"
        f"{photo_tree / 'nested' / 'rgba.png'}\n"
        f"{photo_tree / 'nested' / 'rgba.png'}\n"  # listed twice: upscaled once
        "s3://edsr/lists/far/away.png\n"
        f"{photo_tree / 'nested' / 'broken.png'}\n"
    )
    out = tmp_path / "out"
    summary = run_upscale(
        str(model_file),
        str(listing),
        str(out),
        options=CodecOptions(fmt="same", quality=80),
        inference=InferenceConfig(tile=32),
        compute=ComputeOptions(local=True),
        allow_failures=1,
        progress=False,
    )
    assert (summary.written, summary.count("failed"), summary.exit_code(1), summary.exit_code(0)) == (3, 1, 0, 1)
    assert "broken.png" in summary.failures[0]["input"] and "truncated" in summary.failures[0]["reason"]
    # Local and S3 entries share no folder: keys keep everything below the root / the bucket.
    local_root = str(photo_tree).lstrip("/")
    assert (out / local_root / "nested" / "rocket.jpg").exists() and (out / "edsr/lists/far/away.png").exists()
    assert decode_image((out / local_root / "nested" / "rocket.jpg").read_bytes()).format == "JPEG"
    rgba = decode_image((out / local_root / "nested" / "rgba.png").read_bytes())
    source = decode_image((photo_tree / "nested" / "rgba.png").read_bytes())
    assert_same_image(rgba, upscale_decoded(model, source, 2, tile=32), "rgba, tiled")
    assert summary.megapixels == pytest.approx((427 * 640 + 64 * 80 + 40 * 48) / 1e6)

    parquet = tmp_path / "list.parquet"
    pq.write_table(pa.table({"uri": ["nested/camera.png", str(photo_tree / "chelsea.png")]}), parquet)
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "camera.png").write_bytes(photo_bytes("camera.png"))
    assert read_list_file(str(parquet)) == [str(tmp_path / "nested" / "camera.png"), str(photo_tree / "chelsea.png")]
    pq.write_table(pa.table({"name": ["x.png"]}), tmp_path / "wrong.parquet")
    with pytest.raises(ConfigError, match="'path' or 'uri' column"):
        read_list_file(str(tmp_path / "wrong.parquet"))


def size_limit_inputs(strip) -> dict[str, tuple[bytes, str | None]]:
    """Inputs whose x2 output is within or just past a format's limits ("same" format: each keeps its own), with the
    words of their failure reason (None: the output must be written, at exactly twice the size)."""
    return {
        "png/wide.png": (encode_image(strip((1, 32768, 3))), None),  # 65536 wide: past fpng's sides
        "png/tall.png": (encode_image(strip((35000, 1, 3))), None),  # 70000 high: fpng wrote 4464
        "png/deep16.png": (encode_image(strip((1, 35000, 3), np.uint16)), None),  # 16 bit: the built-in writer
        "jpeg/at.jpg": (lossy(strip((1, 32750, 3)), "JPEG"), None),  # 65500 wide: JPEG's limit
        "jpeg/past.jpg": (lossy(strip((1, 32751, 3)), "JPEG"), "65502x2 image is too large for JPEG"),
        "webp/within.webp": (lossy(strip((8191, 1, 3)), "WEBP"), None),  # 16382 high
        "webp/past.webp": (lossy(strip((8192, 1, 3)), "WEBP"), "2x16384 image is too large for WEBP"),
    }


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["local", "ray"])
def test_outputs_past_a_format_limit_fail_with_their_reason_the_others_are_exact(
    request, mode, model_file, model, strip, tmp_path, capsys
):
    inputs = size_limit_inputs(strip)
    src, out = tmp_path / "in", tmp_path / "out"
    for key, (data, _) in inputs.items():
        (src / key).parent.mkdir(parents=True, exist_ok=True)
        (src / key).write_bytes(data)
    extra = ["--local"] if mode == "local" else ["--workers", "1"]
    if mode == "ray":
        request.getfixturevalue("ray_cluster")
    assert _main(["--model", model_file, "--input", src, "--output", out, "-q", *extra]) == 1  # as for any failure
    assert "upscaled 5 images" in capsys.readouterr().out

    rows = {Path(r["input"]).relative_to(src).as_posix(): r for r in pq.read_table(out / MANIFEST_NAME).to_pylist()}
    assert set(rows) == set(inputs)
    for key, (data, words) in inputs.items():
        row, source = rows[key], decode_image(data)
        assert (row["width"], row["height"]) == (source.width, source.height), key
        if words is not None:
            assert row["status"] == "failed" and key in row["reason"], row
            assert f"its x2 output cannot be written: a {words}" in row["reason"], row
            assert not (out / key).exists() and row["bytes"] is None
            continue
        assert row["status"] == "ok", row
        written = (out / key).read_bytes()
        assert row["bytes"] == len(written)
        with Image.open(io.BytesIO(written)) as im:  # an independent reader of the header
            assert im.size == (2 * source.width, 2 * source.height), key
        if key.endswith(".png"):
            assert_same_image(decode_image(written), expected_output(model, data), key)
    assert decode_image((out / "png" / "deep16.png").read_bytes()).bit_depth == 16


# --------------------------------------------------------------------------------------------------------------------
# Output sizes (--outscale / --width / --height)


@pytest.fixture(scope="module")
def size_tree(tmp_path_factory, photos) -> Path:
    """Two inputs of different sizes: an RGB PNG (67 x 101) and an RGBA PNG (40 x 56)."""
    root = tmp_path_factory.mktemp("sizes")
    (root / "rgb.png").write_bytes(encode_image(crop(photos, "coffee", 67, 101)))
    alpha = np.linspace(0, 255, 40 * 56).reshape(40, 56).astype(np.uint8)
    (root / "rgba.png").write_bytes(encode_image(np.dstack([crop(photos, "astronaut", 40, 56), alpha])))
    return root


@pytest.fixture(scope="module")
def mdsr_file(tmp_path_factory) -> Path:
    torch.manual_seed(3)
    return save_model(MDSR(1, 8, (2, 3, 4)), tmp_path_factory.mktemp("mdsr") / "mdsr.pt")


# option → {input: (model scale, final rows x columns)}, worked out by hand (round half up; a side alone keeps the
# aspect ratio: 67 x 150 / 101 = 99.5 -> 100; the smallest of x2/x3/x4 whose output covers the final size).
SIZE_OPTIONS = {
    "outscale-1.5": (["--outscale", "1.5"], {"rgb.png": (2, (101, 152)), "rgba.png": (2, (60, 84))}),
    "width-150": (["--width", "150"], {"rgb.png": (2, (100, 150)), "rgba.png": (3, (107, 150))}),
    "box-100x120": (["--width", "100", "--height", "120"], {"rgb.png": (2, (120, 100)), "rgba.png": (3, (120, 100))}),
    "height-300": (["--height", "300"], {"rgb.png": (4, (300, 452)), "rgba.png": (4, (300, 420))}),  # enlarged
}


def _resized_model_output(model, data: bytes, scale: int, final: tuple[int, int]) -> DecodedImage:
    """The model's output at ``scale`` (the shared inference path), resized by imresize: what the job must write."""
    source = decode_image(data)
    if source.alpha is None:
        return DecodedImage(imresize(upscale(model, source.rgb, scale), output_shape=final), None, 8, False)
    out = upscale_decoded(model, source, scale)
    return DecodedImage(
        imresize(out.rgb, output_shape=final), imresize(out.alpha, output_shape=final), 8, False, None, "RGBA"
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "option"),
    [*(("local", o) for o in SIZE_OPTIONS), *(("ray", o) for o in ("outscale-1.5", "width-150", "height-300"))],
)
def test_output_sizes_are_exact_and_equal_the_resized_model_output(
    request, mode, option, mdsr_file, size_tree, tmp_path, capsys
):
    extra, expected = SIZE_OPTIONS[option]
    out = tmp_path / "out"
    if mode == "ray":
        request.getfixturevalue("ray_cluster")
    compute = ["--local"] if mode == "local" else ["--workers", "1"]
    argv = ["--model", mdsr_file, "--input", size_tree, "--output", out, "--format", "png", "-q", *compute, *extra]
    assert _main(argv) == 0
    assert "upscaled 2 images" in capsys.readouterr().out
    mdsr = load_model(mdsr_file)
    for key, (scale, final) in expected.items():
        written = (out / key).read_bytes()
        with Image.open(io.BytesIO(written)) as im:  # an independent reader of the header
            assert im.size == (final[1], final[0]), key
        expected_image = _resized_model_output(mdsr, (size_tree / key).read_bytes(), scale, final)
        assert_same_image(decode_image(written), expected_image, key)
    settings = json.loads((out / SUMMARY_NAME).read_text())["settings"]
    asked = {"outscale": None, "width": None, "height": None}
    asked.update({k.lstrip("-"): v if k == "--outscale" else int(v) for k, v in zip(extra[::2], extra[1::2])})
    assert settings["output_size"] == asked and settings["scales"] == [2, 3, 4] and settings["mode"] == mode


@pytest.mark.slow
def test_the_models_own_factor_is_the_models_pixels_unchanged(model_file, size_tree, tmp_path, capsys):
    """x2 with an x2 model, asked as --outscale 2 or as the width of x2, writes exactly what no option writes."""
    runs = {"none": [], "outscale": ["--outscale", "2"], "width": ["--width", "202"], "scale": ["--scale", "2"]}
    pixels = {}
    for name, extra in runs.items():
        out = tmp_path / name
        argv = ["--model", model_file, "--input", size_tree / "rgb.png", "--output", out, "--local", "-q", *extra]
        assert _main(argv) == 0
        pixels[name] = decode_image((out / "rgb.png").read_bytes())
    assert pixels["none"].rgb.shape == (134, 202, 3)
    for name in runs:
        assert_same_image(pixels[name], pixels["none"], name)
    capsys.readouterr()


def test_bad_output_sizes_exit_2_naming_the_option(model_file, size_tree, tmp_path, capsys):
    cases = [
        (["--outscale", "2", "--width", "100"], "outscale: give either outscale or width/height, not both"),
        (["--outscale", "1.5", "--height", "100"], "not both"),
        (["--outscale", "0"], "outscale: must be greater than 0"),
        (["--outscale", "-1.5"], "outscale: must be greater than 0"),
        (["--outscale", "abc"], "outscale: expected a number such as 1.5 or 3, got 'abc'"),
        (["--width", "0"], "width: must be a positive whole number of pixels"),
        (["--height", "-20"], "height: must be a positive whole number of pixels"),
    ]
    for extra, needle in cases:
        argv = ["--model", model_file, "--input", size_tree, "--output", tmp_path / "out", "--local", "-q", *extra]
        assert _main(argv) == 2, extra
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: command line: ") and needle in err and "\n" not in err, err
    with pytest.raises(SystemExit) as exit_info:  # not a number at all: argparse's own usage error, also status 2
        _main(["--model", model_file, "--input", size_tree, "--output", tmp_path / "out", "--width", "wide"])
    assert exit_info.value.code == 2 and "--width: invalid int value: 'wide'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_sizes_past_the_output_limits_are_failed_rows_before_the_model(model_file, size_tree, tmp_path, capsys):
    # 67 x 101 and 40 x 56 inputs under a limit of 7000 input pixels: outputs may have 112,000 pixels. A 400 x 300
    # box (120,000) fails both, before the model; JPEG cannot store an output 65501 pixels wide.
    out = tmp_path / "out"
    common = ["--model", model_file, "--input", size_tree, "--local", "-q", "--max-pixels", 7000]
    assert _main([*common, "--output", out, "--width", 400, "--height", 300]) == 1
    assert "upscaled 0 images" in capsys.readouterr().out
    rows = pq.read_table(out / MANIFEST_NAME).to_pylist()
    assert len(rows) == 2 and all(r["status"] == "failed" for r in rows)
    for row in rows:
        assert "its 400x300 output would have 120,000 pixels, more than the limit of 112,000" in row["reason"], row
    assert _main([*common, "--output", tmp_path / "within", "--width", 350, "--height", 320]) == 0  # 112,000
    jpeg = tmp_path / "jpeg"
    assert _main([*common, "--output", jpeg, "--width", 65501, "--height", 1, "--format", "jpeg"]) == 1
    reasons = [r["reason"] for r in pq.read_table(jpeg / MANIFEST_NAME).to_pylist()]
    assert len(reasons) == 2 and all("its 65501x1 output cannot be written" in r and "JPEG" in r for r in reasons)
    capsys.readouterr()


# --------------------------------------------------------------------------------------------------------------------
# Library pieces


def test_model_workers_for_gpu_and_cpu_clusters():
    gpu = model_workers({"CPU": 16, "GPU": 2}, ComputeOptions())
    assert (gpu.actors, gpu.batch_size, gpu.device) == (2, 16, None) and gpu.remote_args["num_gpus"] == 1
    assert "runtime_env" not in gpu.remote_args
    assert model_workers({"CPU": 16, "GPU": 4}, ComputeOptions(gpus=2, workers=8)).actors == 2
    cpu = model_workers({"CPU": 16, "GPU": 2}, ComputeOptions(gpus=0))
    assert (cpu.actors, cpu.batch_size, cpu.device, cpu.threads) == (15, 4, "cpu", 1)
    assert cpu.remote_args["runtime_env"] == {"env_vars": CPU_ACTOR_ENV} and "num_gpus" not in cpu.remote_args
    assert CPU_ACTOR_ENV == {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736", "MALLOC_ARENA_MAX": "1"}
    tiny = model_workers({"CPU": 1}, ComputeOptions(batch_size=2))
    assert (tiny.actors, tiny.batch_size, tiny.remote_args["num_cpus"], tiny.codec_cpus) == (1, 2, 0.5, 0.5)


def test_bad_output_and_compute_options():
    with pytest.raises(ConfigError, match="format"):
        CodecOptions(fmt="gif")
    with pytest.raises(ConfigError, match="quality"):
        CodecOptions(quality=0)
    with pytest.raises(ConfigError, match="png_compression"):
        CodecOptions(png_compression="max")
    with pytest.raises(ConfigError, match="gpus"):
        ComputeOptions(gpus=-1)
    with pytest.raises(ConfigError, match="batch_size"):
        ComputeOptions(batch_size=0)
    assert tasks_table([]).num_rows == 0


# --------------------------------------------------------------------------------------------------------------------
# Hostile inputs: special files, files without an extension, foreign schemes, oversized inputs


@pytest.fixture(scope="module")
def hostile_tree(tmp_path_factory, photos, special_files) -> tuple[Path, dict[str, str], dict[str, str], dict]:
    """A folder mixing images, every kind of special file named like an image, images without an extension and files
    that are not images. Returns (root, key -> output key of each image, key -> words of each failure, key -> words
    of each ignored file)."""
    root = tmp_path_factory.mktemp("hostile")
    special = special_files(root)
    (root / "sub").mkdir()
    (root / "nested").mkdir()
    (root / "folder.png" / "inner.png").write_bytes(encode_image(crop(photos, "rocket", 20, 24)))  # a real folder
    files = {
        "a.png": encode_image(crop(photos, "coffee", 24, 32)),
        "sub/b.jpg": _jpeg(crop(photos, "chelsea", 24, 40)),
        "scan": _jpeg(crop(photos, "astronaut", 32, 24)),  # a JPEG without an extension
        "nested/shot": encode_image(crop(photos, "coffee", 16, 40, 50)),  # a PNG without an extension
        "README": b"Upscale everything in here.\n",
        ".DS_Store": bytes(range(256)) * 4,
        "notes.txt": b"not an image\n",
        "doc.pdf": b"%PDF-1.7\n",
    }
    for key, data in files.items():
        (root / key).write_bytes(data)
    os.mkfifo(root / "pipe")  # a FIFO without an extension: nothing to sniff
    images = {"a.png": "a.png", "sub/b.jpg": "sub/b.jpg", "scan": "scan.jpg", "nested/shot": "nested/shot.png"}
    images["folder.png/inner.png"] = "folder.png/inner.png"
    failures = {key: words for key, words in special.items() if key != "folder.png"}
    ignored = {
        "README": "no extension, and its content is neither an image nor a video: 28 bytes of UTF-8 text",
        ".DS_Store": "no extension, and its content is neither an image nor a video: 1024 bytes of binary data",
        "notes.txt": ".txt is not an image or video extension",
        "doc.pdf": ".pdf is not an image or video extension",
        "pipe": "no extension, and not a regular file: a FIFO (named pipe)",
    }
    return root, images, failures, ignored


@pytest.mark.parametrize("mode", ["local", "ray"])
def test_special_files_are_listed_failures_and_images_are_found_by_content(
    request, mode, hostile_tree, model_file, model, finishes, tmp_path
):
    """Nothing in the folder blocks the run, in either mode: every special file is a failed row with its reason, the
    images without an extension are upscaled under their format's extension, and everything else is counted."""
    if mode == "ray":
        request.getfixturevalue("ray_cluster")
    root, images, failures, ignored = hostile_tree
    out = tmp_path / "out"
    compute = ComputeOptions(local=mode == "local", workers=1)
    summary = finishes(lambda: run_upscale(str(model_file), str(root), str(out), compute=compute, progress=False), 300)

    rows = {Path(r["input"]).relative_to(root).as_posix(): r for r in _manifest(str(out))}
    assert set(rows) == set(images) | set(failures)
    for key, words in failures.items():
        row = rows[key]
        assert row["status"] == "failed" and row["reason"].startswith(f"{root / key}: ") and words in row["reason"], row
        assert row["input_bytes"] is None and row["bytes"] is None
    for key, out_key in images.items():
        row = rows[key]
        assert row["status"] == "ok" and row["output"] == str(out / out_key), row
        data = (root / key).read_bytes()
        result = decode_image((out / out_key).read_bytes())
        if out_key.endswith(".png"):
            assert_same_image(result, expected_output(model, data), key)
        else:  # "same" format: a JPEG found by its content is written as JPEG
            assert result.format == "JPEG" and result.width == 2 * decode_image(data).width
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == sorted([*images.values(), MANIFEST_NAME, SUMMARY_NAME])

    report = json.loads((out / SUMMARY_NAME).read_text())
    assert (report["ok"], report["failed"], report["exit_code"]) == (len(images), len(failures), 1)
    assert report["ignored"] == len(ignored) == len(summary.ignored)
    assert len(report["ignored_examples"]) == 5
    assert {Path(e["input"]).relative_to(root).as_posix(): e["why"] for e in report["ignored_examples"]} == ignored


def test_a_special_file_named_as_input_list_or_model_fails_clearly(model_file, tmp_path, capsys, finishes):
    os.mkfifo(tmp_path / "in.png")
    os.mkfifo(tmp_path / "list.txt")
    os.mkfifo(tmp_path / "model.pt")
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    out = tmp_path / "out"
    base = ["--output", out, "--local", "-q"]
    # A single input: one failed row, the run finishes (exit 1: more failures than allowed).
    for name in ("in.png", "zero.png"):
        assert finishes(lambda n=name: _main(["--model", model_file, "--input", tmp_path / n, *base]), 120) == 1
        (row,) = _manifest(str(out))
        assert row["status"] == "failed" and "not a regular file" in row["reason"] and name in row["reason"], row
        capsys.readouterr()
    # A list file or the model: the run cannot start (exit 2, one line naming the file).
    cases = {("--input", tmp_path / "list.txt"): "list.txt", ("--model", tmp_path / "model.pt"): "model.pt"}
    for (flag, path), name in cases.items():
        argv = ["--model", model_file, "--input", tmp_path / "in.png", *base, flag, path]
        assert finishes(lambda a=argv: _main(a), 120) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err and name in err and "not a regular file: a FIFO" in err


SCHEMES = [
    ("gs://bucket/x", ["unsupported scheme 'gs://'"]),
    ("S3://bucket/x", ["unsupported scheme 'S3://'", "did you mean s3://?"]),
    ("s3a://bucket/x", ["unsupported scheme 's3a://'", "did you mean s3://?"]),
    ("s3n://bucket/x", ["unsupported scheme 's3n://'"]),
    ("ftp://host/x", ["unsupported scheme 'ftp://'"]),
    ("https://host/x", ["unsupported scheme 'https://'"]),
    ("gs:bucket/x", ["unsupported scheme 'gs:'", "./gs:bucket/x"]),
    ("s3:bucket", ["unsupported scheme 's3:'", "did you mean s3://?"]),
]


@pytest.mark.parametrize("mode", ["local", "ray"])
@pytest.mark.parametrize("flag", ["--input", "--output", "--model"])
def test_foreign_schemes_exit_2_before_anything_is_created(
    flag, mode, model_file, photo_tree, tmp_path, capsys, monkeypatch
):
    """Every flag that takes a location, in both modes: exit 2, one "error:" line naming the flag, the value and the
    supported schemes, and nothing created (no "gs:" folder in the working directory)."""
    monkeypatch.chdir(tmp_path)
    for value, words in SCHEMES:
        args = {"--model": model_file, "--input": photo_tree, "--output": tmp_path / "out", flag: value}
        argv = [x for pair in args.items() for x in pair] + ["-q"] + (["--local"] if mode == "local" else [])
        assert _main(argv) == 2, value
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {flag} {value}: ") and "\n" not in err, err
        assert all(w in err for w in words) and "s3://bucket/key" in err and "a local path" in err, err
        assert ("models:/" in err) == (flag == "--model"), err
        assert os.listdir(tmp_path) == [], "nothing may be created for a refused location"


def test_list_file_entries_in_foreign_schemes_are_refused_by_line(model_file, photo_tree, tmp_path, capsys):
    for value, words in SCHEMES:
        listing = tmp_path / "list.txt"
        listing.write_text(f"# inputs\n{photo_tree / 'chelsea.png'}\n{value}/a.png\n")
        argv = ["--model", model_file, "--input", listing, "--output", tmp_path / "out", "--local", "-q"]
        assert _main(argv) == 2, value
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: --input {listing}, line 3: {value}/a.png: ") and "\n" not in err, err
        assert all(w.replace("bucket/x", "bucket/x/a.png") in err for w in words), err
    parquet = tmp_path / "list.parquet"
    pq.write_table(pa.table({"path": [str(photo_tree / "chelsea.png"), "gs://bucket/b.png"]}), parquet)
    argv = ["--model", model_file, "--input", parquet, "--output", tmp_path / "out", "--local", "-q"]
    assert _main(argv) == 2
    assert "row 2: gs://bucket/b.png: unsupported scheme 'gs://'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_max_read_bytes_bounds_every_input_read(model_file, photos, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    small, large = encode_image(crop(photos, "coffee", 16, 16)), encode_image(crop(photos, "coffee", 300, 400))
    (src / "small.png").write_bytes(small)
    (src / "large.png").write_bytes(large)
    limit = 2 * model_file.stat().st_size  # the weights are read under the same limit
    assert len(small) < limit < len(large)
    argv = ["--model", model_file, "--input", src, "--output", tmp_path / "out", "--local", "-q"]
    assert _main([*argv, "--max-read-bytes", limit]) == 1
    rows = {Path(r["input"]).name: r for r in _manifest(str(tmp_path / "out"))}
    assert rows["small.png"]["status"] == "ok"
    assert rows["large.png"]["status"] == "failed"
    assert f"{len(large):,} bytes is more than the {limit:,} bytes" in rows["large.png"]["reason"]
    capsys.readouterr()
    assert _main([*argv, "--max-read-bytes", model_file.stat().st_size - 1]) == 2
    assert f"{model_file}: {model_file.stat().st_size:,} bytes is more than the" in capsys.readouterr().err
    assert _main([*argv, "--max-read-bytes", 0]) == 2
    assert "max_read_bytes: must be >= 1" in capsys.readouterr().err


def test_objects_without_an_extension_are_sniffed_with_ranged_reads(s3, model_file, model, photos, tmp_path):
    src, out = "s3://edsr/sniff/in", str(tmp_path / "out")
    objects = {
        "photo.png": encode_image(crop(photos, "coffee", 24, 32)),
        "scan": _jpeg(crop(photos, "astronaut", 32, 24)),
        "deep/shot": encode_image(crop(photos, "chelsea", 16, 24)),
        "deep/clip": b"\x00\x00\x00\x18ftypisom\x00\x00\x00\x00isomavc1" + b"\x00" * 64,
        "README": b"notes\n",
        "empty": b"",
    }
    _upload(src, objects)
    summary = run_upscale(
        str(model_file), src, out, options=CodecOptions(fmt="webp"), compute=ComputeOptions(local=True)
    )
    # The MP4 header without an extension is taken for a video by its content, and fails as one (no streams).
    assert (summary.written, summary.count("failed")) == (3, 1)
    (failure,) = summary.failures
    assert failure["input"] == f"{src}/deep/clip" and failure["reason"].startswith(f"{src}/deep/clip: ")
    written = sorted(p.relative_to(out).as_posix() for p in Path(out).rglob("*.webp"))
    assert written == ["deep/shot.webp", "photo.webp", "scan.webp"]
    assert sorted((Path(s).name, why) for s, why in summary.ignored) == [
        ("README", "no extension, and its content is neither an image nor a video: 6 bytes of UTF-8 text"),
        ("empty", "no extension, and its content is neither an image nor a video: an empty file"),
    ]
    result = decode_image((Path(out) / "scan.webp").read_bytes())
    assert (result.width, result.height) == (48, 64)
