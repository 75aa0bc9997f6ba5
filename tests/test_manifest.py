"""edsr_ray.manifest: the dataset manifest of an ingested root, the selections made from it, and the checks that fail
before any cluster work. No Ray is needed to read it."""

from __future__ import annotations

import pytest
from sample_data import data_config

from edsr_ray import manifest
from edsr_ray.errors import EdsrRayError


def test_manifest_needs_no_ray():
    import ast
    from pathlib import Path

    tree = ast.parse(Path(manifest.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not any(name == "ray" or name.startswith("ray.") for name in imported)


def test_manifest_select_and_checks(sample_root, tmp_path):
    frame = manifest.read_manifest(sample_root)
    assert tuple(frame.columns) == manifest.MANIFEST_COLUMNS
    train = manifest.select(frame, "DIV2K", (1, 800), 2)
    assert train["id"].tolist() == ["0001", "0002", "0003", "0004", "0005", "0006"]
    assert manifest.select(frame, "DIV2K", (801, 810), 4)["id"].tolist() == ["0801", "0802"]
    assert manifest.select(frame, "DIV2K", (2, 3))["index"].tolist() == [2, 3]
    assert len(manifest.select(frame, "DIV2K", split="valid")) == 2
    assert len(manifest.select(frame, "Set5")) == 0

    counts = manifest.check_dataset(data_config(), (2, 3, 4))
    assert counts == {f"{split}_x{s}": n for split, n in (("train", 6), ("valid", 2)) for s in (2, 3, 4)}
    with pytest.raises(EdsrRayError, match=r"no DIV2K image in index range \[1, 800\] for train at x4 with LR"):
        manifest.check_dataset(data_config(patch_size=100), (4,))  # the tallest training x4 LR is 84 px
    with pytest.raises(EdsrRayError, match=r"index range \[900, 910\]"):
        manifest.check_dataset(data_config(val_range=(900, 910)), (2,))
    with pytest.raises(EdsrRayError, match=r"jobs/ingest\.py"):
        manifest.read_manifest(str(tmp_path))
