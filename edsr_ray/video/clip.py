"""The whole video path in one process, for short clips (a Serve request) and as the reference order of the steps.

The batch job runs the same steps as pipeline stages spread over a cluster (segments decoded in parallel, parts
encoded apart, one join); here they run one after the other and the encoded parts stay in memory, so this is for
videos whose encoded output fits in memory comfortably.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from edsr_ray.video.containers import OutputChoice, choose_output
from edsr_ray.video.encode import encode_part, encode_settings
from edsr_ray.video.join import JoinResult, join
from edsr_ray.video.options import VideoOptions
from edsr_ray.video.probe import Source, VideoInfo, probe, source_name
from edsr_ray.video.segments import build_index, decode_parts, frames_per_part, plan_segments

Upscale = Callable[[np.ndarray], np.ndarray]
"""(K, H, W, 3) frames -> (K, H*s, W*s, 3) frames of the same dtype (uint8, or uint16 for deeper sources)."""


@dataclass(frozen=True)
class ClipResult:
    """What :func:`upscale_clip` did: the input's :class:`VideoInfo`, the output container chosen, the join's
    result, how the video was cut (``segments``, ``parts``), how many frames were concealed and how many came
    before the first keyframe (``leading``, left out)."""

    info: VideoInfo
    output: OutputChoice
    result: JoinResult
    segments: int
    parts: int
    concealed: int
    leading: int = 0

    @property
    def notes(self) -> tuple[str, ...]:
        """Everything of the input the output does not keep as it was, for a manifest."""
        notes = [self.output.note] if self.output.note else []
        if self.leading:
            notes.append(f"{self.leading} frame(s) before the first keyframe left out: they cannot be decoded")
        if self.concealed:
            notes.append(f"{self.concealed} frame(s) that could not be decoded replaced by the frame before")
        return (*notes, *self.result.notes)


def upscale_clip(
    source: Source,
    dest: str | os.PathLike | BinaryIO,
    upscale: Upscale,
    scale: int,
    options: VideoOptions,
    *,
    name: str | None = None,
    threads: int = 1,
) -> ClipResult:
    """Upscale every frame of ``source`` with ``upscale`` and write the video to ``dest`` as ``options`` say.

    Probe (limits checked), index, plan, then per part: decode, upscale, encode; then join. The output keeps the
    input's frame count, timestamps, time base, rotation, colour description and other streams (see :func:`join`).
    Raises the :class:`~edsr_ray.video.errors.VideoError` of the first step that refuses the video.
    """
    name = source_name(source, name)
    info = probe(source, options.limits, name=name)
    index = build_index(source, info, options.limits, name=name)
    segments = plan_segments(index, frames_per_part(info, scale, options))
    settings = encode_settings(info, options, scale)
    choice = choose_output(info.container, options.codec, options.container)
    parts: list[BinaryIO] = []
    concealed = 0
    for segment in segments:
        for decoded in decode_parts(
            source, info, segment, options.limits, on_decode_error=options.on_decode_error, threads=threads, name=name
        ):
            frames = upscale(decoded.frames)
            want = (decoded.part.frames, settings.height, settings.width, 3)
            if frames.shape != want or frames.dtype != decoded.frames.dtype:
                raise ValueError(f"upscale returned {frames.shape} {frames.dtype} for {want} {decoded.frames.dtype}")
            part = io.BytesIO()
            encode_part(part, frames, decoded.part.pts, settings, threads=threads)
            parts.append(part)
            concealed += decoded.concealed
    result = join(
        parts,
        dest,
        source=source,
        info=info,
        settings=settings,
        output=choice.format,
        limits=options.limits,
        expected_pts=index.pts,
        name=name,
    )
    return ClipResult(info, choice, result, len(segments), len(parts), concealed, index.leading)
