"""Errors of the video library: each message names the file and the reason, for a manifest row or a 4xx answer."""

from __future__ import annotations

from edsr_ray.errors import EdsrRayError


class VideoError(EdsrRayError, ValueError):
    """A video cannot be read or written as asked: not a video, no video stream, corrupt, truncated, ..."""


class VideoTooLargeError(VideoError):
    """The video is over a limit: pixels per frame, frames or seconds (checked before any frame is decoded)."""


class VideoDecodeError(VideoError):
    """Decoding failed in the middle of the stream, or frames the index lists were not delivered."""


class JoinError(VideoError):
    """Encoded parts cannot be joined into one stream (different encoder settings, missing or overlapping frames)."""
