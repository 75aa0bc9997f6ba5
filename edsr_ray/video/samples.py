"""Small synthetic videos for tests, benchmarks and demos: a window panning across the bundled sample photos
(:mod:`edsr_ray.samples`), so encoders see real texture and motion, with an optional tone as audio and one text cue
a second as subtitles. Any codec, container, time base, timestamps (variable frame rate), rotation, colour
description and bit depth PyAV can write.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

import av
import av.audio.fifo
import numpy as np

from edsr_ray.samples import photos
from edsr_ray.video.encode import quiet_encoders
from edsr_ray.video.frames import Colour, from_rgb

AUDIO_RATE = 48_000


@dataclass(frozen=True)
class SampleVideo:
    """What :func:`write_video` writes. ``pts`` overrides the regular timestamps ``i / rate`` (in ``time_base``);
    ``cut_every`` changes the photo every so many frames (a scene cut; 0: never); ``bit_depth`` 10 makes frames with
    content below the 8-bit grid, encoded in a 10-bit ``pix_fmt``; ``audio`` is an audio encoder name,
    ``subtitles`` a text subtitle codec (mov_text, subrip, webvtt, ass)."""

    codec: str = "libx264"
    frames: int = 24
    width: int = 96
    height: int = 64
    rate: Fraction = Fraction(24)
    time_base: Fraction = Fraction(1, 12288)
    pts: tuple[int, ...] | None = None
    pix_fmt: str = "yuv420p"
    options: dict[str, str] = field(default_factory=dict)
    format: str | None = None
    audio: str | None = "aac"
    subtitles: str | None = None
    rotation: float | None = None
    colour: Colour | None = None
    cut_every: int = 0
    bit_depth: int = 8

    def timestamps(self) -> list[int]:
        if self.pts is not None:
            return list(self.pts)
        ticks = 1 / (self.rate * self.time_base)
        return [round(i * ticks) for i in range(self.frames)]


def moving_crops(n: int, width: int, height: int, *, cut_every: int = 0, seed: int = 0) -> list[np.ndarray]:
    """``n`` (height, width, 3) uint8 frames: a window moving across a sample photo, a new photo every ``cut_every``
    frames. Photos smaller than the window are enlarged first."""
    from PIL import Image

    pictures = list(photos().values())
    frames = []
    for i in range(n):
        picture = pictures[(seed + (i // cut_every if cut_every else 0)) % len(pictures)]
        if picture.shape[0] < height + 16 or picture.shape[1] < width + 16:
            factor = max((height + 16) / picture.shape[0], (width + 16) / picture.shape[1])
            size = (int(picture.shape[1] * factor) + 1, int(picture.shape[0] * factor) + 1)
            picture = np.asarray(Image.fromarray(picture).resize(size, Image.Resampling.BICUBIC))
        # From the middle of the photo (their borders can be flat: the retina's is black), moving right and down.
        span_x, span_y = picture.shape[1] - width, picture.shape[0] - height
        x = (span_x // 2 + 3 * i) % span_x
        y = (span_y // 2 + 2 * i) % span_y
        frames.append(np.ascontiguousarray(picture[y : y + height, x : x + width]))
    return frames


def write_video(path: str, spec: SampleVideo) -> list[int]:
    """Write ``spec`` to ``path`` (the container from ``spec.format`` or the extension); returns the frames' pts."""
    quiet_encoders()
    pts = spec.timestamps()
    frames = moving_crops(len(pts), spec.width, spec.height, cut_every=spec.cut_every)
    with av.open(path, "w", format=spec.format) as out:
        video = out.add_stream(spec.codec, rate=spec.rate, options=dict(spec.options))
        video.width, video.height, video.pix_fmt = spec.width, spec.height, spec.pix_fmt
        video.time_base = video.codec_context.time_base = spec.time_base
        if spec.colour is not None:
            spec.colour.tag(video.codec_context)
        if spec.rotation is not None:
            video.set_display_rotation(spec.rotation)
        audio = out.add_stream(spec.audio, rate=AUDIO_RATE) if spec.audio else None
        if audio is not None:
            audio.layout = "stereo"
        text = out.add_mux_stream(spec.subtitles) if spec.subtitles else None
        if text is not None:
            text.time_base = Fraction(1, 1000)
        out.start_encoding()
        for p, rgb in zip(pts, frames):
            frame = _frame(rgb, spec)
            frame.pts, frame.time_base = p, spec.time_base
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
        step = pts[-1] - pts[-2] if len(pts) > 1 else round(1 / (spec.rate * spec.time_base))
        seconds = float((pts[-1] + step) * spec.time_base)
        if audio is not None:
            write_tone(out, audio, seconds)
        if text is not None:
            _write_cues(out, text, spec.subtitles, seconds)
    return pts


def _frame(rgb: np.ndarray, spec: SampleVideo) -> av.VideoFrame:
    if spec.bit_depth > 8:
        # 16-bit RGB with low bits that differ from pixel to pixel: content an 8-bit pipeline would lose.
        fine = (np.arange(rgb.size, dtype=np.uint16).reshape(rgb.shape) * 37) % 256
        array = rgb.astype(np.uint16) * 256 + fine
    else:
        array = rgb
    return from_rgb(array, spec.pix_fmt, (spec.colour or Colour()).assumed(spec.height))


def tone(seconds: float, rate: int = AUDIO_RATE) -> np.ndarray:
    """A stereo test tone, (2, samples) float32 planar: 440 Hz and a quieter 1234 Hz, the right channel at half."""
    t = np.arange(int(seconds * rate)) / rate
    mono = (0.2 * np.sin(2 * np.pi * 440 * t) + 0.05 * np.sin(2 * np.pi * 1234 * t)).astype(np.float32)
    return np.stack([mono, mono * 0.5])


def write_tone(out: av.container.OutputContainer, stream: av.AudioStream, seconds: float) -> None:
    """Encode :func:`tone` into the audio ``stream`` of ``out``, in frames of the encoder's size, and flush it."""
    ctx = stream.codec_context
    resampler = av.AudioResampler(format=ctx.format.name, layout="stereo", rate=ctx.sample_rate)
    source = av.AudioFrame.from_ndarray(tone(seconds), format="fltp", layout="stereo")
    source.sample_rate, source.pts, source.time_base = AUDIO_RATE, 0, Fraction(1, AUDIO_RATE)
    fifo = av.audio.fifo.AudioFifo()
    for frame in [*resampler.resample(source), *resampler.resample(None)]:
        fifo.write(frame)
    size = ctx.frame_size or 1024
    while fifo.samples:
        out.mux(stream.encode(fifo.read(min(size, fifo.samples))))
    out.mux(stream.encode(None))


def _write_cues(out: av.container.OutputContainer, stream: av.stream.Stream, codec: str, seconds: float) -> None:
    """One cue a second, 0.8 s long, muxed as ready packets (PyAV encodes no subtitles from text)."""
    for i in range(max(1, int(seconds))):
        text = f"cue {i}: a moving crop"
        if codec == "mov_text":
            data = len(text.encode()).to_bytes(2, "big") + text.encode()
        elif codec == "ass":
            data = f"{i},0,Default,,0,0,0,,{text}".encode()
        else:
            data = text.encode()
        packet = av.Packet(data)
        packet.pts = packet.dts = i * 1000
        packet.duration = 800
        packet.time_base = Fraction(1, 1000)
        packet.stream = stream
        out.mux(packet)
