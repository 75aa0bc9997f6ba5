"""What a batch upscaling run reports: :class:`Summary` (the summary line, the exit status, ``_summary.json``) over its
result rows, and the two report files written next to the outputs, ``_manifest.parquet`` (one row per input:
:data:`~edsr_ray.batch.stages.MANIFEST_SCHEMA`) and ``_summary.json``.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from edsr_ray import cli, storage
from edsr_ray.storage import StorageConfig

# Failures logged one by one before the rest are only counted (all are in the manifest).
LOGGED_FAILURES = 50
# Files that are not inputs: how many examples the summary shows.
IGNORED_EXAMPLES = 5
# The run's reports, written next to the outputs.
MANIFEST_NAME = "_manifest.parquet"
SUMMARY_NAME = "_summary.json"


@dataclass
class Summary:
    """A run's outcome: the manifest (one row per input), timings and the options it ran with."""

    manifest: pa.Table
    seconds: float = 0.0  # wall time of the processing (the pipeline), for img/s
    total_seconds: float = 0.0  # the whole run, model loading and listing included
    interrupted: str | None = None
    removed_temp_files: int = 0
    settings: dict[str, Any] = field(default_factory=dict)
    # Files of the input folder or prefix that are not inputs (not images, inside the output), with why.
    ignored: list[tuple[str, str]] = field(default_factory=list)

    def count(self, status: str) -> int:
        return int(pc.sum(pc.equal(self.manifest.column("status"), status)).as_py() or 0)

    @property
    def failures(self) -> list[dict[str, Any]]:
        """``{"input", "output", "reason"}`` of every failed input."""
        failed = self.manifest.filter(pc.equal(self.manifest.column("status"), "failed"))
        return failed.select(["input", "output", "reason"]).to_pylist()

    @property
    def written(self) -> int:
        """Outputs written by this run (each successful image is written exactly once)."""
        return self.count("ok")

    def _ok(self, kind: str) -> pa.Table:
        ok = pc.and_(pc.equal(self.manifest.column("status"), "ok"), pc.equal(self.manifest.column("kind"), kind))
        return self.manifest.filter(ok)

    @property
    def videos(self) -> int:
        """Videos upscaled and written by this run."""
        return self._ok("video").num_rows

    @property
    def frames(self) -> int:
        """Frames of the videos upscaled by this run."""
        return int(pc.sum(self._ok("video").column("frames")).as_py() or 0)

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def video_document(self) -> dict[str, Any]:
        """The videos' part of ``_summary.json``: counts, frames, frames/s, seconds of video, codecs in and out."""
        ok = self._ok("video")
        codecs: dict[str, dict[str, int]] = {"in": {}, "out": {}}
        for side in ("in", "out"):
            for name in ok.column(f"codec_{side}").to_pylist():
                codecs[side][name] = codecs[side].get(name, 0) + 1
        return {
            "written": ok.num_rows,
            "frames": self.frames,
            "frames_per_s": round(self.frames_per_s, 4),
            "video_seconds": round(float(pc.sum(ok.column("duration_s")).as_py() or 0.0), 3),
            "codecs": codecs,
            "parts_reused": int(pc.sum(ok.column("parts_reused")).as_py() or 0),
            "concealed_frames": int(pc.sum(ok.column("concealed_frames")).as_py() or 0),
        }

    @property
    def megapixels(self) -> float:
        """Input megapixels of the images upscaled by this run."""
        ok = self._ok("image")
        if ok.num_rows == 0:
            return 0.0
        pixels = pc.multiply(ok.column("width").cast(pa.int64()), ok.column("height").cast(pa.int64()))
        return float(pc.sum(pixels).as_py()) / 1e6

    @property
    def output_bytes(self) -> int:
        return int(pc.sum(self.manifest.column("bytes")).as_py() or 0)

    @property
    def images_per_s(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        done = f"{self.written} images ({self.megapixels:.2f} input megapixels)"
        if self.videos:
            done = (
                f"{self.written} inputs ({self.written - self.videos} images, {self.megapixels:.2f} input megapixels; "
                f"{self.videos} videos, {self.frames} frames, {self.frames_per_s:.2f} frames/s)"
            )
        text = (
            f"upscaled {done} in {self.seconds:.1f} s, {self.images_per_s:.2f} img/s; skipped "
            f"{self.count('skipped')} existing; {self.count('failed')} failed"
        )
        return text + (f"; INTERRUPTED: {self.interrupted}" if self.interrupted else "")

    def exit_code(self, allow_failures: int = 0) -> int:
        """0 when at most ``allow_failures`` inputs failed, 1 when more did, 3 when the run was interrupted."""
        if self.interrupted:
            return cli.INTERRUPTED
        return cli.DONE if self.count("failed") <= allow_failures else cli.ITEMS_FAILED

    def document(self, allow_failures: int = 0) -> dict[str, Any]:
        """The content of ``_summary.json``."""
        return {
            "images": self.manifest.num_rows,
            "ok": self.count("ok"),
            "skipped": self.count("skipped"),
            "failed": self.count("failed"),
            "written": self.written,
            "input_megapixels": round(self.megapixels, 6),
            "videos": self.video_document(),
            "output_bytes": self.output_bytes,
            "seconds": round(self.seconds, 3),
            "total_seconds": round(self.total_seconds, 3),
            "images_per_s": round(self.images_per_s, 4),
            "allow_failures": allow_failures,
            "exit_code": self.exit_code(allow_failures),
            "interrupted": self.interrupted,
            "removed_temp_files": self.removed_temp_files,
            "ignored": len(self.ignored),
            "ignored_examples": [{"input": s, "why": why} for s, why in self.ignored[:IGNORED_EXAMPLES]],
            "failures": self.failures[:LOGGED_FAILURES],
            "settings": self.settings,
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }


def write_reports(summary: Summary, output_uri: str, allow_failures: int, cfg: StorageConfig | None = None) -> None:
    """``_manifest.parquet`` and ``_summary.json`` next to the outputs (each written atomically)."""
    import pyarrow.parquet as pq

    buffer = pa.BufferOutputStream()
    pq.write_table(summary.manifest, buffer, compression="zstd")
    storage.write_bytes(storage.join(output_uri, MANIFEST_NAME), buffer.getvalue().to_pybytes(), cfg)
    document = json.dumps(summary.document(allow_failures), indent=2).encode()
    storage.write_bytes(storage.join(output_uri, SUMMARY_NAME), document, cfg)
