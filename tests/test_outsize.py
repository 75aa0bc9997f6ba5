"""Output sizes (edsr_ray.outsize): the final size of every option, the model scale that serves it, the limits, and
the resize that gives it. The batch job and the service are tested end to end in test_batch_job.py and
test_serving.py."""

from __future__ import annotations

import numpy as np
import pytest

from edsr_ray.codecs import DecodedImage
from edsr_ray.errors import ConfigError, FieldError, ImageError, ImageTooLargeError
from edsr_ray.imaging import imresize
from edsr_ray.outsize import OutputSize, check_output, output_pixel_limit, plan_output, resize_decoded

SCALES = (2, 3, 4)

# (request, input rows x columns, final rows x columns, model scale), the finals worked out by hand: a factor is
# applied to the decimal as written and rounded half up (100 x 0.29 = 29 where int(100 * 0.29) == 28); a side alone
# keeps the aspect ratio (333 x 1000 / 500 = 666; 500 x 1000 / 333 = 1501.5 -> 1502); both sides: exactly that box.
SIZES = [
    (OutputSize(outscale="1.5"), (101, 67), (152, 101), 2),  # 151.5 -> 152, 100.5 -> 101; x2 shrunk
    (OutputSize(outscale="3.5"), (101, 67), (354, 235), 4),  # 353.5 -> 354, 234.5 -> 235; x4 shrunk
    (OutputSize(outscale="8"), (101, 67), (808, 536), 4),  # past the largest scale: x4, then enlarged
    (OutputSize(outscale="4"), (101, 67), (404, 268), 4),  # exactly the model's factor: no resize
    (OutputSize(outscale="2.9"), (100, 100), (290, 290), 3),
    (OutputSize(outscale="1.1"), (100, 100), (110, 110), 2),
    (OutputSize(outscale="0.29"), (100, 100), (29, 29), 2),  # below 1: the smallest scale, then shrunk
    (OutputSize(outscale=0.001), (7, 9), (1, 1), 2),  # at least one pixel a side
    (OutputSize(width=1000), (333, 500), (666, 1000), 2),
    (OutputSize(height=1000), (333, 500), (1000, 1502), 4),  # 1000 / 333 > 3: x4
    (OutputSize(width=640, height=640), (333, 500), (640, 640), 2),  # the aspect ratio changes
    (OutputSize(width=300), (333, 500), (200, 300), 2),  # narrower than the input: x2, then shrunk
    (OutputSize(width=1501), (333, 500), (1000, 1501), 4),  # one column past x3 needs x4
]


@pytest.mark.parametrize(("size", "shape", "final", "scale"), SIZES, ids=[s[0].describe() for s in SIZES])
def test_final_size_and_model_scale_of_every_option(size, shape, final, scale):
    assert size.final_shape(*shape) == final
    assert size.choose_scale(SCALES, *shape) == scale
    assert plan_output(size, SCALES, *shape, max_pixels=10**6, fmt="png") == (scale, final)
    # A single-scale model serves every size with its own scale.
    assert size.choose_scale([3], *shape) == 3


def test_the_models_own_factor_needs_no_resize():
    for s in SCALES:
        for size in (OutputSize(outscale=str(s)), OutputSize(outscale=s), OutputSize(width=64 * s)):
            assert size.choose_scale([s], 48, 64) == s and size.final_shape(48, 64) == (48 * s, 64 * s)
        assert OutputSize().final_shape(48, 64, s) == (48 * s, 64 * s)
    # Nothing asked: the model's one scale, or an error for a multi-scale model without one chosen.
    assert OutputSize().choose_scale([3], 10, 10) == 3
    with pytest.raises(ConfigError, match="choose one with --scale"):
        OutputSize().choose_scale(SCALES, 10, 10)


BAD = [
    ({"outscale": "0"}, "outscale", "greater than 0"),
    ({"outscale": "-2"}, "outscale", "greater than 0"),
    ({"outscale": "nan"}, "outscale", "expected a number"),
    ({"outscale": "inf"}, "outscale", "expected a number"),
    ({"outscale": "two"}, "outscale", "expected a number"),
    ({"outscale": ""}, "outscale", "expected a number"),
    ({"outscale": "1e999999"}, "outscale", "at most 1000"),
    ({"outscale": "1." + "1" * 30}, "outscale", "digits after the point"),
    ({"outscale": "2", "width": "100"}, "outscale", "not both"),
    ({"outscale": "2", "height": "100"}, "outscale", "not both"),
    ({"width": "0"}, "width", "positive whole number"),
    ({"width": "-5"}, "width", "positive whole number"),
    ({"width": "1.5"}, "width", "positive whole number"),
    ({"height": "abc"}, "height", "positive whole number"),
    ({"height": "9" * 40}, "height", "at most 2147483647"),
]


@pytest.mark.parametrize(("given", "key", "words"), BAD, ids=[str(b[0]) for b in BAD])
def test_bad_values_and_combinations_are_errors_naming_the_option(given, key, words):
    with pytest.raises(FieldError, match=words) as info:
        OutputSize.parse(**given)
    assert info.value.key == key
    typed = {k: int(v) if k != "outscale" and v.lstrip("-").isdigit() and len(v) < 20 else v for k, v in given.items()}
    if all(isinstance(v, int) for k, v in typed.items() if k != "outscale"):
        with pytest.raises(FieldError, match=words):  # the typed constructor (the command line) says the same
            OutputSize(**typed)


def test_limits_apply_to_the_final_size_before_any_compute():
    limit = output_pixel_limit(1000)
    assert limit == 16_000  # x4 of the largest input allowed: the model's own factor is never refused
    check_output(25, 40, (100, 160), max_pixels=1000)  # 16,000 pixels: at the limit
    with pytest.raises(ImageTooLargeError, match=r"its x5 output \(200x125\) would have 25,000 pixels"):
        check_output(25, 40, (125, 200), max_pixels=1000)
    with pytest.raises(ImageTooLargeError, match="its 100x161 output would have 16,100 pixels, more than the limit"):
        check_output(25, 40, (161, 100), max_pixels=1000)
    with pytest.raises(ImageError, match=r"its 16384x1 output cannot be written: .* too large for WEBP"):
        check_output(1, 8, (1, 16384), max_pixels=10**6, fmt="webp")
    with pytest.raises(ImageError, match="its x2 output cannot be written"):
        plan_output(OutputSize(), [2], 1, 32751, max_pixels=10**6, fmt="jpeg")  # the message without a size asked
    check_output(1, 8, (1, 16384), max_pixels=10**6, fmt="png")


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("final", [(100, 151), (33, 50), (200, 303), (67, 200)])
def test_resize_decoded_equals_imresize_and_keeps_what_the_image_is(photos, dtype, final):
    rgb8 = np.ascontiguousarray(photos["astronaut"][:134, :202])  # (134, 202, 3): an x2 output of 67 x 101
    rgb = rgb8.astype(dtype) * (257 if dtype == np.uint16 else 1)
    alpha = np.linspace(0, np.iinfo(dtype).max, 134 * 202).reshape(134, 202).astype(dtype)
    depth = 16 if dtype == np.uint16 else 8
    img = DecodedImage(rgb, alpha, depth, False, "PNG", "RGBA")
    out = resize_decoded(img, final)
    assert out.rgb.shape == (*final, 3) and out.alpha.shape == final and out.rgb.dtype == dtype
    assert (out.bit_depth, out.format, out.mode) == (depth, "PNG", "RGBA")
    np.testing.assert_array_equal(out.rgb, imresize(rgb, output_shape=final))
    np.testing.assert_array_equal(out.alpha, imresize(alpha, output_shape=final))
    # Grey stays grey: its three equal channels get the same arithmetic.
    grey = DecodedImage.from_array(rgb[..., 1])
    resized = resize_decoded(grey, final)
    assert resized.grey and (resized.rgb == resized.rgb[..., :1]).all()
    # At its size already: the very same image, not a resampled copy.
    assert resize_decoded(img, (134, 202)) is img
