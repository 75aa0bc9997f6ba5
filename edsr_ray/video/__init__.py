"""Video files in and out: recognising, probing, cutting, decoding, encoding and joining, with PyAV alone.

No Ray and no torch here: the batch job and the Serve deployment call these functions from their stages. The flow of
one video, and which function does each step:

1. :func:`sniff_container` (first bytes) -> :func:`probe` (bounded: limits checked from the headers) ->
   :class:`VideoInfo`.
2. :func:`build_index` (every frame's pts and the keyframes, no decoding) -> :class:`Index`;
   :func:`frames_per_part` and :func:`plan_segments` -> :class:`Segment` s, each cut into :class:`Part` s.
3. Per segment, anywhere: :func:`decode_parts` (or :func:`decode_segment`, frame by frame) -> RGB arrays
   (uint8, or uint16 for sources deeper than 8 bits) with their pts.
4. The model upscales each part's frames; :func:`encode_part` writes them, with the same pts, as one closed GOP
   (:func:`encode_settings` once per video, so all parts match).
5. :func:`choose_output` picks the output container; :func:`join` puts the parts and the input's other streams
   together without re-encoding, into a local file the caller publishes atomically.

:func:`upscale_clip` runs these steps in one process (short clips, tests). Options and limits:
:class:`VideoOptions`, :class:`VideoLimits`. Rows between stages: :func:`to_dict` / :func:`from_dict` of these
dataclasses. Errors: :class:`VideoError` and its subclasses, each naming the file and the reason.
"""

from edsr_ray.video.clip import ClipResult, upscale_clip
from edsr_ray.video.containers import (
    CONTAINERS,
    HEAD_BYTES,
    OUTPUTS,
    VIDEO_SUFFIXES,
    Container,
    OutputChoice,
    OutputFormat,
    choose_output,
    sniff_container,
)
from edsr_ray.video.encode import EncodedPart, EncodeSettings, encode_part, encode_settings
from edsr_ray.video.errors import JoinError, VideoDecodeError, VideoError, VideoTooLargeError
from edsr_ray.video.frames import Colour
from edsr_ray.video.join import JoinResult, join
from edsr_ray.video.options import CODECS, VideoLimits, VideoOptions
from edsr_ray.video.probe import Source, VideoInfo, container_of, probe
from edsr_ray.video.records import from_dict, to_dict
from edsr_ray.video.segments import (
    DecodedFrame,
    DecodedPart,
    Index,
    Part,
    Segment,
    build_index,
    decode_parts,
    decode_segment,
    frames_per_part,
    plan_segments,
)

__all__ = [
    "CODECS",
    "CONTAINERS",
    "HEAD_BYTES",
    "OUTPUTS",
    "VIDEO_SUFFIXES",
    "ClipResult",
    "Colour",
    "Container",
    "DecodedFrame",
    "DecodedPart",
    "EncodeSettings",
    "EncodedPart",
    "Index",
    "JoinError",
    "JoinResult",
    "OutputChoice",
    "OutputFormat",
    "Part",
    "Segment",
    "Source",
    "VideoDecodeError",
    "VideoError",
    "VideoInfo",
    "VideoLimits",
    "VideoOptions",
    "VideoTooLargeError",
    "build_index",
    "choose_output",
    "container_of",
    "decode_parts",
    "decode_segment",
    "encode_part",
    "encode_settings",
    "frames_per_part",
    "from_dict",
    "join",
    "plan_segments",
    "probe",
    "sniff_container",
    "to_dict",
    "upscale_clip",
]
