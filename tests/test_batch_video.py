"""Videos in the upscale job (edsr_ray.batch.video and the stages and driver around it), end to end.

Videos made by the tests with PyAV (moving crops of the sample photos, with an audio track) go through the in-process
run and the Ray Data pipeline, mixed with an image. The exact check is lossless: with FFV1 the output stores the
model's RGB frames as they are (``bgr0``, 8 bits a channel, read back as ``rgb24``: the same samples reordered), so
every output frame must equal upscaling the input frame as an image (the input frame converted to RGB the way the
library converts it, :func:`edsr_ray.video.frames.to_rgb` with the stream's colour description).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from batch_cases import job_env
from video_cases import absurd_header, corrupt, faststart, packets, without_video

from edsr_ray.batch.job import ComputeOptions, run_upscale
from edsr_ray.batch.reports import MANIFEST_NAME, SUMMARY_NAME
from edsr_ray.batch.stages import decode_batch
from edsr_ray.batch.video import decode_segment_rows, inspect_video, parts_root
from edsr_ray.codecs import DecodedImage, decode_image, encode_image
from edsr_ray.config import InferenceConfig
from edsr_ray.inference import Upscaler
from edsr_ray.video import Colour, VideoLimits, VideoOptions, probe
from edsr_ray.video.frames import to_rgb
from edsr_ray.video.samples import SampleVideo, moving_crops, write_video

ROOT = Path(__file__).parents[1]
JOB = ROOT / "jobs" / "upscale.py"
# Parts of a quarter of a second: a 24 frames/s test video is cut into several segments.
SHORT_PARTS = dict(part_seconds=0.25)
BT709 = Colour(1, 1, 1, 1)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ray_cluster(s3):
    import ray

    ray.init(address="local", num_cpus=3, object_store_memory=250 * 2**20, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def input_frames(path: Path) -> list[tuple[int, np.ndarray]]:
    """(pts, RGB) of every input frame, converted as the library converts them."""
    info = probe(path, VideoLimits())
    with av.open(str(path)) as handle:
        return [(f.pts, to_rgb(f, info.assumed_colour, info.bit_depth)) for f in handle.decode(video=0)]


def output_frames(path: Path, fmt: str = "rgb24") -> tuple[list[tuple[int, np.ndarray]], Fraction, float]:
    """(pts, RGB) of every output frame, the stream's time base and its rotation."""
    with av.open(str(path)) as handle:
        stream = handle.streams.video[0]
        frames, rotation = [], 0.0
        for f in handle.decode(stream):
            frames.append((f.pts, f.to_ndarray(format=fmt)))
            rotation = f.rotation
        return frames, stream.time_base, rotation


def assert_upscaled_exactly(model, src: Path, out: Path) -> None:
    """Every output frame equals the input frame upscaled as an image (16-bit ones as 16-bit images)."""
    upscaler = Upscaler(model, device="cpu")
    want = input_frames(src)
    got = output_frames(out, "rgb48le" if want[0][1].dtype == np.uint16 else "rgb24")[0]
    assert len(got) == len(want)
    for i, ((_, frame), (_, result)) in enumerate(zip(want, got)):
        if frame.dtype == np.uint16:
            expected = upscaler.upscale_decoded(DecodedImage(frame, None, 16, False, None, "RGB"), 2).rgb
        else:
            expected = upscaler.upscale(frame, 2)
        assert result.dtype == expected.dtype and np.array_equal(result, expected), f"{out}: frame {i} differs"


@pytest.fixture(scope="module")
def collection(tmp_path_factory, photos):
    """A folder with a rotated MP4 (AAC audio), a variable-frame-rate Matroska video (Opus audio), a 10-bit BT.709
    Matroska video and a PNG."""
    root = tmp_path_factory.mktemp("videos") / "in"
    (root / "trips").mkdir(parents=True)
    write_video(str(root / "trips" / "walk.mp4"), SampleVideo(frames=24, options={"g": "6"}, rotation=90))
    vfr = (0, 500, 1000, 1700, 2000, 2500, 3500, 4000, 4300, 5000, 5500, 6000, 7000, 7400, 8000, 8500)
    write_video(
        str(root / "vfr.mkv"),
        SampleVideo(options={"g": "4"}, time_base=Fraction(1, 12000), pts=vfr, audio="libopus", width=64, height=48),
    )
    write_video(
        str(root / "deep.mkv"),
        SampleVideo(frames=10, options={"g": "5"}, pix_fmt="yuv420p10le", bit_depth=10, colour=BT709, audio=None),
    )
    (root / "photo.png").write_bytes(encode_image(moving_crops(1, 40, 24)[0]))
    return root


@pytest.mark.parametrize("local", [True, False], ids=["local", "ray"])
def test_lossless_videos_equal_per_frame_upscaling_and_keep_what_they_had(
    collection, model_file, model, tmp_path, local, request
):
    if not local:
        request.getfixturevalue("ray_cluster")
    out = tmp_path / "out"
    summary = run_upscale(
        str(model_file),
        str(collection),
        str(out),
        video=VideoOptions(codec="ffv1", **SHORT_PARTS),
        compute=ComputeOptions(local=local, gpus=0),
        progress=False,
    )
    assert (summary.written, summary.count("failed"), summary.videos) == (4, 0, 3), summary.failures
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    # Outputs keep their keys; no parts folder, no temporary file is left.
    assert files == sorted([MANIFEST_NAME, SUMMARY_NAME, "deep.mkv", "photo.png", "trips", "trips/walk.mp4", "vfr.mkv"])
    upscaler = Upscaler(model, device="cpu")
    photo = decode_image((collection / "photo.png").read_bytes()).rgb
    np.testing.assert_array_equal(decode_image((out / "photo.png").read_bytes()).rgb, upscaler.upscale(photo, 2))
    for key in ("trips/walk.mp4", "vfr.mkv"):
        src, dest = collection / key, out / key
        assert_upscaled_exactly(model, src, dest)
        with av.open(str(src)) as handle:
            base = handle.streams.video[0].time_base
            times = [round(float(p * base), 4) for p, _ in input_frames(src)]
        got, tb, rotation = output_frames(dest)
        assert [round(float(p * tb), 4) for p, _ in got] == times  # variable frame rate kept
        assert packets(dest, "audio") == packets(src, "audio")  # bit-identical audio
        assert rotation == probe(src, VideoLimits()).rotation
    assert output_frames(out / "trips/walk.mp4")[2] == 90
    assert_upscaled_exactly(model, collection / "deep.mkv", out / "deep.mkv")  # 16 bits through the model and back
    with av.open(str(out / "deep.mkv")) as handle:
        ctx = handle.streams.video[0].codec_context
        assert ctx.pix_fmt == "gbrp16le" and (ctx.color_primaries, ctx.color_trc) == (BT709.primaries, BT709.transfer)

    rows = {Path(r["input"]).name: r for r in pq.read_table(out / MANIFEST_NAME).to_pylist()}
    walk = rows["walk.mp4"]
    assert walk["kind"] == "video" and walk["status"] == "ok" and walk["frames"] == 24
    assert (walk["codec_in"], walk["codec_out"], walk["container_out"], walk["pix_fmt_out"]) == (
        "h264",
        "ffv1",
        "mp4",
        "bgr0",
    )
    assert walk["segments"] >= 3 and walk["parts"] >= walk["segments"] and walk["parts_reused"] == 0
    assert walk["fps"] == 24.0 and abs(walk["duration_s"] - 1.0) < 0.05 and walk["seconds"] > 0
    assert walk["bytes"] == (out / "trips/walk.mp4").stat().st_size and (walk["width"], walk["height"]) == (96, 64)
    assert rows["photo.png"]["kind"] == "image" and rows["photo.png"]["frames"] is None
    document = json.loads((out / SUMMARY_NAME).read_text())["videos"]
    assert document["written"] == 3 and document["frames"] == 24 + 16 + 10
    assert document["codecs"] == {"in": {"h264": 3}, "out": {"ffv1": 3}} and document["frames_per_s"] > 0
    assert "3 videos, 50 frames" in summary.line()


def test_videos_from_and_to_s3_are_read_in_ranges_and_published_whole(s3, model_file, model, tmp_path):
    from edsr_ray import storage

    local = tmp_path / "clip.mkv"
    write_video(str(local), SampleVideo(frames=12, options={"g": "4"}, audio="libopus", width=48, height=32))
    src, out = "s3://edsr/videos/in", "s3://edsr/videos/out"
    storage.write_bytes(f"{src}/a/clip.mkv", local.read_bytes())
    summary = run_upscale(
        str(model_file),
        src,
        out,
        video=VideoOptions(codec="ffv1", **SHORT_PARTS),
        compute=ComputeOptions(local=True, gpus=0),
        progress=False,
    )
    (row,) = summary.manifest.to_pylist()
    assert row["status"] == "ok" and row["output"] == f"{out}/a/clip.mkv" and row["parts"] >= 3, row
    # The parts lived under the output prefix while the video was in progress; only the outputs are left.
    assert storage.list_files(out) == [f"{out}/{MANIFEST_NAME}", f"{out}/{SUMMARY_NAME}", f"{out}/a/clip.mkv"]
    (tmp_path / "out.mkv").write_bytes(storage.read_bytes(f"{out}/a/clip.mkv"))
    assert_upscaled_exactly(model, local, tmp_path / "out.mkv")
    assert packets(tmp_path / "out.mkv", "audio") == packets(local, "audio")


def test_bad_videos_are_rows_with_reasons_and_the_others_are_written(model_file, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    good = src / "good.mp4"
    write_video(str(good), SampleVideo(frames=30, options={"g": "8", "bf": "3"}))
    corrupt(faststart(good, tmp_path / "fs.mp4"), src / "glitch.mp4")
    (src / "truncated.mp4").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    without_video(src / "music.mp4", "aac")
    absurd_header(src / "absurd.avi")
    write_video(str(src / "long.mkv"), SampleVideo(frames=40, options={"g": "8"}, audio=None))
    (src / "noise.webm").write_bytes(os.urandom(4000))
    summary = run_upscale(
        str(model_file),
        str(src),
        str(out),
        video=VideoOptions(codec="h264", preset="ultrafast", limits=VideoLimits(max_frames=32)),
        compute=ComputeOptions(local=True, gpus=0),
        progress=False,
    )
    reasons = {Path(f["input"]).name: f["reason"] for f in summary.failures}
    assert sorted(reasons) == ["absurd.avi", "glitch.mp4", "long.mkv", "music.mp4", "noise.webm", "truncated.mp4"]
    for name, words in {
        "absurd.avi": "no valid frame size",
        "glitch.mp4": "0.583 s",  # the time of the first frame that cannot be decoded
        "long.mkv": "more than 32 frames, the limit",
        "music.mp4": "no video stream",
        "noise.webm": "not",
    }.items():
        assert reasons[name].startswith(str(src / name)) and words in reasons[name], (name, reasons[name])
    assert "--on-decode-error conceal" in reasons["glitch.mp4"]  # the reason says what the alternative is
    assert summary.written == 1 and (out / "good.mp4").is_file()
    # Nothing at the failed videos' keys and no temporary file; parts a failed video wrote stay for the next run.
    left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert [p for p in left if not p.startswith(".glitch.mp4.parts/")] == [MANIFEST_NAME, SUMMARY_NAME, "good.mp4"]

    # The documented alternative for mid-stream decode errors: conceal (frame count kept, concealed frames counted).
    summary = run_upscale(
        str(model_file),
        str(src / "glitch.mp4"),
        str(tmp_path / "concealed"),
        video=VideoOptions(preset="ultrafast", on_decode_error="conceal"),
        compute=ComputeOptions(local=True, gpus=0),
        progress=False,
    )
    (row,) = summary.manifest.to_pylist()
    assert row["status"] == "ok" and row["frames"] == 30 and row["concealed_frames"] > 0
    assert any("replaced by the frame before" in note for note in row["notes"]) or row["concealed_frames"]
    assert len(output_frames(tmp_path / "concealed" / "glitch.mp4")[0]) == 30


def test_a_killed_run_resumes_with_the_missing_parts_only(model_file, model, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    # 4 frames/s: parts of 2 s hold 8 frames, so 64 frames make 8 segments of one part each.
    write_video(
        str(src / "film.mkv"), SampleVideo(frames=64, rate=Fraction(4), options={"g": "8"}, width=64, height=48)
    )
    dest = out / "film.mkv"
    argv = [sys.executable, str(JOB), "--model", str(model_file), "--input", str(src), "--output", str(out)]
    argv += ["--local", "--gpus", "0", "--video-codec", "ffv1", "--self-ensemble", "-q"]
    proc = subprocess.Popen(argv, env=job_env(), start_new_session=True, stderr=subprocess.DEVNULL)
    folder = Path(parts_root(str(dest)))
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list(folder.rglob("*.nut"))) >= 3:
                break
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the job started above, with its own process group
        proc.wait()
    done = sorted(p.name for p in folder.rglob("*.nut"))
    assert 3 <= len(done) < 8, "the job was not killed mid-video"
    assert not dest.exists()  # never a partial video at the output key

    summary = run_upscale(
        str(model_file),
        str(src),
        str(out),
        inference=InferenceConfig(self_ensemble=True),
        video=VideoOptions(codec="ffv1"),
        compute=ComputeOptions(local=True, gpus=0),
        progress=False,
    )
    (row,) = summary.manifest.to_pylist()
    assert row["status"] == "ok" and row["parts"] == 8 and row["parts_reused"] == len(done)
    assert not folder.exists() and sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME, SUMMARY_NAME, "film.mkv"]
    upscaler = Upscaler(model, device="cpu", self_ensemble=True)
    want, got = input_frames(src / "film.mkv"), output_frames(dest)[0]
    assert len(got) == 64
    for (_, frame), (_, result) in zip(want, got):
        assert np.array_equal(result, upscaler.upscale(frame, 2))


def test_ray_runs_reuse_the_parts_an_interrupted_run_wrote(ray_cluster, model_file, model, tmp_path):
    """Resume on Ray Data: the parts of three segments written by the stages themselves (as a run stopped after them
    leaves them) are reused; only the other segments are decoded and encoded."""
    from edsr_ray.batch.inputs import Task
    from edsr_ray.batch.job import _model_identity
    from edsr_ray.batch.stages import UpscaleBatch, decode_segments, tasks_table, write_batch
    from edsr_ray.config import to_dict as config_to_dict
    from edsr_ray.video import to_dict

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    write_video(str(src / "film.mp4"), SampleVideo(frames=36, options={"g": "6"}, width=48, height=32))
    options = VideoOptions(codec="ffv1", **SHORT_PARTS)
    identity = f"{_model_identity(model)}:2:{sorted(config_to_dict(InferenceConfig()).items())}"
    dest = str(out / "film.mp4")
    rows = decode_batch(
        tasks_table([Task(str(src / "film.mp4"), "film.mp4", dest)]),
        scale=2,
        video=to_dict(options),
        model_identity=identity,
    )
    assert rows.column("kind").to_pylist() == ["video"] + ["segment"] * 6
    stage = UpscaleBatch(model, 2, InferenceConfig(), device="cpu")
    for part in decode_segments(rows.slice(1, 3), video=to_dict(options)):
        write_batch(stage(part), output_uri=str(out), options={"fmt": "same"})
    assert len(list(Path(parts_root(dest)).rglob("*.nut"))) == 3

    summary = run_upscale(
        str(model_file), str(src), str(out), video=options, compute=ComputeOptions(gpus=0), progress=False
    )
    (row,) = summary.manifest.to_pylist()
    assert row["status"] == "ok" and (row["parts"], row["parts_reused"]) == (6, 3), row
    assert not Path(parts_root(dest)).exists()
    assert_upscaled_exactly(model, src / "film.mp4", out / "film.mp4")


def test_part_rows_hold_at_most_the_part_budget_whatever_the_length(tmp_path):
    """The memory bound's unit: a video of many frames comes out of the decode stage as parts, one at a time, each
    at most ``part_bytes`` once upscaled."""
    path = tmp_path / "long.mp4"
    write_video(str(path), SampleVideo(frames=120, options={"g": "30"}, audio=None, width=48, height=32))
    frame_out = 96 * 64 * 3  # one upscaled x2 frame, bytes
    options = VideoOptions(codec="ffv1", part_bytes=5 * frame_out)
    rows = inspect_video(str(path), str(tmp_path / "out" / "long.mp4"), scale=2, options=options, model_identity="m")
    segments = [r for r in rows if r["kind"] == "segment"]
    assert rows[0]["frames"] == 120 and len(segments) == 4
    parts = decode_segment_rows(segments[0], options)
    first = next(parts)  # the generator hands over one part before decoding the next
    sizes = [first["frames"]] + [p["frames"] for p in parts]
    assert sizes == [5] * 6 and first["reason"] == ""
    assert len(first["pixels"]) * 4 == 5 * frame_out  # (K, H, W, 3) of the input, a quarter of the output


def test_a_video_named_like_an_image_is_recognised_by_its_content(tmp_path):
    """With video options (every --local run, and Ray runs with videos) it becomes a video; without (a Ray run
    planned for images only, which has no segment stage) it fails with what to do."""
    path = tmp_path / "holiday.png"
    write_video(str(path), SampleVideo(frames=6, audio=None, width=32, height=32, format="mp4"))
    tasks = pa.table({"input": [str(path)], "output": [str(tmp_path / "out" / "holiday.png")]})
    rows = decode_batch(tasks, scale=2, video=VideoOptions()).to_pylist()
    assert [r["kind"] for r in rows] == ["video", "segment"] and rows[0]["reason"] == ""
    assert rows[0]["output"] == str(tmp_path / "out" / "holiday.mp4")  # named after what it is written as
    (row,) = decode_batch(tasks, scale=2, video=None).to_pylist()
    assert row["reason"] == (
        f"{path}: it is an MP4 video named like an image, in a run planned for images only; give it a video "
        "extension (.mp4, .mkv, ...) to upscale it as a video"
    )


def test_output_sizes_are_refused_for_videos_with_the_reason(model_file, tmp_path):
    """--outscale/--width/--height size images; a video among the inputs (by name) stops the run before anything is
    read or written, and one recognised only by its content fails as its own row."""
    from edsr_ray.errors import ConfigError
    from edsr_ray.outsize import OutputSize

    src = tmp_path / "in"
    src.mkdir()
    write_video(str(src / "clip.mp4"), SampleVideo(frames=6, audio=None, width=32, height=32, format="mp4"))
    (src / "photo.png").write_bytes(encode_image(moving_crops(1, 40, 24)[0]))
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"apply to images only.*clip\.mp4"):
        run_upscale(model_file, src, out, size=OutputSize(outscale="1.5"), compute=ComputeOptions(local=True))
    assert not out.exists() or not any(out.iterdir())
    disguised = tmp_path / "holiday.png"
    write_video(str(disguised), SampleVideo(frames=6, audio=None, width=32, height=32, format="mp4"))
    tasks = pa.table({"input": [str(disguised)], "output": [str(tmp_path / "o" / "holiday.png")]})
    (row,) = decode_batch(tasks, scale=2, size={"width": 80}, video=VideoOptions()).to_pylist()
    assert "output sizes (--outscale, --width, --height) apply to images only" in row["reason"]
