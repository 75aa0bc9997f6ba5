"""Test videos that are broken on purpose, and readers of what a video holds, shared by the video library's tests
and the batch job's."""

from __future__ import annotations

import hashlib
import random
import struct
from fractions import Fraction
from pathlib import Path

import av

from edsr_ray.video.samples import write_tone


def packets(path, kind: str) -> list[tuple[int | None, str]]:
    """(pts, sha1 of the payload) of every packet of the first stream of ``kind`` ("audio", "subtitles")."""
    with av.open(str(path)) as handle:
        streams = getattr(handle.streams, kind)
        if not streams:
            return []
        return [(p.pts, hashlib.sha1(bytes(p)).hexdigest()) for p in handle.demux(streams[0]) if p.size]


def faststart(src: Path, dest: Path) -> Path:
    """``src`` remuxed with its index (moov) first, as streaming-ready MP4 files are."""
    with av.open(str(src)) as inp, av.open(str(dest), "w", container_options={"movflags": "faststart"}) as out:
        streams = {s.index: out.add_stream_from_template(s) for s in inp.streams}
        for packet in inp.demux():
            if packet.size:
                packet.stream = streams[packet.stream.index]
                out.mux(packet)
    return dest


def corrupt(src: Path, dest: Path) -> Path:
    """``src`` with bytes overwritten in the middle of its frames."""
    data = bytearray(src.read_bytes())
    rng = random.Random(1)
    for offset in range(len(data) // 2, len(data) // 2 + 1500, 7):
        data[offset] = rng.randrange(256)
    dest.write_bytes(bytes(data))
    return dest


def without_video(dest: Path, audio: str, subtitles: bool = False) -> Path:
    """A file of one second of ``audio`` (and a subtitle stream): no video."""
    with av.open(str(dest), "w", format="mp4" if dest.suffix == ".m4a" else None) as out:
        stream = out.add_stream(audio, rate=48000)
        stream.layout = "stereo"
        if subtitles:
            out.add_mux_stream("subrip").time_base = Fraction(1, 1000)
        out.start_encoding()
        write_tone(out, stream, 1.0)
    return dest


def absurd_header(dest: Path) -> Path:
    """An uncompressed AVI whose headers claim 100000 x 100000 pixels per frame."""
    with av.open(str(dest), "w") as out:
        stream = out.add_stream("rawvideo", rate=24)
        stream.width, stream.height, stream.pix_fmt = 16, 8, "bgr24"
        for i in range(3):
            frame = av.VideoFrame(16, 8, "bgr24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    data = bytearray(dest.read_bytes())
    bitmap = data.index(b"strf") + 8  # BITMAPINFOHEADER: size, width, height
    data[bitmap + 4 : bitmap + 12] = struct.pack("<ii", 100_000, 100_000)
    main = data.index(b"avih") + 8  # MainAVIHeader: ..., width, height at bytes 32-40
    data[main + 32 : main + 40] = struct.pack("<II", 100_000, 100_000)
    dest.write_bytes(bytes(data))
    return dest
