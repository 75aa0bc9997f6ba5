"""Pixels between video frames and RGB arrays, with the colour matrix and range always explicit.

A decoded frame is YUV (or RGB for a few codecs); the model takes RGB. swscale, which does the conversion, has two
defaults that are wrong for video: it treats the range as limited unless told (a full-range JPEG-style stream comes
out washed out) and uses the BT.601 matrix when the stream does not say (wrong for HD, which is BT.709). So every
conversion here passes matrix and range, and a stream that leaves them unspecified is read the way players read it
(:meth:`Colour.assumed`); the output is then tagged with what was assumed, since the larger output would otherwise
be guessed differently.

Arrays are (H, W, 3) uint8 for 8-bit sources and uint16 on the full 16-bit scale for deeper ones (the project's
16-bit image convention), so a 10-bit video keeps its precision through the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import av
import numpy as np

# FFmpeg's AVColorSpace / AVColorRange / AVColorPrimaries / AVColorTransferCharacteristic values used here.
MATRIX_RGB, MATRIX_BT709, MATRIX_UNSPECIFIED, MATRIX_BT601 = 0, 1, 2, 6
RANGE_UNSPECIFIED, RANGE_LIMITED, RANGE_FULL = 0, 1, 2
UNSPECIFIED = 2  # primaries and transfer
# AVColorSpace -> the coefficient table swscale uses (BT.601 variants share one; BT.2020 CL uses the NCL matrix).
_SWS_MATRIX = {1: 1, 4: 4, 5: 5, 6: 5, 7: 7, 9: 9, 10: 9}
# Streams at least this tall are HD: an unspecified matrix is BT.709 there and BT.601 below, as players assume.
HD_HEIGHT = 720


@dataclass(frozen=True)
class Colour:
    """A stream's colour description, as FFmpeg numbers it (ITU-T H.273): ``primaries``, ``transfer``, ``matrix``
    (AVColorSpace; 0 is RGB) and ``range`` (1 limited, 2 full; 0 unspecified)."""

    primaries: int = UNSPECIFIED
    transfer: int = UNSPECIFIED
    matrix: int = MATRIX_UNSPECIFIED
    range: int = RANGE_UNSPECIFIED

    @classmethod
    def of(cls, obj: av.VideoFrame | av.codec.context.CodecContext) -> Colour:
        """The colour fields of a decoded frame or a codec context."""
        return cls(int(obj.color_primaries), int(obj.color_trc), int(obj.colorspace), int(obj.color_range))

    def assumed(self, height: int, rgb: bool = False) -> Colour:
        """This description with the matrix and range filled in where unspecified (or unusable by swscale): the
        matrix players assume for the frame ``height`` and limited range; RGB pixel formats are full-range RGB."""
        if rgb:
            return Colour(self.primaries, self.transfer, MATRIX_RGB, RANGE_FULL)
        matrix = self.matrix if self.matrix in _SWS_MATRIX else MATRIX_BT709 if height >= HD_HEIGHT else MATRIX_BT601
        colour_range = self.range if self.range in (RANGE_LIMITED, RANGE_FULL) else RANGE_LIMITED
        return Colour(self.primaries, self.transfer, matrix, colour_range)

    def tag(self, target: av.VideoFrame | av.codec.context.CodecContext) -> None:
        """Write these fields onto a frame or an encoder / stream context."""
        target.color_primaries = self.primaries
        target.color_trc = self.transfer
        target.colorspace = self.matrix
        target.color_range = self.range


def rgb_format(bit_depth: int) -> str:
    """The packed RGB pixel format of the arrays for a source of ``bit_depth`` bits: rgb24 or rgb48le."""
    return "rgb24" if bit_depth <= 8 else "rgb48le"


def is_rgb_format(pix_fmt: str) -> bool:
    """True for pixel formats that store RGB (gbrp, bgr0, rgb48le, ...) rather than YUV or grey."""
    return av.VideoFormat(pix_fmt).is_rgb


def to_rgb(frame: av.VideoFrame, colour: Colour, bit_depth: int, threads: int = 1) -> np.ndarray:
    """A decoded frame as an (H, W, 3) uint8 or uint16 array, converted with ``colour``'s matrix and range
    (:meth:`Colour.assumed` of the stream), using ``threads`` swscale threads."""
    return frame.reformat(
        format=rgb_format(bit_depth),
        src_colorspace=_SWS_MATRIX.get(colour.matrix),
        src_color_range=colour.range,
        threads=threads,
    ).to_ndarray()


def from_rgb(rgb: np.ndarray, pix_fmt: str, colour: Colour, threads: int = 1) -> av.VideoFrame:
    """An (H, W, 3) uint8/uint16 array as a frame in ``pix_fmt``, converted with ``colour``'s matrix and range and
    tagged with all of ``colour`` (PyAV's implicit conversion in ``encode`` would assume limited range and BT.601)."""
    source = av.VideoFrame.from_ndarray(rgb, format="rgb24" if rgb.dtype == np.uint8 else "rgb48le")
    matrix = _SWS_MATRIX.get(colour.matrix)
    frame = source.reformat(
        format=pix_fmt,
        src_colorspace=matrix,
        dst_colorspace=matrix,
        dst_color_range=colour.range,
        threads=threads,
    )
    colour.tag(frame)
    return frame
