"""edsr_ray.evaluation.sets: the official folder layouts and plain folders of HR images as evaluation sets, choosing
sets by name, and the paper's row order. (Sets from an ingested manifest: tests/test_evaluation_run.py, which ingests
one.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edsr_ray.codecs import encode_image
from edsr_ray.errors import EvaluationError
from edsr_ray.evaluation.sets import discover_sets, protocol_for, select_sets, table_order

PNG = encode_image(np.zeros((12, 12, 3), np.uint8))


def _files(root: Path, names: list[str]) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(PNG)


def test_official_layouts_pair_hr_and_lr_by_name(tmp_path):
    _files(
        tmp_path,
        [
            "benchmark/Set5/HR/baby.png",
            "benchmark/Set5/HR/bird.png",
            "benchmark/Set5/LR_bicubic/X2/babyx2.png",
            "benchmark/Set5/LR_bicubic/X2/birdx2.png",
            "benchmark/Set5/LR_bicubic/X3/babyx3.png",
            "DIV2K_valid_HR/0801.png",
            "DIV2K_valid_LR_bicubic/X4/0801x4.png",
            "notes.txt",
        ],
    )
    sets = {s.name: s for s in discover_sets(str(tmp_path))}
    assert set(sets) == {"Set5", "DIV2K_valid"}
    set5, div2k = sets["Set5"], sets["DIV2K_valid"]
    assert (set5.kind, set5.protocol, set5.dataset) == ("layout", "benchmark", "Set5")
    assert [img.id for img in set5.images] == ["baby", "bird"]
    baby, bird = set5.images
    assert baby.lr_uris == {
        2: f"{tmp_path}/benchmark/Set5/LR_bicubic/X2/babyx2.png",
        3: f"{tmp_path}/benchmark/Set5/LR_bicubic/X3/babyx3.png",
    }
    assert set(bird.lr_uris) == {2}  # its x3 partner is missing: found missing later, by name
    assert (div2k.protocol, div2k.dataset, div2k.split) == ("div2k", "DIV2K", "valid")
    assert div2k.images[0].lr_uris == {4: f"{tmp_path}/DIV2K_valid_LR_bicubic/X4/0801x4.png"}


def test_a_plain_folder_is_hr_images_whose_lr_is_generated(tmp_path):
    _files(tmp_path / "photos", ["a.png", "nested/b.png", "readme.md"])
    (found,) = discover_sets(str(tmp_path / "photos"))
    assert (found.name, found.kind, found.generated) == ("photos", "generated", True)
    assert [img.id for img in found.images] == ["a", "nested/b"]
    assert all(not img.lr_uris for img in found.images)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("nothing to see")
    with pytest.raises(EvaluationError, match="no images"):
        discover_sets(str(tmp_path / "empty"))


def test_sets_are_chosen_by_name_and_ordered_as_in_the_paper(tmp_path):
    _files(
        tmp_path,
        [
            "benchmark/Urban100/HR/img_001.png",
            "benchmark/Set14/HR/baboon.png",
            "benchmark/Set5/HR/baby.png",
            "DIV2K_valid_HR/0801.png",
            "DIV2K_train_HR/0001.png",
        ],
    )
    every = [s.name for s in select_sets([str(tmp_path)])]
    assert "DIV2K_train" not in every and set(every) == {"Urban100", "Set14", "Set5", "DIV2K_valid"}
    assert [s.name for s in select_sets([str(tmp_path)], ["set5", "DIV2K"])] == ["Set5", "DIV2K_valid"]
    with pytest.raises(EvaluationError, match=r"unknown set 'Set7'.*available: "):
        select_sets([str(tmp_path)], ["Set7"])
    assert table_order(["Mine", "DIV2K_valid", "Set14", "Set5"]) == ["Set5", "Set14", "DIV2K_valid", "Mine"]
    assert (protocol_for("DIV2K_valid"), protocol_for("div2k_test"), protocol_for("B100")) == (
        "div2k",
        "div2k",
        "benchmark",
    )
