"""edsr_ray.video on tiny videos made here with PyAV (moving crops of the sample photos, with audio and subtitles).

Independent references: whole-file decodes with plain PyAV (no seeking, PyAV's own conversion), packet lists read
back from the files, and a stand-in for the model (nearest-neighbour x2, exact) applied to the reference frames.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import struct
import uuid
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from video_cases import absurd_header, corrupt, faststart, packets, without_video

from edsr_ray import storage
from edsr_ray.errors import ConfigError
from edsr_ray.video import (
    CODECS,
    CONTAINERS,
    OUTPUTS,
    Colour,
    EncodeSettings,
    Index,
    JoinError,
    Segment,
    VideoDecodeError,
    VideoError,
    VideoInfo,
    VideoLimits,
    VideoOptions,
    VideoTooLargeError,
    build_index,
    choose_output,
    decode_parts,
    decode_segment,
    encode_part,
    encode_settings,
    frames_per_part,
    from_dict,
    join,
    plan_segments,
    probe,
    sniff_container,
    to_dict,
    upscale_clip,
)
from edsr_ray.video.samples import SampleVideo, write_video

LIMITS = VideoLimits()
BT709 = Colour(1, 1, 1, 1)
FULL_601 = Colour(6, 6, 6, 2)


def vfr_pts(n: int) -> tuple[int, ...]:
    """Timestamps at 1/90000: steps of 24, 30 and 60 frames/s, a 0.5 s hole, and a first frame at 0.25 s."""
    steps = (3750, 3000, 1500, 3750, 45000, 3003, 1501)
    out, t = [], 22_500
    for i in range(n):
        out.append(t)
        t += steps[i % len(steps)]
    return tuple(out)


# name -> SampleVideo fields. 96x64 frames unless said; "g" is the keyframe interval.
VIDEOS: dict[str, dict] = {
    "bframes.mp4": dict(frames=30, options={"g": "8", "bf": "3"}, cut_every=11, subtitles="mov_text"),
    "opengop.mkv": dict(
        frames=30, options={"g": "8", "x264-params": "open-gop=1:bframes=3"}, audio="libopus", subtitles="subrip"
    ),
    "vfr.mp4": dict(options={"g": "6"}, time_base=Fraction(1, 90000), pts=vfr_pts(30)),
    "vfr.mkv": dict(options={"g": "6"}, time_base=Fraction(1, 90000), pts=vfr_pts(30), audio="libopus"),
    "stream.ts": dict(frames=30, options={"g": "8"}, time_base=Fraction(1, 90000)),
    "flash.flv": dict(options={"g": "8"}, time_base=Fraction(1, 1000)),
    "altref.webm": dict(
        codec="libvpx-vp9",
        options={"g": "8", "lag-in-frames": "16", "auto-alt-ref": "1"},
        audio="libopus",
        subtitles="webvtt",
    ),
    "svt.mkv": dict(codec="libsvtav1", options={"g": "8"}, audio=None),
    "hevc10.mp4": dict(
        codec="libx265", options={"g": "8", "x265-params": "log-level=error"}, pix_fmt="yuv420p10le", bit_depth=10
    ),
    "intra.mkv": dict(codec="ffv1", options={"g": "1"}, audio="flac"),
    "packed.avi": dict(codec="mpeg4", options={"g": "8", "bf": "2"}, time_base=Fraction(1, 24), audio="libmp3lame"),
    "program.mpg": dict(
        codec="mpeg2video", rate=Fraction(25), time_base=Fraction(1, 25), options={"g": "8"}, audio="mp2", format="mpeg"
    ),
    "media.wmv": dict(codec="wmv2", time_base=Fraction(1, 1000), options={"g": "8"}, audio=None, format="asf"),
    "vp8.ogv": dict(codec="libvpx", time_base=Fraction(1, 24), options={"g": "8"}, audio="libopus", format="ogg"),
    "quicktime.mov": dict(options={"g": "8"}),
    "phone.3gp": dict(options={"g": "8"}, format="3gp", audio=None),
    "rot709.mp4": dict(rotation=90, colour=BT709, options={"g": "8"}, subtitles="mov_text", width=128, height=96),
    "full601.mkv": dict(rotation=-90, colour=FULL_601, options={"g": "8"}, audio="libopus"),
    "x264-10bit.mkv": dict(colour=BT709, pix_fmt="yuv420p10le", bit_depth=10, options={"g": "8"}),
}


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """``video(name)``: the path of the test video ``name`` of :data:`VIDEOS`, made on first use."""
    folder = tmp_path_factory.mktemp("videos")
    made: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in made:
            write_video(str(folder / name), SampleVideo(**VIDEOS[name]))
            made[name] = folder / name
        return made[name]

    return make


def decode_all(path, fmt: str = "rgb24", colour: tuple[int, int] | None = None) -> list[tuple[int, np.ndarray]]:
    """(pts, RGB) of every frame, decoded from the start with plain PyAV; ``colour`` (swscale matrix, range) given
    explicitly, else PyAV's defaults (BT.601, limited: what the library assumes for these untagged small videos)."""
    with av.open(str(path)) as handle:
        out = []
        for frame in handle.decode(video=0):
            if colour is None:
                out.append((frame.pts, frame.to_ndarray(format=fmt)))
            else:
                rgb = frame.reformat(format=fmt, src_colorspace=colour[0], src_color_range=colour[1])
                out.append((frame.pts, rgb.to_ndarray()))
    return out


def timed_packets(path, kind: str) -> list[tuple[float, str]]:
    """:func:`packets` with the times in seconds, to the millisecond (for files in containers of other time bases)."""
    with av.open(str(path)) as handle:
        stream = getattr(handle.streams, kind)[0]
        return [
            (round(float(p.pts * stream.time_base), 3), hashlib.sha1(bytes(p)).hexdigest())
            for p in handle.demux(stream)
            if p.size
        ]


def cues(path) -> list[tuple[float, str]]:
    """(start in seconds, text) of every subtitle cue, the text read as each codec stores it."""
    from edsr_ray.video.streams import text_of

    with av.open(str(path)) as handle:
        stream = handle.streams.subtitles[0]
        codec = stream.codec_context.codec.canonical_name
        return [
            (round(float(p.pts * stream.time_base), 3), text_of(codec, bytes(p)))
            for p in handle.demux(stream)
            if p.size and text_of(codec, bytes(p)).strip()
        ]


def double(frames: np.ndarray) -> np.ndarray:
    """The stand-in model: nearest-neighbour x2 of (K, H, W, 3) frames, exact and cheap."""
    return np.ascontiguousarray(frames.repeat(2, axis=1).repeat(2, axis=2))


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 99.0 if mse == 0 else float(10 * np.log10(peak**2 / mse))


def part_bytes(info: VideoInfo, frames: int, scale: int = 2) -> int:
    """The part budget that makes parts of exactly ``frames`` frames."""
    sample = 1 if info.bit_depth <= 8 else 2
    return frames * info.width * scale * info.height * scale * 3 * sample


def seconds(path) -> list[Fraction]:
    """Every frame's time, exact, read back from the file."""
    with av.open(str(path)) as handle:
        stream = handle.streams.video[0]
        return sorted(p.pts * stream.time_base for p in handle.demux(stream) if p.size)


# --------------------------------------------------------------------------------------------------------------------
# Recognising containers


def _head(path: Path) -> bytes:
    return path.read_bytes()[:512]


REAL_FILES = {
    "bframes.mp4": "mp4",
    "quicktime.mov": "mov",
    "phone.3gp": "3gp",
    "opengop.mkv": "mkv",
    "altref.webm": "webm",
    "packed.avi": "avi",
    "stream.ts": "ts",
    "flash.flv": "flv",
    "program.mpg": "mpg",
    "media.wmv": "wmv",
    "vp8.ogv": "ogg",
}


@pytest.mark.parametrize("name,container", REAL_FILES.items())
def test_sniffing_recognises_real_files(video, name, container):
    found = sniff_container(_head(video(name)))
    assert found is not None and found.name == container
    assert found.demuxer is not None


def _ftyp(brand: bytes, *compatible: bytes) -> bytes:
    body = brand + b"\x00\x00\x02\x00" + b"".join(compatible)
    return struct.pack(">I", 8 + len(body)) + b"ftyp" + body + bytes(64)


def _ebml(doctype: bytes) -> bytes:
    # EBMLVersion 1, DocType, DocTypeVersion 4; each element: ID, one-byte size (0x80 | n), data
    body = b"\x42\x86\x81\x01" + b"\x42\x82" + bytes([0x80 | len(doctype)]) + doctype + b"\x42\x87\x81\x04"
    return b"\x1a\x45\xdf\xa3" + bytes([0x80 | len(body)]) + body + bytes(32)


def _ts(packet: int, offset: int) -> bytes:
    out = bytearray(512)
    for k in range((512 - offset + packet - 1) // packet):
        out[offset + k * packet] = 0x47
    return bytes(out)


SNIFF_TABLE = [
    ("mp4 isom", _ftyp(b"isom", b"iso2", b"avc1", b"mp41"), "mp4"),
    ("mp4 M4V brand", _ftyp(b"M4V ", b"M4V ", b"mp42"), "mp4"),
    ("QuickTime brand", _ftyp(b"qt  ", b"qt  "), "mov"),
    ("old QuickTime, moov first", struct.pack(">I", 1000) + b"moov" + bytes(100), "mov"),
    ("3GP", _ftyp(b"3gp5", b"3gp5", b"isom"), "3gp"),
    ("Matroska", _ebml(b"matroska"), "mkv"),
    ("WebM", _ebml(b"webm"), "webm"),
    ("AVI", b"RIFF\x00\x10\x00\x00AVI LIST" + bytes(64), "avi"),
    ("MPEG-TS", _ts(188, 0), "ts"),
    ("M2TS", _ts(192, 4), "m2ts"),
    ("MPEG-PS", b"\x00\x00\x01\xba" + bytes(64), "mpg"),
    ("FLV", b"FLV\x01\x05\x00\x00\x00\x09" + bytes(64), "flv"),
    ("Ogg Theora", b"OggS\x00\x02" + bytes(22) + b"\x01\x2a\x80theora" + bytes(64), "ogg"),
    ("ASF", bytes.fromhex("3026b2758e66cf11a6d900aa0062ce6c") + bytes(64), "wmv"),
    ("MPEG-2 elementary stream", b"\x00\x00\x01\xb3" + bytes(64), "m2v"),
    ("HEIC image", _ftyp(b"heic", b"mif1", b"heic"), None),
    ("AVIF image", _ftyp(b"avif", b"avif", b"mif1", b"miaf"), None),
    ("HEIF image (mif1)", _ftyp(b"mif1", b"mif1", b"heic"), None),
    ("Canon raw image", _ftyp(b"crx ", b"crx "), None),
    ("M4A audio", _ftyp(b"M4A ", b"M4A ", b"mp42", b"isom"), None),
    ("Ogg Vorbis audio", b"OggS\x00\x02" + bytes(22) + b"\x01\x1e\x01vorbis" + bytes(64), None),
    ("WAV audio", b"RIFF\x00\x10\x00\x00WAVEfmt " + bytes(64), None),
    ("WebP image", b"RIFF\x00\x10\x00\x00WEBPVP8 " + bytes(64), None),
    ("PNG image", b"\x89PNG\r\n\x1a\n" + bytes(64), None),
    ("JPEG image", b"\xff\xd8\xff\xe0" + bytes(64), None),
    ("EBML of another kind", _ebml(b"other"), None),
    ("HLS playlist", b"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nhttp://example.invalid/x.ts\n", None),
    ("concat list", b"ffconcat version 1.0\nfile '/etc/passwd'\n", None),
    ("two TS packets only", _ts(188, 0)[:300], None),
    ("random bytes", np.random.default_rng(7).bytes(512), None),
    ("empty", b"", None),
]


@pytest.mark.parametrize("label,head,container", SNIFF_TABLE, ids=[row[0] for row in SNIFF_TABLE])
def test_sniffing_table(label, head, container):
    found = sniff_container(head)
    assert (found.name if found else None) == container


# --------------------------------------------------------------------------------------------------------------------
# Probing


def test_probe_reads_what_the_file_declares(video):
    info = probe(video("rot709.mp4"), LIMITS)
    assert (info.container, info.codec, info.width, info.height, info.pix_fmt) == ("mp4", "h264", 128, 96, "yuv420p")
    assert (info.bit_depth, info.time_base, info.frame_rate, info.frames) == (8, Fraction(1, 12288), 24, 24)
    assert info.duration_s == pytest.approx(1.0)
    assert info.colour == BT709
    assert info.rotation == 90 and info.display_matrix == (0, -65536, 0, 65536, 0, 0, 0, 0, 1 << 30)
    assert info.streams == ("audio #1 aac", "subtitle #2 mov_text")
    ten = probe(video("hevc10.mp4"), LIMITS)
    assert (ten.codec, ten.pix_fmt, ten.bit_depth) == ("hevc", "yuv420p10le", 10)
    assert probe(video("vfr.mkv"), LIMITS).frames == 0  # Matroska declares no frame count


def test_probe_and_decode_read_bytes_and_s3_objects_like_files(video, s3):
    path = video("bframes.mp4")
    uri = f"s3://edsr/video-{uuid.uuid4().hex[:8]}/bframes.mp4"
    storage.write_file(uri, path)
    expected = [(f.pts, f.rgb) for f in _decode_whole(path)]
    memory = io.BytesIO(path.read_bytes())
    with storage.open_reader(uri, block_size=16 << 10) as remote:
        for source in (memory, remote):
            assert probe(source, LIMITS) == probe(path, LIMITS)
            got = [(f.pts, f.rgb) for f in _decode_whole(source)]
            assert [p for p, _ in got] == [p for p, _ in expected]
            assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(got, expected))
        assert remote.requests >= 2  # read in ranges, not as one object


def _decode_whole(source):
    info = probe(source, LIMITS)
    index = build_index(source, info, LIMITS)
    return [f for segment in plan_segments(index, 4) for f in decode_segment(source, info, segment, LIMITS)]


# --------------------------------------------------------------------------------------------------------------------
# Bad input: one clear reason each


def _ten_hours(dest: Path) -> Path:
    write_video(str(dest), SampleVideo(frames=4, time_base=Fraction(1, 1000), pts=(0, 40, 80, 36_000_000), audio=None))
    return dest


def _size_switch(dest: Path) -> Path:
    """H.264 whose in-band headers switch from 64x48 to 128x96 after four frames."""
    with av.open(str(dest), "w") as out:
        stream = out.add_stream("libx264", rate=24, options={"x264-params": "repeat-headers=1", "preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(4):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 100, np.uint8), format="rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
        larger = av.CodecContext.create("libx264", "w")
        larger.width, larger.height, larger.pix_fmt, larger.time_base = 128, 96, "yuv420p", Fraction(1, 24)
        larger.options = {"x264-params": "repeat-headers=1", "preset": "ultrafast"}
        for i in [*range(4, 8), None]:
            frame = None
            if i is not None:
                frame = av.VideoFrame.from_ndarray(np.full((96, 128, 3), 50, np.uint8), format="rgb24")
                frame = frame.reformat(format="yuv420p")
                frame.pts = i
            for packet in larger.encode(frame):
                packet.stream, packet.time_base = stream, Fraction(1, 24)
                out.mux(packet)
    return dest


def _read_everything(path: Path, limits: VideoLimits = LIMITS) -> int:
    info = probe(path, limits)
    index = build_index(path, info, limits)
    return sum(1 for s in plan_segments(index, 8) for _ in decode_segment(path, info, s, limits))


def test_hostile_inputs_get_one_clear_reason_each(video, tmp_path):
    source = video("bframes.mp4")
    data = source.read_bytes()
    cases = {
        "random.mp4": (lambda p: p.write_bytes(np.random.default_rng(0).bytes(50_000)), VideoError, "not a video"),
        "playlist.avi": (
            lambda p: p.write_bytes(b"#EXTM3U\n#EXTINF:1,\n/etc/passwd\n"),
            VideoError,
            "not a video in a container",
        ),
        "empty.mkv": (lambda p: p.write_bytes(b""), VideoError, "not a video"),
        "moov-at-end-truncated.mp4": (
            lambda p: p.write_bytes(data[: len(data) // 2]),
            VideoError,
            "cannot open an MP4 video: Invalid data",
        ),
        "faststart-truncated.mp4": (
            lambda p: p.write_bytes(faststart(source, tmp_path / "fs.mp4").read_bytes()[:14_000]),
            VideoError,
            r"truncated: the file holds \d+ of the 30 frames",
        ),
        "corrupt.mp4": (
            lambda p: corrupt(faststart(source, tmp_path / "fs2.mp4"), p),
            VideoDecodeError,
            r"decode error at \d+\.\d+ s \(pts \d+\): Invalid data",
        ),
        "audio.m4a": (
            lambda p: without_video(p, "aac"),
            VideoError,
            r"no video stream \(the file holds: audio #0 aac\)",
        ),
        "no-video.mkv": (
            lambda p: without_video(p, "flac", subtitles=True),
            VideoError,
            r"no video stream \(the file holds: audio #0 flac, subtitle #1 subrip\)",
        ),
        "absurd.avi": (absurd_header, VideoError, "no valid frame size"),
        "ten-hours.mkv": (_ten_hours, VideoTooLargeError, "lasts 36,000 s, over the limit of 21,600 s"),
        "size-switch.mkv": (_size_switch, VideoError, "frame size changes from 64x48 to 128x96 at 0.167 s"),
    }
    for name, (make, error, words) in cases.items():
        path = tmp_path / name
        make(path)
        with pytest.raises(error, match=words) as info:
            _read_everything(path)
        assert str(info.value).startswith(str(path)), name  # the reason names the file
    assert _read_everything(source) == 30  # the untouched original reads fine


def test_limits_are_checked_before_decoding_and_by_the_decoder(video, tmp_path):
    path = video("bframes.mp4")
    with pytest.raises(VideoTooLargeError, match="declares 30 frames, over the limit of 10"):
        probe(path, VideoLimits(max_frames=10))
    with pytest.raises(VideoTooLargeError, match=r"96x64 = 6,144 pixels per frame, over the limit of 6,000"):
        probe(path, VideoLimits(max_pixels=6000))
    with pytest.raises(VideoTooLargeError, match="lasts 1 s, over the limit of 0 s"):
        probe(path, VideoLimits(max_seconds=0.5))
    # Header under-declaring its frames: the index pass counts them again.
    info = dataclasses.replace(probe(path, LIMITS), frames=0)
    with pytest.raises(VideoTooLargeError, match="more than 20 frames"):
        build_index(path, info, VideoLimits(max_frames=20))
    # A stream that switches to a larger size is refused inside the decoder when that size is over the limit.
    switch = _size_switch(tmp_path / "switch.mkv")
    info = probe(switch, LIMITS)
    index = build_index(switch, info, LIMITS)
    with pytest.raises(VideoDecodeError, match="exceeds specified max pixel count 5000"):
        for segment in plan_segments(index, 100):
            list(decode_segment(switch, info, segment, VideoLimits(max_pixels=5000)))


def test_decode_errors_fail_by_default_and_are_concealed_on_request(video, tmp_path):
    path = corrupt(faststart(video("bframes.mp4"), tmp_path / "fs.mp4"), tmp_path / "corrupt.mp4")
    info = probe(path, LIMITS)
    index = build_index(path, info, LIMITS)
    segments = plan_segments(index, 4)
    with pytest.raises(VideoDecodeError, match="decode error at"):
        for segment in segments:
            list(decode_segment(path, info, segment, LIMITS))
    frames = [f for s in segments for f in decode_segment(path, info, s, LIMITS, on_decode_error="conceal")]
    assert [f.pts for f in frames] == list(index.pts)  # every frame, at its own time
    concealed = [i for i, f in enumerate(frames) if f.concealed]
    assert 0 < len(concealed) < len(frames)
    for i in concealed:  # a stand-in repeats the frame before it (or, at a segment's start, the one after)
        neighbour = frames[i - 1] if i > 0 and frames[i - 1].pts < frames[i].pts else frames[i + 1]
        assert np.array_equal(frames[i].rgb, neighbour.rgb)
    clean = {p: a for p, a in decode_all(video("bframes.mp4"))}
    first_bad = concealed[0]
    assert all(np.array_equal(f.rgb, clean[f.pts]) for f in frames[: first_bad - 1])


def test_concealed_frames_keep_the_count_and_times_of_the_output(video, tmp_path):
    path = corrupt(faststart(video("bframes.mp4"), tmp_path / "fs.mp4"), tmp_path / "corrupt.mp4")
    with pytest.raises(VideoDecodeError, match="decode error at"):
        upscale_clip(path, tmp_path / "failed.mp4", double, 2, VideoOptions())
    done = upscale_clip(path, tmp_path / "out.mp4", double, 2, VideoOptions(on_decode_error="conceal"))
    assert done.concealed > 0 and done.result.frames == 30
    assert f"{done.concealed} frame(s) that could not be decoded replaced by the frame before" in done.notes
    assert seconds(tmp_path / "out.mp4") == seconds(video("bframes.mp4"))


def test_a_stream_cut_inside_a_gop_starts_at_its_first_keyframe(video, tmp_path):
    """Frames before the first keyframe reference pictures the file does not have: left out, and said."""
    path = tmp_path / "cut.mkv"
    with av.open(str(video("opengop.mkv"))) as inp, av.open(str(path), "w") as out:
        stream = out.add_stream_from_template(inp.streams.video[0])
        for number, packet in enumerate(p for p in inp.demux(video=0) if p.size):
            if number >= 3:  # the keyframe and two frames after it, in decode order, cut off
                packet.stream = stream
                out.mux(packet)
    info = probe(path, LIMITS)
    index = build_index(path, info, LIMITS)
    assert index.leading > 0 and index.frames + index.leading == 27
    reference = decode_all(path)
    assert [p for p, _ in reference][-index.frames :] == list(index.pts)
    done = upscale_clip(path, tmp_path / "out.mkv", double, 2, VideoOptions(codec="ffv1"))
    assert f"{index.leading} frame(s) before the first keyframe left out: they cannot be decoded" in done.notes
    output = decode_all(tmp_path / "out.mkv")
    assert len(output) == index.frames
    for (_, got), (_, frame) in zip(output, reference[-index.frames :]):
        assert np.array_equal(got, double(frame[None])[0])


# --------------------------------------------------------------------------------------------------------------------
# Segments: decoded apart, they add up to the whole decode


SEGMENT_CASES = [
    "bframes.mp4",  # closed GOPs with B-frames and scene cuts
    "opengop.mkv",  # open GOPs: leading B-frames belong to the previous segment
    "vfr.mp4",  # variable frame rate, first pts 0.25 s (an edit list)
    "vfr.mkv",
    "stream.ts",  # seeks by byte position
    "flash.flv",
    "altref.webm",  # VP9 with hidden alt-ref frames
    "svt.mkv",  # AV1
    "hevc10.mp4",  # 10-bit H.265
    "intra.mkv",  # FFV1, every frame a keyframe: GOPs merged into segments
    "packed.avi",  # MPEG-4 part 2 with B-frames
    "program.mpg",
    "media.wmv",
    "vp8.ogv",
]


@pytest.mark.parametrize("name", SEGMENT_CASES)
def test_segments_decoded_apart_equal_the_whole_decode(video, name):
    path = video(name)
    info = probe(path, LIMITS)
    index = build_index(path, info, LIMITS)
    segments = plan_segments(index, 3)
    assert len(segments) >= 3
    assert all(s.frames >= 3 for s in segments[:-1]) and all(p.frames <= 3 for s in segments for p in s.parts)
    assert [p for s in segments for p in s.pts] == list(index.pts)
    reference = decode_all(path, "rgb48le" if info.bit_depth > 8 else "rgb24")
    got = [f for segment in segments for f in decode_segment(path, info, segment, LIMITS)]
    assert [f.pts for f in got] == [p for p, _ in reference]  # nothing lost or repeated at a boundary
    for frame, (_, expected) in zip(got, reference):
        assert frame.rgb.dtype == expected.dtype and np.array_equal(frame.rgb, expected)


def test_a_seek_that_lands_wrong_falls_back_to_decoding_from_the_start(video, caplog):
    path = video("stream.ts")
    info = probe(path, LIMITS)
    index = build_index(path, info, LIMITS)
    segment = plan_segments(index, 8)[2]
    with av.open(str(path)) as handle:  # the byte position of a packet that is not a keyframe
        wrong = next(p.pos for p in handle.demux(video=0) if p.size and not p.is_keyframe and p.pts > segment.start)
    misplaced = dataclasses.replace(segment, position=wrong)
    got = [(f.pts, f.rgb) for f in decode_segment(path, info, misplaced, LIMITS)]
    expected = [(p, a) for p, a in decode_all(path) if p in set(segment.pts)]
    assert [p for p, _ in got] == [p for p, _ in expected]
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(got, expected))
    assert "decoding segment 2 from the start of the file" in caplog.text


def test_decode_parts_stacks_parts_and_skips_the_ones_done(video):
    path = video("bframes.mp4")
    info = probe(path, LIMITS)
    segment = plan_segments(build_index(path, info, LIMITS), 3, min_segment_frames=8)[1]
    assert len(segment.parts) >= 2
    frames = {f.pts: f.rgb for f in decode_segment(path, info, segment, LIMITS)}
    skip = {segment.parts[0].key}
    parts = list(decode_parts(path, info, segment, LIMITS, skip=skip))
    assert [p.part for p in parts] == [p for p in segment.parts if p.key not in skip]
    for decoded in parts:
        assert decoded.frames.shape == (decoded.part.frames, 64, 96, 3) and decoded.concealed == 0
        assert all(np.array_equal(decoded.frames[i], frames[p]) for i, p in enumerate(decoded.part.pts))
    assert list(decode_parts(path, info, segment, LIMITS, skip=[p.key for p in segment.parts])) == []


def test_decoding_a_long_segment_holds_one_part_at_a_time(tmp_path):
    """Memory does not grow with the video: a 120-frame segment is delivered part by part (numpy allocations are
    traced; a decoder that collected the segment's frames first would hold all of them)."""
    import tracemalloc

    path = tmp_path / "long.mkv"
    write_video(str(path), SampleVideo(frames=120, options={"g": "1000", "preset": "ultrafast"}, audio=None))
    info = probe(path, LIMITS)
    (segment,) = plan_segments(build_index(path, info, LIMITS), 4, min_segment_frames=120)
    part_bytes = 4 * 64 * 96 * 3
    tracemalloc.start()
    try:
        count = sum(decoded.frames.shape[0] for decoded in decode_parts(path, info, segment, LIMITS))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 120
    assert peak < 3 * part_bytes  # the part being filled, the one handed out, a frame; the segment is 30 parts


def test_plan_merges_short_gops_and_bounds_parts():
    index = Index(Fraction(1, 24), tuple(range(20)), tuple(range(20)), tuple(range(20)))  # all intra
    segments = plan_segments(index, 4)
    assert [s.frames for s in segments] == [4, 4, 4, 4, 4]
    assert [(s.start, s.end) for s in segments] == [(0, 4), (4, 8), (8, 12), (12, 16), (16, None)]
    index = Index(Fraction(1, 24), tuple(range(25)), (0, 10, 20), (-1, -1, -1))  # GOPs of 10
    segments = plan_segments(index, 4)
    assert [[p.frames for p in s.parts] for s in segments] == [[4, 4, 2], [4, 4, 2], [4, 1]]
    assert [p.key for p in segments[1].parts] == ["000001-0000", "000001-0001", "000001-0002"]
    assert [s.frames for s in plan_segments(index, 4, min_segment_frames=15)] == [20, 5]
    with pytest.raises(ValueError, match="part_frames"):
        plan_segments(index, 0)


def test_frames_per_part_follows_the_memory_budget_and_the_time_cap(video):
    info = dataclasses.replace(probe(video("bframes.mp4"), LIMITS), width=960, height=540)
    options = VideoOptions()  # 512 MiB, 2 s
    assert frames_per_part(info, 2, options) == 48  # 6.2 MB a 1080p frame: the 2 s cap (24 frames/s)
    assert frames_per_part(info, 4, options) == 21  # 24.9 MB a 4K frame: the budget
    assert frames_per_part(dataclasses.replace(info, bit_depth=10), 4, options) == 10  # 16-bit samples
    assert frames_per_part(info, 4, VideoOptions(part_bytes=1)) == 1


# --------------------------------------------------------------------------------------------------------------------
# The whole path: exact with a lossless codec, metadata and other streams kept


@pytest.mark.parametrize(
    "name,frames_in_part,colour",
    [
        ("bframes.mp4", 4, None),  # B-frames, scene cuts
        ("vfr.mkv", 4, None),  # variable frame rate, first frame at 0.25 s
        ("hevc10.mp4", 5, None),  # 10-bit: the 16-bit path
        ("rot709.mp4", 5, (1, 1)),  # BT.709 matrix, limited range: the tags are used, not swscale's defaults
        ("full601.mkv", 6, (5, 2)),  # full range
    ],
)
def test_ffv1_output_equals_the_stand_in_model_on_every_input_frame(video, tmp_path, name, frames_in_part, colour):
    """FFV1 stores RGB (bgr0 for 8-bit, 16-bit planar RGB above), so the frames read back in RGB are compared bit
    for bit: rgb24 <-> bgr0 is a byte shuffle, rgb48 <-> gbrp16 a plane shuffle. The reference decodes the input
    whole with plain PyAV, converting with the matrix and range the file declares (``colour``; PyAV's defaults,
    BT.601 and limited range, for the untagged ones) and applies the stand-in model to each frame."""
    path = video(name)
    info = probe(path, LIMITS)
    options = VideoOptions(codec="ffv1", part_bytes=part_bytes(info, frames_in_part))
    dest = tmp_path / f"out{path.suffix}"
    done = upscale_clip(path, dest, double, 2, options)
    assert done.segments >= 3 and done.parts > done.segments
    fmt = "rgb48le" if info.bit_depth > 8 else "rgb24"
    reference = decode_all(path, fmt, colour)
    output = decode_all(dest, fmt)
    assert len(output) == len(reference) == info.frames or info.container == "mkv"
    assert len(output) == len(reference)
    for (_, got), (_, frame) in zip(output, reference):
        assert np.array_equal(got, double(frame[None])[0])
    with av.open(str(dest)) as handle:
        assert handle.streams.video[0].codec_context.pix_fmt == ("gbrp16le" if info.bit_depth > 8 else "bgr0")
    assert seconds(dest) == seconds(path)  # every frame at its exact time


def test_h264_output_keeps_timestamps_rotation_colour_audio_and_subtitles(video, tmp_path):
    path = video("rot709.mp4")
    dest = tmp_path / "out.mp4"
    done = upscale_clip(path, dest, double, 2, VideoOptions(part_bytes=part_bytes(probe(path, LIMITS), 5)))
    assert done.output.same_family and done.notes == ()
    assert done.result.streams == ("video #0 h264 256x192", "audio #1 aac copied", "subtitle #2 mov_text copied")
    before, after = probe(path, LIMITS), probe(dest, LIMITS)
    assert (after.width, after.height, after.codec) == (256, 192, "h264")
    for field in ("frames", "time_base", "frame_rate", "colour", "rotation", "display_matrix", "pix_fmt"):
        assert getattr(after, field) == getattr(before, field), field
    assert seconds(dest) == seconds(path)
    assert packets(dest, "audio") == packets(path, "audio")  # bit-identical, same timestamps
    assert packets(dest, "subtitles") == packets(path, "subtitles")
    reference = decode_all(path, colour=(1, 1))
    output = decode_all(dest, colour=(1, 1))
    assert min(psnr(got, double(frame[None])[0]) for (_, got), (_, frame) in zip(output, reference)) > 35


def test_full_range_and_ten_bit_are_kept(video, tmp_path):
    path = video("full601.mkv")
    dest = tmp_path / "full.mkv"
    upscale_clip(path, dest, double, 2, VideoOptions())
    after = probe(dest, LIMITS)
    assert after.colour == FULL_601 and after.rotation == -90
    assert packets(dest, "audio") == packets(path, "audio")
    reference = decode_all(path, colour=(5, 2))
    output = decode_all(dest, colour=(5, 2))
    assert min(psnr(got, double(frame[None])[0]) for (_, got), (_, frame) in zip(output, reference)) > 35
    for name, codec in (("x264-10bit.mkv", "h264"), ("hevc10.mp4", "h265")):
        dest = tmp_path / f"ten-{codec}{Path(name).suffix}"
        done = upscale_clip(video(name), dest, double, 2, VideoOptions(codec=codec))
        assert done.notes == ()
        assert probe(dest, LIMITS).pix_fmt == "yuv420p10le"
        reference = decode_all(video(name), "rgb48le", colour=(1, 1) if codec == "h264" else None)
        output = decode_all(dest, "rgb48le", colour=(1, 1) if codec == "h264" else None)
        assert min(psnr(a, double(f[None])[0], 65535.0) for (_, a), (_, f) in zip(output, reference)) > 35


@pytest.mark.parametrize("codec", ["h265", "vp9", "av1"])
def test_every_codec_joins_without_re_encoding(video, tmp_path, codec):
    path = video("opengop.mkv")
    dest = tmp_path / f"{codec}.mkv"
    done = upscale_clip(path, dest, double, 2, VideoOptions(codec=codec, part_bytes=part_bytes(probe(path, LIMITS), 4)))
    assert done.parts >= 8
    assert probe(dest, LIMITS).codec == {"h265": "hevc"}.get(codec, codec)
    assert seconds(dest) == seconds(path)
    assert packets(dest, "audio") == packets(path, "audio")
    assert len(decode_all(dest)) == 30


def test_streams_the_output_container_cannot_hold_are_converted_and_said(video, tmp_path):
    # MP4 (AAC, mov_text) written as WebM: the audio is re-encoded to Opus, the subtitles become WebVTT.
    path = video("bframes.mp4")
    dest = tmp_path / "out.webm"
    done = upscale_clip(path, dest, double, 2, VideoOptions(codec="vp9", container="webm"))
    assert done.notes == (
        "audio #1 aac re-encoded as libopus: WebM cannot hold aac",
        "subtitle #2 mov_text converted to webvtt (text and timing kept, styling dropped): WebM cannot hold mov_text",
    )
    assert cues(dest) == cues(path)
    with av.open(str(dest)) as handle:
        assert [s.codec_context.codec.canonical_name for s in handle.streams] == ["vp9", "opus", "webvtt"]
        audio = handle.streams.audio[0]
        last = max(p.pts + p.duration for p in handle.demux(audio) if p.size)
        assert float(last * audio.time_base) == pytest.approx(30 / 24, abs=0.05)
    assert [round(float(t), 3) for t in seconds(dest)] == [round(float(t), 3) for t in seconds(path)]  # 1 ms ticks
    # Matroska (SubRip) written as MP4: the subtitles become mov_text; Opus goes in MP4 as it is.
    path = video("opengop.mkv")
    done = upscale_clip(path, tmp_path / "out.mp4", double, 2, VideoOptions(container="mp4"))
    assert cues(tmp_path / "out.mp4") == cues(path)
    assert timed_packets(tmp_path / "out.mp4", "audio") == timed_packets(path, "audio")
    assert done.result.streams[1:] == ("audio #1 opus copied", "subtitle #2 subrip converted to mov_text")


def test_avi_is_written_as_matroska(video, tmp_path):
    path = video("packed.avi")
    done = upscale_clip(path, tmp_path / "out.mkv", double, 2, VideoOptions())
    assert done.output.format.name == "mkv" and not done.output.same_family
    assert done.notes == (
        "an AVI video written as Matroska (.mkv): AVI stores no timestamps, so frames would lose their times",
    )
    assert timed_packets(tmp_path / "out.mkv", "audio") == timed_packets(path, "audio")
    assert [round(float(t), 3) for t in seconds(tmp_path / "out.mkv")] == [round(float(t), 3) for t in seconds(path)]
    assert choose_output("avi", "ffv1").format.name == "mkv"


def test_join_refuses_parts_that_do_not_belong_together(video, tmp_path):
    path = video("bframes.mp4")
    info = probe(path, LIMITS)
    index = build_index(path, info, LIMITS)
    segments = plan_segments(index, 8)
    assert len(segments) == 3
    fast = encode_settings(info, VideoOptions(preset="ultrafast"), 2)
    slow = encode_settings(info, VideoOptions(preset="veryslow"), 2)
    parts: dict[tuple[str, str], Path] = {}  # (preset, part key) -> file
    for settings in (fast, slow):
        for segment in segments:
            for decoded in decode_parts(path, info, segment, LIMITS):
                dest = tmp_path / f"{settings.preset}-{decoded.part.key}.nut"
                encode_part(str(dest), double(decoded.frames), decoded.part.pts, settings)
                parts[settings.preset, decoded.part.key] = dest
    keys = [part.key for segment in segments for part in segment.parts]
    output = choose_output(info.container, "h264").format
    arguments = dict(source=path, info=info, settings=slow, output=output, limits=LIMITS, expected_pts=index.pts)
    mixed = [parts["veryslow" if k != keys[1] else "ultrafast", k] for k in keys]
    with pytest.raises(JoinError, match="part 1 was encoded with other codec parameters than part 0"):
        join(mixed, tmp_path / "mixed.mp4", **arguments)
    gap = [parts["veryslow", k] for k in keys if not k.startswith("000001-")]  # segment 1 left out
    first = float(segments[1].start * info.time_base)
    missing = rf"{segments[1].frames} frame\(s\) fewer than the input, first at {first:.3f} s"
    with pytest.raises(JoinError, match=missing):
        join(gap, tmp_path / "missing.mp4", **arguments)
    with pytest.raises(JoinError, match="part 1 overlaps or precedes part 0"):
        join([gap[0], gap[0]], tmp_path / "twice.mp4", **arguments)
    assert join(gap, tmp_path / "partial.mp4", **{**arguments, "expected_pts": None}).frames == 30 - segments[1].frames
    done = join([parts["veryslow", k] for k in keys], tmp_path / "whole.mp4", **arguments)
    assert done.frames == 30 and seconds(tmp_path / "whole.mp4") == seconds(path)


def test_encode_part_writes_one_closed_gop_with_the_given_timestamps(video, tmp_path):
    info = probe(video("vfr.mp4"), LIMITS)
    settings = encode_settings(info, VideoOptions(), 2)
    frames = np.stack([double(f[None])[0] for _, f in decode_all(video("vfr.mp4"))[:7]])
    pts = list(vfr_pts(7))
    memory = io.BytesIO()
    done = encode_part(memory, frames, pts, settings)
    assert done.frames == 7 and done.size == len(memory.getvalue()) and done.reorder_depth >= 1
    memory.seek(0)
    with av.open(memory, format="nut") as handle:
        stream = handle.streams.video[0]
        written = [p for p in handle.demux(stream) if p.size]
        assert written[0].is_keyframe
        assert sorted(p.pts * stream.time_base for p in written) == [p * info.time_base for p in pts]
    with pytest.raises(ValueError, match="increasing pts"):
        encode_part(io.BytesIO(), frames, pts[::-1], settings)
    with pytest.raises(ValueError, match=r"expects \(128, 192, 3\) uint8 frames"):
        encode_part(io.BytesIO(), frames[:, :64], pts, settings)


# --------------------------------------------------------------------------------------------------------------------
# Options, output rules, rows


@pytest.mark.parametrize(
    "fields,words",
    [
        (dict(codec="mpeg2"), "codec: must be one of"),
        (dict(crf=52), r"crf: h264 takes a crf in \[0, 51\], got 52"),
        (dict(codec="av1", crf=0), r"crf: av1 takes a crf in \[1, 63\]"),
        (dict(codec="ffv1", crf=10), "crf: ffv1 is lossless and takes no crf"),
        (dict(codec="ffv1", preset="fast"), "preset: ffv1 takes no preset"),
        (dict(preset="turbo"), "preset: h264 presets are"),
        (dict(codec="vp9", preset="9"), "preset: vp9 presets are"),
        (dict(container="avi"), "container: must be one of"),
        (dict(container="webm"), "container: WebM cannot hold h264 video; it holds av1, vp9"),
        (dict(codec="ffv1", container="mov"), "container: QuickTime cannot hold ffv1 video"),
        (dict(on_decode_error="skip"), r"on_decode_error: must be one of \['fail', 'conceal'\]"),
        (dict(part_bytes=0), "part_bytes: must be >= 1"),
        (dict(part_seconds=float("inf")), "part_seconds: must be a positive number"),
        (dict(limits=dict(max_frames=0)), "max_frames: must be >= 1"),
    ],
)
def test_video_options_are_validated(fields, words):
    if "limits" in fields:
        with pytest.raises(ConfigError, match=words):
            VideoLimits(**fields["limits"])
        return
    with pytest.raises(ConfigError, match=words):
        VideoOptions(**fields)


def test_video_options_defaults():
    options = VideoOptions()
    assert (options.codec, options.effective_crf, options.effective_preset) == ("h264", 18, "medium")
    assert (options.container, options.on_decode_error) == ("same", "fail")
    assert VideoOptions(codec="ffv1").effective_crf is None
    assert VideoOptions(codec="vp9", crf=30, preset="8").effective_crf == 30


@pytest.mark.parametrize(
    "container,codec,requested,output,same,note",
    [
        ("mp4", "h264", "same", "mp4", True, None),
        ("3gp", "h265", "same", "mp4", True, None),
        ("mov", "h265", "same", "mov", True, None),
        ("mov", "av1", "same", "mkv", False, "a QuickTime video written as Matroska (.mkv): QuickTime cannot hold"),
        ("webm", "vp9", "same", "webm", True, None),
        ("webm", "h264", "same", "mkv", False, "a WebM video written as Matroska (.mkv): WebM cannot hold h264"),
        ("ts", "h264", "same", "ts", True, None),
        ("ts", "ffv1", "same", "mkv", False, "MPEG-TS cannot hold ffv1"),
        ("avi", "ffv1", "same", "mkv", False, "AVI stores no timestamps"),
        ("flv", "h264", "same", "mkv", False, "an FLV video written as Matroska (.mkv): this library writes no such"),
        ("wmv", "vp9", "webm", "webm", False, None),
        ("mkv", "h264", "mp4", "mp4", False, None),
    ],
)
def test_output_container_rules(container, codec, requested, output, same, note):
    choice = choose_output(container, codec, requested)
    assert (choice.format.name, choice.same_family) == (output, same)
    assert (choice.note is None) if note is None else (note in choice.note)


def test_rows_round_trip_through_json(video):
    path = video("rot709.mp4")
    info = probe(path, LIMITS)
    segments = plan_segments(build_index(path, info, LIMITS), 5)
    settings = encode_settings(info, VideoOptions(codec="h265"), 2)
    for record, cls in [(info, VideoInfo), (segments[1], Segment), (settings, EncodeSettings)]:
        row = json.loads(json.dumps(to_dict(record)))
        assert from_dict(cls, row) == record
    with pytest.raises(ValueError, match="no field"):
        from_dict(Segment, {**to_dict(segments[0]), "extra": 1})


def test_encode_settings_keep_depth_and_chroma_where_the_encoder_can(video):
    ten = probe(video("hevc10.mp4"), LIMITS)
    assert encode_settings(ten, VideoOptions(codec="h264"), 2).pix_fmt == "yuv420p10le"
    assert encode_settings(ten, VideoOptions(codec="av1"), 2).pix_fmt == "yuv420p10le"
    vp9 = encode_settings(ten, VideoOptions(codec="vp9"), 2)
    assert vp9.pix_fmt == "yuv420p"
    assert vp9.notes == ("10-bit video written as 8-bit: the vp9 encoder here takes no more",)
    assert encode_settings(ten, VideoOptions(codec="ffv1"), 2).pix_fmt == "gbrp16le"
    full = probe(video("full601.mkv"), LIMITS)
    settings = encode_settings(full, VideoOptions(codec="ffv1"), 3)
    assert (settings.pix_fmt, settings.colour, settings.width) == ("bgr0", Colour(6, 6, 0, 2), 288)
    chroma444 = dataclasses.replace(full, pix_fmt="yuv444p")
    assert encode_settings(chroma444, VideoOptions(), 2).pix_fmt == "yuv444p"
    av1 = encode_settings(chroma444, VideoOptions(codec="av1"), 2)
    assert av1.pix_fmt == "yuv420p" and "4:4:4 chroma written as 4:2:0" in av1.notes[0]
    untagged_hd = dataclasses.replace(full, height=720, colour=Colour())
    assert encode_settings(untagged_hd, VideoOptions(), 2).colour == Colour(2, 2, 1, 1)  # BT.709 assumed, tagged


def test_untagged_hd_video_is_read_as_bt709(tmp_path):
    """An HD stream that does not say its matrix is BT.709, as players take it (swscale alone would use BT.601)."""
    path = tmp_path / "hd.mp4"
    write_video(str(path), SampleVideo(frames=2, width=1280, height=720, audio=None, options={"preset": "ultrafast"}))
    info = probe(path, LIMITS)
    assert info.colour.matrix == 2 and info.assumed_colour == Colour(2, 2, 1, 1)
    segments = plan_segments(build_index(path, info, LIMITS), 4)
    got = [f.rgb for s in segments for f in decode_segment(path, info, s, LIMITS)]
    bt709 = decode_all(path, colour=(1, 1))
    assert all(np.array_equal(a, b) for a, (_, b) in zip(got, bt709))
    assert not np.array_equal(got[0], decode_all(path)[0][1])  # the BT.601 reading differs


def test_container_tables_name_formats_ffmpeg_has():
    for container in CONTAINERS.values():
        assert container.name and container.description.startswith(("a ", "an "))
        if container.demuxer is not None:
            assert av.format.ContainerFormat(container.demuxer, "r") is not None
    for output in OUTPUTS.values():
        assert av.format.ContainerFormat(output.muxer, "w") is not None
        assert CONTAINERS[output.name].demuxer is not None  # how the written file is read back
        assert output.content_type.startswith("video/") and output.extension == f".{output.name}"
        assert output.video <= set(CODECS)


def test_clip_upscale_refuses_a_model_of_the_wrong_shape(video, tmp_path):
    with pytest.raises(ValueError, match=r"upscale returned \(4, 64, 96, 3\) uint8 for \(4, 128, 192, 3\) uint8"):
        upscale_clip(video("bframes.mp4"), tmp_path / "x.mp4", lambda f: f, 2, VideoOptions(part_seconds=4 / 24))
    assert not os.path.exists(tmp_path / "x.mp4")
