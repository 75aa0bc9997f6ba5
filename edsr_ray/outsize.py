"""The size of an output: what the user asked for (``--outscale`` / ``--width`` / ``--height``, or the model's own
factor), the model scale that serves it, the limits it must respect, and the resize that gives it.

One owner for the batch job (``jobs/upscale.py``) and the service (``?outscale=&width=&height=``):

* :class:`OutputSize` is the request, validated: nothing (the model's factor), a factor ``outscale``, or a ``width``
  and/or a ``height`` in pixels.
* :meth:`OutputSize.final_shape` is the exact final size of an input. A factor is applied to the decimal as written
  (``"0.29"`` is 29/100, not the binary float just below it) and rounded half up, so 100 x 0.29 is 29 pixels where
  ``int(100 * 0.29)`` is 28. A width alone keeps the aspect ratio (height = round half up of h x W / w, in integers),
  as does a height alone; both together are an exact box (the aspect ratio may change).
* :meth:`OutputSize.choose_scale` picks the smallest available model scale whose output covers the final size on
  both sides, so the model's pixels are only shrunk (antialiased) or kept; past the largest scale, the largest, whose
  output is then enlarged. ``x s`` with a model of scale ``s`` is exactly the model's output: no resize at all.
* :func:`check_output` holds the final size to the output pixel limit (:func:`output_pixel_limit`) and the output
  format's side limit, from the input's size alone, before any compute; :func:`plan_output` is choice + size + check.
* :func:`resize_decoded` resizes the model's output to the final size with the MATLAB-compatible antialiased bicubic
  :func:`~edsr_ray.imaging.imresize` (alpha too; 8/16-bit, grey and alpha are kept). It is CPU work: the batch job
  runs it in its encode stage and the service in its ingress, never where the model runs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction

from edsr_ray.codecs import MAX_SIDE, DecodedImage, check_output_size
from edsr_ray.config import SCALES
from edsr_ray.errors import ConfigError, FieldError, ImageError, ImageTooLargeError
from edsr_ray.imaging import imresize

# The largest factor accepted: beyond it every image would be refused by the output pixel limit anyway, and the bound
# keeps the exact arithmetic on what was written cheap (no 10**999999 from "1e999999").
MAX_OUTSCALE = 1000
# Digits after the decimal point an outscale may carry (a bound for the same reason; 1.7777777777777777 has 16).
OUTSCALE_DIGITS = 20
# The largest side any output format stores: a --width or --height beyond it could never be written.
MAX_OUTPUT_SIDE = max(MAX_SIDE.values())
# Output pixels allowed per pixel of the input pixel limit: what the largest model scale (x4) makes of the largest
# input, so every output the model's own factor can produce stays allowed, and no requested size goes beyond it.
OUTPUT_PIXELS_PER_INPUT_PIXEL = max(SCALES) ** 2


@dataclass(frozen=True)
class OutputSize:
    """The final size asked for: nothing (the model's factor), ``outscale``, or ``width`` and/or ``height``.

    ``outscale`` is kept as the decimal text it was given in (``"1.5"``; a float or int is taken as the decimal it
    prints as), so final sizes are computed on that exact number. ``outscale`` together with ``width``/``height`` is
    refused: each fixes the size on its own.
    """

    outscale: str | None = None  # a factor, > 0 and at most MAX_OUTSCALE: e.g. "1.5" (Real-ESRGAN's --outscale)
    width: int | None = None  # final width in pixels; alone, the height keeps the aspect ratio
    height: int | None = None  # final height in pixels; alone, the width keeps the aspect ratio

    def __post_init__(self) -> None:
        if self.outscale is not None:
            object.__setattr__(self, "outscale", _decimal_text(self.outscale))
        for key in ("width", "height"):
            value = getattr(self, key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise FieldError(key, f"expected a positive whole number of pixels, got {value!r}")
            if not 1 <= value <= MAX_OUTPUT_SIDE:
                raise FieldError(
                    key, f"must be a positive whole number of pixels, at most {MAX_OUTPUT_SIDE}, got {value}"
                )
        if self.outscale is not None and (self.width is not None or self.height is not None):
            raise FieldError("outscale", "give either outscale or width/height, not both: each sets the output size")

    @property
    def asked(self) -> bool:
        """Whether a size was asked for (otherwise outputs are the model's factor)."""
        return self.outscale is not None or self.width is not None or self.height is not None

    @property
    def factor(self) -> Fraction | None:
        """``outscale`` as an exact fraction (None when not given)."""
        return None if self.outscale is None else Fraction(Decimal(self.outscale))

    def describe(self) -> str:
        """The request in words, for logs: "x1.5", "1920 wide", "1920x1080", "the model's scale"."""
        if self.outscale is not None:
            return f"x{self.outscale}"
        if self.width is not None and self.height is not None:
            return f"{self.width}x{self.height}"
        if self.width is not None:
            return f"{self.width} wide"
        if self.height is not None:
            return f"{self.height} high"
        return "the model's scale"

    @classmethod
    def parse(cls, outscale: str | None = None, width: str | None = None, height: str | None = None) -> OutputSize:
        """The request from text as a user typed it (a query string's values): a :class:`FieldError` naming the key
        for anything that is not a positive number (``width=abc``, ``outscale=0``, ``height=-5``)."""
        sides = {}
        for key, text in (("width", width), ("height", height)):
            if text is None:
                continue
            text = str(text).strip()
            if not text.isascii() or not text.isdigit():
                raise FieldError(key, f"expected a positive whole number of pixels, got {text!r}")
            sides[key] = int(text) if len(text) <= 12 else MAX_OUTPUT_SIDE + 1  # a huge number: refused by range
        return cls(outscale=outscale, **sides)

    def final_shape(self, height: int, width: int, scale: int | None = None) -> tuple[int, int]:
        """(rows, columns) of the output of a ``height`` x ``width`` input; nothing asked: ``scale`` times the input.

        Every side is at least 1 pixel.
        """
        if self.outscale is not None:
            f = self.factor
            return _round_half_up(height * f), _round_half_up(width * f)
        if self.width is not None and self.height is not None:
            return self.height, self.width
        if self.width is not None:
            return _round_half_up(Fraction(height * self.width, width)), self.width
        if self.height is not None:
            return self.height, _round_half_up(Fraction(width * self.height, height))
        if scale is None:
            raise ValueError("no output size asked for: final_shape needs the model's scale")
        return height * scale, width * scale

    def choose_scale(self, scales: Iterable[int], height: int, width: int) -> int:
        """The model scale for a ``height`` x ``width`` input: the smallest of ``scales`` whose output covers the
        final size on both sides, else the largest (its output is then enlarged). Nothing asked: ``scales`` must be
        one scale (the model's, or the one chosen with --scale), and that is it."""
        available = sorted({int(s) for s in scales})
        if not available:
            raise ValueError("no model scale to choose from")
        if not self.asked:
            if len(available) != 1:
                raise ConfigError(f"the model upscales by {available}: choose one with --scale / scale=")
            return available[0]
        rows, cols = self.final_shape(height, width)
        for s in available:
            if s * height >= rows and s * width >= cols:
                return s
        return available[-1]


def _decimal_text(value: object) -> str:
    """``value`` as the text of a decimal number within the accepted range, or a FieldError naming outscale."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise FieldError("outscale", f"expected a number such as 1.5 or 3, got {value!r}")
    text = value.strip() if isinstance(value, str) else repr(value)  # repr: the shortest decimal of a float
    try:
        number = Decimal(text)
    except InvalidOperation:
        number = None
    if number is None or not number.is_finite():
        raise FieldError("outscale", f"expected a number such as 1.5 or 3, got {text!r}")
    if not 0 < number <= MAX_OUTSCALE:
        raise FieldError("outscale", f"must be greater than 0 and at most {MAX_OUTSCALE}, got {text}")
    if number.as_tuple().exponent < -OUTSCALE_DIGITS:
        raise FieldError("outscale", f"write it with at most {OUTSCALE_DIGITS} digits after the point, got {text}")
    return text


def _round_half_up(x: Fraction) -> int:
    return max(1, math.floor(x + Fraction(1, 2)))


def output_pixel_limit(max_pixels: int) -> int:
    """Pixels an output (and the model's output before resizing) may have, for an input pixel limit of
    ``max_pixels``."""
    return max_pixels * OUTPUT_PIXELS_PER_INPUT_PIXEL


def check_output(height: int, width: int, final: tuple[int, int], *, max_pixels: int, fmt: str | None = None) -> None:
    """Refuse a ``height`` x ``width`` input's output of ``final`` (rows, columns) before any compute:
    :class:`ImageTooLargeError` when it has more pixels than :func:`output_pixel_limit` allows; :class:`ImageError`
    when ``fmt`` (png, jpeg, webp; None: not checked) cannot store it.

    The model's own output before resizing needs no check of its own: it is at most ``max(SCALES)`` times the input
    on each side, which is what the output limit allows for an input within ``max_pixels``.
    """
    rows, cols = final
    limit = output_pixel_limit(max_pixels)
    exact = rows % height == 0 and cols % width == 0 and rows // height == cols // width
    what = f"x{rows // height}" if exact else f"{cols}x{rows}"
    if rows * cols > limit:
        label = f"its x{rows // height} output ({cols}x{rows})" if exact else f"its {cols}x{rows} output"
        raise ImageTooLargeError(
            f"{label} would have {rows * cols:,} pixels, more than the limit of {limit:,} "
            f"on outputs ({OUTPUT_PIXELS_PER_INPUT_PIXEL} times the input pixel limit of {max_pixels:,}); ask for a "
            "smaller size or raise the pixel limit"
        )
    if fmt is not None:
        try:
            check_output_size(cols, rows, fmt)
        except ImageError as exc:
            raise ImageError(f"its {what} output cannot be written: {exc}") from None


def plan_output(
    size: OutputSize, scales: Iterable[int], height: int, width: int, *, max_pixels: int, fmt: str | None = None
) -> tuple[int, tuple[int, int]]:
    """(model scale, final (rows, columns)) for a ``height`` x ``width`` input, checked by :func:`check_output`:
    everything the batch job's decode stage and the service's ingress decide about an output from the input's
    header, before the model sees it."""
    scale = size.choose_scale(scales, height, width)
    final = size.final_shape(height, width, scale)
    check_output(height, width, final, max_pixels=max_pixels, fmt=fmt)
    return scale, final


def resize_decoded(img: DecodedImage, final: tuple[int, int]) -> DecodedImage:
    """``img`` resized to ``final`` (rows, columns) with the antialiased MATLAB bicubic; the same image when it is
    that size already. Bit depth, alpha (resized alike) and greyness (the three equal channels get the same
    arithmetic) are kept."""
    final = (int(final[0]), int(final[1]))
    if (img.height, img.width) == final:
        return img
    rgb = imresize(img.rgb, output_shape=final)  # (rows, cols, 3), the input's dtype, rounded per pass
    alpha = None if img.alpha is None else imresize(img.alpha, output_shape=final)
    return dataclasses.replace(img, rgb=rgb, alpha=alpha)
