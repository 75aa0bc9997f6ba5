"""edsr_ray.evaluation.scoring: the pair an image is scored on (stored or generated LR, sizes checked by name) and the
scores of one work item against the metrics computed directly."""

from __future__ import annotations

import numpy as np
import pytest

from edsr_ray.codecs import encode_image
from edsr_ray.errors import EvaluationError
from edsr_ray.evaluation.scoring import ImageEvaluator, load_pair
from edsr_ray.imaging import imresize
from edsr_ray.metrics import psnr, ssim


@pytest.fixture
def pair(tmp_path, photos):
    hr = np.ascontiguousarray(photos["coffee"][100:151, 200:263])  # 51 x 63: not a multiple of 2
    (tmp_path / "hr.png").write_bytes(encode_image(hr))
    lr = imresize(hr[:50, :62], 0.5)
    (tmp_path / "lr.png").write_bytes(encode_image(lr))
    return tmp_path, hr, lr


def _item(folder, lr_uri: str, scale: int = 2) -> dict:
    return {
        "set": "S",
        "image": "coffee",
        "scale": scale,
        "protocol": "benchmark",
        "hr_uri": str(folder / "hr.png"),
        "lr_uri": lr_uri,
    }


def test_a_stored_lr_is_read_and_a_missing_one_generated_from_the_cropped_hr(pair):
    folder, hr, lr = pair
    got_hr, got_lr = load_pair(_item(folder, str(folder / "lr.png")))
    np.testing.assert_array_equal(got_hr, hr)
    np.testing.assert_array_equal(got_lr, lr)
    gen_hr, gen_lr = load_pair(_item(folder, ""))
    np.testing.assert_array_equal(gen_hr, hr[:50, :62])  # cropped to a multiple of the scale
    np.testing.assert_array_equal(gen_lr, lr)
    with pytest.raises(EvaluationError, match=r"size mismatch: LR .*lr\.png is 31x25 but HR .*hr\.png is 63x51; x3"):
        load_pair(_item(folder, str(folder / "lr.png"), scale=3))


def test_bicubic_scores_equal_the_metrics_computed_directly(pair):
    folder, hr, lr = pair
    evaluator = ImageEvaluator(
        [{"checkpoint": None, "scales": [2], "variants": [{"label": "bicubic", "self_ensemble": False}]}]
    )
    (result,) = evaluator.evaluate(_item(folder, str(folder / "lr.png")))
    sr = imresize(lr, 2)
    assert result.status == "ok" and result.model == "bicubic"
    assert result.psnr == psnr(sr, hr, 2, "benchmark") and result.ssim == ssim(sr, hr, 2, "benchmark")
    (failed,) = evaluator.evaluate(_item(folder, str(folder / "missing.png")))
    assert failed.status == "failed" and "missing.png: no such file" in failed.error
