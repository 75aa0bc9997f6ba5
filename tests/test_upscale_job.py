"""The upscale command (jobs/upscale.py) end to end, and the library behind it (edsr_ray.upscaling).

The command runs as a real subprocess on a folder tree of real photos plus a corrupt file; its outputs are compared
pixel for pixel with ``edsr_ray.inference`` on the same decoded inputs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edsr_ray.config import InferenceConfig
from edsr_ray.errors import ConfigError, StorageError
from edsr_ray.imaging import DecodedImage, decode_image, encode_image
from edsr_ray.inference import upscale, upscale_decoded
from edsr_ray.models import EDSR, MDSR, save_model
from edsr_ray.samples import photo_bytes
from edsr_ray.upscaling import OutputOptions, Task, encode_and_write, output_key, plan_tasks, run_upscale

ROOT = Path(__file__).parents[1]
JOB = ROOT / "jobs" / "upscale.py"
GOOD = ["chelsea.png", "nested/deeper/coffee.png", "nested/rocket.jpg", "nested/camera.png", "nested/rgba.png"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and a shared, busy CI core makes thread handoffs slow."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "tiny_x2.pt"
    save_model(EDSR(2, 8, 2), path)
    return path


@pytest.fixture(scope="module")
def model(model_file):
    from edsr_ray.models import load_model

    return load_model(model_file)


@pytest.fixture(scope="module")
def photo_tree(tmp_path_factory, photos) -> Path:
    """Real photos in nested folders (RGB PNG, JPEG, grey PNG, RGBA PNG), a truncated PNG and a text file."""
    root = tmp_path_factory.mktemp("photos")
    (root / "nested" / "deeper").mkdir(parents=True)
    (root / "chelsea.png").write_bytes(photo_bytes("chelsea.png"))
    crop = np.ascontiguousarray(photos["coffee"][:120, :160])
    (root / "nested" / "deeper" / "coffee.png").write_bytes(encode_image(crop))
    (root / "nested" / "rocket.jpg").write_bytes(photo_bytes("rocket.jpg"))
    (root / "nested" / "camera.png").write_bytes(photo_bytes("camera.png"))  # greyscale
    alpha = np.linspace(0, 255, 80 * 64).reshape(64, 80).astype(np.uint8)
    rgba = np.dstack([photos["astronaut"][:64, :80], alpha])
    (root / "nested" / "rgba.png").write_bytes(encode_image(rgba))
    (root / "nested" / "broken.png").write_bytes(photo_bytes("coffee.png")[:3000])
    (root / "notes.txt").write_text("not an image")
    return root


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}  # as in this process (one_thread)
    return subprocess.run([sys.executable, str(JOB), *map(str, args)], capture_output=True, text=True, env=env)


@pytest.mark.slow
def test_command_upscales_a_folder_tree(model_file, model, photo_tree, tmp_path):
    out = tmp_path / "out"
    args = ("--model", model_file, "--input", photo_tree, "--output", out, "--format", "png")
    first = _run(*args)
    assert first.returncode == 1, first.stderr  # the broken file failed
    assert "broken.png" in first.stderr and "truncated" in first.stderr
    assert "upscaled 5 images" in first.stdout and "1 failed" in first.stdout, first.stdout
    assert "Traceback" not in first.stderr

    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == sorted(output_key(k, "png") for k in GOOD), "same relative paths, nothing else (no temp files)"
    for key in GOOD:
        source = decode_image((photo_tree / key).read_bytes())
        result = decode_image((out / output_key(key, "png")).read_bytes())
        assert (result.height, result.width) == (2 * source.height, 2 * source.width), key
        expected = upscale_decoded(model, source, 2)
        np.testing.assert_array_equal(result.rgb, expected.rgb, err_msg=key)
        assert result.grey == source.grey and (result.alpha is None) == (source.alpha is None), key
        if not source.grey:
            np.testing.assert_array_equal(result.rgb, upscale(model, source.rgb, 2), err_msg=key)
    assert decode_image((out / "nested" / "camera.png").read_bytes()).grey

    # A second run finds every output and writes nothing; the corrupt file still fails unless allowed.
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = _run(*args, "--allow-failures", 1)
    assert again.returncode == 0, again.stderr
    assert "upscaled 0 images" in again.stdout and "skipped 5 existing" in again.stdout and "1 failed" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == mtimes


def test_missing_model_is_one_clear_line(photo_tree, tmp_path):
    result = _run("--model", tmp_path / "nope.pt", "--input", photo_tree, "--output", tmp_path / "out")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "nope.pt" in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def _main(argv: list[str]) -> int:
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("upscale_job", JOB)
    job = module_from_spec(spec)
    spec.loader.exec_module(job)
    return job.main([str(a) for a in argv])


def test_bad_model_file_and_scale_errors(photo_tree, model_file, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a checkpoint")
    mdsr = tmp_path / "mdsr.pt"
    save_model(MDSR(1, 8, (2, 4)), mdsr)
    cases = [
        (["--model", bad], "bad.pt"),
        (["--model", model_file, "--scale", 3], "scale 3"),
        (["--model", mdsr], "[2, 4]"),
        (["--model", model_file, "--tile", 2], "tile"),
        (["--model", model_file, "--input", tmp_path / "missing"], "missing"),
    ]
    for extra, needle in cases:
        argv = ["--input", photo_tree, "--output", tmp_path / "out", *extra]
        assert _main(argv) == 2, extra
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and needle in err and "\n" not in err, err


def test_mdsr_scale_picks_the_branch(photo_tree, tmp_path, capsys):
    torch.manual_seed(1)
    mdsr = MDSR(1, 8, (2, 4))
    path = tmp_path / "mdsr.pt"
    save_model(mdsr, path)
    argv = ["--model", path, "--input", photo_tree / "nested" / "rgba.png", "--output", tmp_path, "--scale", 4]
    assert _main(argv) == 0
    assert "upscaled 1 images" in capsys.readouterr().out
    source = decode_image((photo_tree / "nested" / "rgba.png").read_bytes())
    result = decode_image((tmp_path / "rgba.png").read_bytes())
    np.testing.assert_array_equal(result.rgb, upscale(mdsr.eval(), source.rgb, 4))
    np.testing.assert_array_equal(result.alpha, upscale_decoded(mdsr, source, 4).alpha)


# --------------------------------------------------------------------------------------------------------------------
# Library


def test_output_names():
    assert output_key("a/b/c.JPG", "same") == "a/b/c.JPG"
    assert output_key("a/b/c.jpeg", "png") == "a/b/c.png"
    assert output_key("c.png", "jpeg") == "c.jpg"
    assert output_key("c.png", "webp") == "c.webp"
    assert output_key("scan.tiff", "same") == "scan.png"  # a format we do not write


def test_plan_skips_the_output_folder_inside_the_input_and_reports_collisions(tmp_path):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    for name in ("a.png", "a.jpg", "sub/b.webp", "sub/c.PNG", "readme.md"):
        (tmp_path / "in" / name).write_bytes(b"x")
    (tmp_path / "in" / "out" / "old").mkdir(parents=True)
    (tmp_path / "in" / "out" / "old" / "done.png").write_bytes(b"x")
    tasks, failed = plan_tasks(str(tmp_path / "in"), str(tmp_path / "in" / "out"), "png")
    assert [t.key for t in tasks] == ["a.jpg", "sub/b.webp", "sub/c.PNG"]
    assert [t.dest for t in tasks] == [str(tmp_path / "in" / "out" / k) for k in ("a.png", "sub/b.png", "sub/c.png")]
    assert len(failed) == 1 and failed[0].source.endswith("a.png") and "also the output of" in failed[0].reason

    single, _ = plan_tasks(str(tmp_path / "in" / "readme.md"), str(tmp_path / "o"))
    assert [(t.key, Path(t.dest).name) for t in single] == [("readme.md", "readme.png")]


def test_never_writes_through_a_link_out_of_the_output_folder(tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "sub").symlink_to(elsewhere, target_is_directory=True)
    image = DecodedImage.from_array(np.zeros((4, 4, 3), dtype=np.uint8))
    task = Task("in/sub/x.png", "sub/x.png", str(out / "sub" / "x.png"))
    with pytest.raises(StorageError, match="outside the output folder"):
        encode_and_write(task, image, OutputOptions(), str(out))
    assert not list(elsewhere.iterdir())


def test_same_format_and_quality(model_file, photo_tree, tmp_path):
    summary = run_upscale(
        str(model_file),
        str(photo_tree / "nested"),
        str(tmp_path / "o"),
        inference=InferenceConfig(tile=64),
        options=OutputOptions(fmt="same", quality=80),
    )
    assert summary.count("done") == 4 and len(summary.failures) == 1 and summary.exit_code(1) == 0
    assert summary.exit_code(0) == 1 and "broken.png" in summary.failures[0].source
    assert decode_image((tmp_path / "o" / "rocket.jpg").read_bytes()).format == "JPEG"
    assert summary.megapixels == pytest.approx((427 * 640 + 512 * 512 + 120 * 160 + 64 * 80) / 1e6)


def test_bad_output_options():
    with pytest.raises(ConfigError, match="format"):
        OutputOptions(fmt="gif")
    with pytest.raises(ConfigError, match="quality"):
        OutputOptions(quality=0)
