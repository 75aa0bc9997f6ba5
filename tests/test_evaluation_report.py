"""edsr_ray.evaluation.report: the paper's cell format, the table layout with its failure marks, and the means over
the images that did not fail."""

from __future__ import annotations

import math

import pytest

from edsr_ray.evaluation.report import ImageResult, SummaryRow, format_cell, markdown_table, summarize


def test_table_cells_and_failure_marks():
    rows = [
        SummaryRow("A", "Set5", 2, "benchmark", 5, 0, 38.1149, 0.96012, 0.1),
        SummaryRow("A", "Set5", 3, "benchmark", 4, 1, 34.6, 0.92821, 0.1),
        SummaryRow("B", "Set5", 2, "benchmark", 0, 5, float("nan"), float("nan"), float("nan")),
    ]
    assert format_cell(rows[0]) == "38.11/.9601"
    assert format_cell(rows[1]) == "34.60/.9282*"
    assert format_cell(rows[2]) == "failed"
    table = markdown_table(rows, ["A", "B"], ["Set5"], [2, 3])
    assert "| Set5 | ×2 | 38.11/.9601 | failed |" in table
    assert "| Set5 | ×3 | 34.60/.9282* | n/a |" in table
    assert "1 of 5" in table and "5 of 5" in table


def test_means_are_over_the_images_that_did_not_fail():
    results = [
        ImageResult("A", "Set5", 2, "baby", psnr=30.0, ssim=0.9, seconds=1.0),
        ImageResult("A", "Set5", 2, "bird", psnr=34.0, ssim=0.8, seconds=3.0),
        ImageResult("A", "Set5", 2, "head", status="failed", error="head.png: corrupt"),
        ImageResult("A", "DIV2K_valid", 2, "0801", psnr=28.0, ssim=0.7, seconds=2.0),
    ]
    rows = {(r.set, r.scale): r for r in summarize(results, {"Set5": "benchmark"})}
    set5 = rows[("Set5", 2)]
    # The official code averages per-image PSNR, not the PSNR of the pooled error.
    assert (set5.images, set5.failed, set5.psnr, set5.seconds) == (2, 1, 32.0, 2.0)
    assert set5.ssim == pytest.approx(0.85) and set5.protocol == "benchmark"
    div2k = rows[("DIV2K_valid", 2)]
    assert div2k.protocol == "div2k"  # by name, when the items did not say
    assert format_cell(set5) == "32.00/.8500*" and not math.isnan(div2k.psnr)
