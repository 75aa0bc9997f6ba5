"""edsr_ray.training.patches: cutting aligned patches, and the Ray Data patch stream against a dataset ingested into
the embedded S3 server (fresh crops every epoch, every image used, scales dealt evenly, disjoint patches per rank)."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from sample_data import data_config, max_interior_error

from edsr_ray.config import DataConfig
from edsr_ray.imaging import imresize
from edsr_ray.training import batches, patches


@pytest.fixture(scope="module")
def root(sample_root, ray_data) -> str:
    return sample_root


def _hashes(ds) -> Counter:
    return Counter(
        hashlib.sha1(block["lr"][i].tobytes() + block["hr"][i].tobytes()).hexdigest()
        for block in ds.iter_batches(batch_size=None, batch_format="numpy")
        for i in range(len(block["lr"]))
    )


# --------------------------------------------------------------------------------------------------------------------
# Cutting patches (no Ray)


def test_cut_patches_are_the_crops_at_their_positions(photos):
    hr = photos["astronaut"][:480, :504]
    for scale in (2, 3, 4):
        lr = imresize(hr, 1 / scale)
        p = patches.cut_patches(lr, hr, scale, 200, 24, np.random.default_rng(scale), augment=True)
        assert p.lr.shape == (200, 24, 24, 3) and p.hr.shape == (200, 24 * scale, 24 * scale, 3)
        assert set(p.transforms.tolist()) == set(range(8))
        for i in range(200):
            y, x = p.positions[i]
            code = int(p.transforms[i])
            np.testing.assert_array_equal(patches.invert_transform(p.lr[i], code), lr[y : y + 24, x : x + 24])
            hr_crop = hr[y * scale : (y + 24) * scale, x * scale : (x + 24) * scale]
            np.testing.assert_array_equal(patches.invert_transform(p.hr[i], code), hr_crop)
        plain = patches.cut_patches(lr, hr, scale, 10, 24, np.random.default_rng(0), augment=False)
        assert not plain.transforms.any()
    with pytest.raises(Exception, match="smaller than the 24x24 patch"):
        patches.cut_patches(lr[:20], hr, 4, 1, 24, np.random.default_rng(0))


# --------------------------------------------------------------------------------------------------------------------
# The stream


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_stream_pairs_are_aligned(root, scale):
    ds = patches.patch_dataset(data_config(epoch_patches=96), (scale,), seed=scale)
    n = 0
    for block in ds.iter_batches(batch_size=None, batch_format="numpy"):
        assert block["lr"].dtype == np.uint8 and block["hr"].dtype == np.uint8
        assert block["lr"].shape[1:] == (24, 24, 3) and block["hr"].shape[1:] == (24 * scale, 24 * scale, 3)
        assert (block["scale"] == scale).all()
        for lr, hr in zip(block["lr"], block["hr"]):
            assert max_interior_error(lr, hr, scale) <= 1
            n += 1
    assert n == 96


def test_epochs_are_fresh_and_seeds_reproduce(root):
    cfg = data_config()
    ds = patches.patch_dataset(cfg, (2,), seed=7)
    first, second = _hashes(ds), _hashes(ds)
    assert sum(first.values()) == sum(second.values()) == cfg.epoch_patches
    assert len(first & second) <= 2  # new crops (a collision among ~2e5 positions x 8 transforms is rare)

    again = patches.patch_dataset(cfg, (2,), seed=7)
    assert _hashes(again) == first and _hashes(again) == second  # same seed: the same sequence of epochs
    other = patches.patch_dataset(cfg, (2,), seed=8)
    assert len(_hashes(other) & first) <= 2
    unseeded = patches.patch_dataset(cfg, (2,))
    assert len(_hashes(unseeded) & first) <= 2


def test_plan_uses_every_image_and_deals_scales_evenly(root):
    cfg = data_config(epoch_patches=6 * 16 * 3)
    source = patches.PatchDatasource(
        patches._image_table(cfg, (2, 3, 4), "train", "DIV2K", None),
        epoch_patches=cfg.epoch_patches,
        patches_per_image=cfg.patches_per_image,
        patch_size=cfg.patch_size,
        augment=True,
        seed=None,
        storage=None,
    )
    units = source.plan(entropy=123)
    assert len(units) == 18 and sum(u.count for u in units) == cfg.epoch_patches
    for scale in (2, 3, 4):
        mine = [u for u in units if u.scale == scale]
        assert len(mine) == 6
        assert len({u.image.hr_uri for u in mine}) == 6  # each training image once per scale
    assert [u.scale for u in source.plan(entropy=123)] == [u.scale for u in units]
    assert [u.scale for u in source.plan(entropy=124)] != [u.scale for u in units]
    tasks = source.get_read_tasks(4)
    assert len(tasks) == 18 and sum(t.metadata.num_rows for t in tasks) == cfg.epoch_patches

    long_epoch = patches.PatchDatasource(
        source._images, epoch_patches=2500 * 16, patches_per_image=16, patch_size=24, augment=True, seed=1, storage=None
    )
    tasks = long_epoch.get_read_tasks(4)
    assert len(tasks) == 1250 and sum(t.metadata.num_rows for t in tasks) == 2500 * 16  # two images per task


# --------------------------------------------------------------------------------------------------------------------
# Ray Train


def _loop(config: dict) -> None:
    """Two DDP ranks: MDSR-style single-scale batches, a real gradient all-reduce per step, patch hashes saved."""
    import ray.train
    import torch.nn.functional as F
    from ray.train.torch import prepare_model

    cfg = DataConfig(**config["data"])
    scales = tuple(config["scales"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    model = prepare_model(torch.nn.Conv2d(3, 3, 3, padding=1))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6)
    shard = ray.train.get_dataset_shard("train")
    steps = batches.batches_per_epoch(cfg, config["batch"], world, scales)
    seen: list[str] = []
    for epoch in range(2):
        for lr, hr, scale in batches.iter_training_batches(
            shard, config["batch"], scales, seed=rank, num_batches=steps
        ):
            seen += [hashlib.sha1(x.numpy().tobytes()).hexdigest() + f"/{epoch}" for x in lr]
            sr = F.interpolate(model(lr), scale_factor=scale, mode="nearest")  # (B, 3, P*s, P*s)
            loss = F.l1_loss(sr, hr)
            optimizer.zero_grad()
            loss.backward()  # DDP all-reduce: hangs if the ranks disagree on the number of steps
            optimizer.step()
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps({"seen": seen, "steps": steps}))


@pytest.mark.slow
def test_stream_feeds_two_torch_trainer_ranks_different_patches(root, tmp_path):
    import sys

    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module

    cfg = data_config(patches_per_image=8, epoch_patches=240)
    scales = (2, 3, 4)
    trainer = TorchTrainer(
        _loop,
        train_loop_config={
            "data": {k: getattr(cfg, k) for k in ("root", "patch_size", "patches_per_image", "epoch_patches")},
            "scales": scales,
            "batch": 4,
            "out": str(tmp_path),
        },
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="data-test", storage_path=str(tmp_path / "runs")),
        datasets={"train": patches.patch_dataset(cfg, scales, seed=11)},
    )
    trainer.fit()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    steps = ranks[0]["steps"]
    assert steps == batches.batches_per_epoch(cfg, 4, 2, scales) == 28
    for r in ranks:
        assert len(r["seen"]) == 2 * steps * 4
    a, b = set(ranks[0]["seen"]), set(ranks[1]["seen"])
    assert len(a) == len(ranks[0]["seen"]) and len(b) == len(ranks[1]["seen"])  # no repeats within a rank
    assert not a & b  # the ranks saw different patches
    by_epoch = [{h.split("/")[0] for h in ranks[0]["seen"] if h.endswith(f"/{e}")} for e in range(2)]
    assert len(by_epoch[0] & by_epoch[1]) <= 1  # and fresh crops in the second epoch
