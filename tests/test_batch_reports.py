"""edsr_ray.batch.reports: the summary line, the exit status and the failures of a run, from its result rows; and the
progress text the driver shows while rows arrive."""

from __future__ import annotations

from edsr_ray.batch.job import Progress
from edsr_ray.batch.reports import Summary
from edsr_ray.batch.stages import manifest_table


def test_summary_exit_codes_and_progress_text():
    rows = [
        {"input": "a", "status": "ok", "reason": "", "width": 100, "height": 50, "bytes": 10},
        {"input": "b", "status": "skipped", "reason": ""},
        {"input": "c", "status": "failed", "reason": "c: broken"},
    ]
    summary = Summary(manifest_table(rows), seconds=2.0)
    assert (
        summary.line() == "upscaled 1 images (0.01 input megapixels) in 2.0 s, 0.50 img/s; skipped 1 existing; 1 failed"
    )
    assert (summary.exit_code(0), summary.exit_code(1)) == (1, 0)
    assert summary.failures == [{"input": "c", "output": None, "reason": "c: broken"}]
    interrupted = Summary(manifest_table(rows[:1]), seconds=1.0, interrupted="node lost")
    assert interrupted.exit_code(5) == 3 and "INTERRUPTED: node lost" in interrupted.line()

    progress = Progress(10, bar=False, every_s=1e9)
    progress.update(manifest_table(rows))
    assert progress.text().startswith("3/10 inputs (30.0%)") and "1 failed" in progress.text()
    assert "frames" not in progress.text()  # no videos: no frame counter
    progress.frames(12, 48)
    assert "video frames 12/48" in progress.text()
