"""How videos are written and what a video may cost: :class:`VideoOptions` (codec, quality, container, decode-error
policy, part size) and :class:`VideoLimits`, both frozen and validated on construction, plus :data:`CODECS`, the
facts about each output codec that validation and encoding share.

Defaults: H.264 (x264 ``medium``) at CRF 18, which is visually lossless for most content; the input's container;
a decode error fails the video (``on_decode_error="fail"``, see :class:`VideoOptions`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from edsr_ray.codecs import MAX_PIXELS_DEFAULT
from edsr_ray.errors import require as _require
from edsr_ray.video.containers import OUTPUTS, REQUESTABLE

_X26X_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")


@dataclass(frozen=True)
class Codec:
    """One output codec: its FFmpeg encoder, quality scale (CRF: lower is better) and speed presets.

    ``max_bit_depth`` is what the encoder in PyAV's wheels takes (its libvpx is 8-bit only); ``rgb`` says frames are
    stored as RGB, exactly as the model made them (FFV1, the lossless choice), instead of converted to YUV.
    """

    name: str
    encoder: str
    crf_range: tuple[int, int] | None
    default_crf: int | None
    presets: tuple[str, ...]
    default_preset: str | None
    max_bit_depth: int
    rgb: bool = False


CODECS: dict[str, Codec] = {
    c.name: c
    for c in (
        Codec("h264", "libx264", (0, 51), 18, _X26X_PRESETS, "medium", 10),
        Codec("h265", "libx265", (0, 51), 20, _X26X_PRESETS, "medium", 12),
        # VP9 presets are libvpx's cpu-used: 0-5 with the "good" deadline, 6-8 with "realtime" (fastest).
        Codec("vp9", "libvpx-vp9", (0, 63), 24, tuple(str(i) for i in range(9)), "4", 8),
        # SVT-AV1 presets: 0 (slowest, best) to 13 (fastest).
        Codec("av1", "libsvtav1", (1, 63), 28, tuple(str(i) for i in range(14)), "8", 10),
        Codec("ffv1", "ffv1", None, None, (), None, 16, rgb=True),
    )
}
DECODE_ERROR_POLICIES = ("fail", "conceal")


@dataclass(frozen=True)
class VideoLimits:
    """Bounds on one input video, checked from its headers before any frame is decoded and again while reading.

    ``max_pixels`` applies to every frame, as the images' limit does to an image (a stream that switches to a larger
    size mid-way is refused by the decoder itself); ``max_frames`` and ``max_seconds`` bound the whole video.
    """

    max_pixels: int = MAX_PIXELS_DEFAULT
    max_frames: int = 2_000_000  # 9 h at 60 frames/s
    max_seconds: float = 6 * 3600.0

    def __post_init__(self) -> None:
        _require(self.max_pixels >= 1, "max_pixels", f"must be >= 1, got {self.max_pixels}")
        _require(self.max_frames >= 1, "max_frames", f"must be >= 1, got {self.max_frames}")
        _require(
            math.isfinite(self.max_seconds) and self.max_seconds > 0,
            "max_seconds",
            f"must be a positive number, got {self.max_seconds}",
        )


@dataclass(frozen=True)
class VideoOptions:
    """How upscaled videos are written.

    * ``codec``: h264 | h265 | vp9 | av1 | ffv1 (lossless: the model's RGB output stored exactly).
    * ``crf``: constant-quality level of the codec (None: its default, :data:`CODECS`); ffv1 takes none.
    * ``preset``: the encoder's speed/size trade-off (None: its default); ffv1 takes none.
    * ``container``: "same" (the input's, where it can hold the codec; else Matroska, said in the notes) or one of
      mp4 | mkv | webm | mov, which must hold the codec.
    * ``on_decode_error``: "fail" (default: the video fails, naming the time of the error; output that would have
      frozen or skipped frames is never written) or "conceal" (the decoder resynchronises at the next keyframe and
      each frame it could not deliver is replaced by the previous good one, so frame count and timestamps stay; the
      number of concealed frames is reported).
    * ``part_bytes``, ``part_seconds``: a video is encoded in parts of at most this many bytes of upscaled frames
      and this many seconds, each part one closed group of pictures (:func:`~edsr_ray.video.segments.frames_per_part`).
    * ``limits``: :class:`VideoLimits`.
    """

    codec: str = "h264"
    crf: int | None = None
    preset: str | None = None
    container: str = "same"
    on_decode_error: str = "fail"
    part_bytes: int = 512 << 20
    part_seconds: float = 2.0
    limits: VideoLimits = field(default_factory=VideoLimits)

    def __post_init__(self) -> None:
        _require(self.codec in CODECS, "codec", f"must be one of {list(CODECS)}, got {self.codec!r}")
        codec = CODECS[self.codec]
        if codec.crf_range is None:
            _require(self.crf is None, "crf", f"{self.codec} is lossless and takes no crf, got {self.crf}")
            _require(self.preset is None, "preset", f"{self.codec} takes no preset, got {self.preset!r}")
        else:
            low, high = codec.crf_range
            _require(
                self.crf is None or low <= self.crf <= high,
                "crf",
                f"{self.codec} takes a crf in [{low}, {high}], got {self.crf}",
            )
            _require(
                self.preset is None or self.preset in codec.presets,
                "preset",
                f"{self.codec} presets are {list(codec.presets)}, got {self.preset!r}",
            )
        _require(
            self.container in REQUESTABLE, "container", f"must be one of {list(REQUESTABLE)}, got {self.container!r}"
        )
        if self.container != "same":
            refused = OUTPUTS[self.container].refuses(self.codec)
            _require(refused is None, "container", str(refused))
        _require(
            self.on_decode_error in DECODE_ERROR_POLICIES,
            "on_decode_error",
            f"must be one of {list(DECODE_ERROR_POLICIES)}, got {self.on_decode_error!r}",
        )
        _require(self.part_bytes >= 1, "part_bytes", f"must be >= 1, got {self.part_bytes}")
        _require(
            math.isfinite(self.part_seconds) and self.part_seconds > 0,
            "part_seconds",
            f"must be a positive number, got {self.part_seconds}",
        )

    @property
    def effective_crf(self) -> int | None:
        """The CRF the encoder gets: the one asked for, else the codec's default (None for ffv1)."""
        return self.crf if self.crf is not None else CODECS[self.codec].default_crf

    @property
    def effective_preset(self) -> str | None:
        """The preset the encoder gets: the one asked for, else the codec's default (None for ffv1)."""
        return self.preset if self.preset is not None else CODECS[self.codec].default_preset
