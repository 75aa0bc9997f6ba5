"""The manifest helpers and the patch stream, against a dataset ingested into the embedded S3 server."""

from __future__ import annotations

import hashlib
import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from edsr_ray import data, storage
from edsr_ray.config import DataConfig
from edsr_ray.errors import EdsrRayError
from edsr_ray.imaging import imresize

ROOT = "s3://edsr/data-tests/div2k"


@pytest.fixture(scope="module")
def ray_local(s3):
    """Local Ray with 4 logical CPUs on the 2-core machine: 2 for Train workers, the rest for Ray Data."""
    import ray

    ray.init(address="local", num_cpus=4, object_store_memory=300 * 2**20, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def root(sample_div2k, ray_local) -> str:
    from edsr_ray.ingest import ingest

    report = ingest([str(sample_div2k)], ROOT, progress=False)
    assert report.failed == []
    return ROOT


def _cfg(**overrides) -> DataConfig:
    values = dict(root=ROOT, patch_size=24, patches_per_image=16, epoch_patches=192)
    values.update(overrides)
    return DataConfig(**values)


def _hashes(ds) -> Counter:
    return Counter(
        hashlib.sha1(block["lr"][i].tobytes() + block["hr"][i].tobytes()).hexdigest()
        for block in ds.iter_batches(batch_size=None, batch_format="numpy")
        for i in range(len(block["lr"]))
    )


def _max_interior_error(lr: np.ndarray, hr: np.ndarray, scale: int, margin: int = 3) -> int:
    """How far ``imresize(hr, 1/scale)`` is from ``lr``, away from the patch border.

    The border is skipped because the bicubic kernel, stretched to 4*scale HR pixels when shrinking, reaches two LR
    pixels beyond the patch: near its edges the stored LR saw image content the crop no longer has (imresize
    mirrors the crop instead). Both axis orders are tried because imresize rounds (and clips) to uint8 between its
    two 1-D passes, rows first: a transposed patch was resized columns first, which can differ by a few grey levels
    near saturated pixels. Flips commute with the resize exactly.
    """
    inner = (slice(margin, -margin), slice(margin, -margin))
    as_stored = np.abs(imresize(hr, 1 / scale).astype(int) - lr)[inner].max()
    transposed = np.abs(imresize(hr.swapaxes(0, 1), 1 / scale).swapaxes(0, 1).astype(int) - lr)[inner].max()
    return int(min(as_stored, transposed))


# --------------------------------------------------------------------------------------------------------------------
# Manifest


def test_manifest_select_and_checks(root, tmp_path):
    manifest = data.read_manifest(root)
    assert tuple(manifest.columns) == data.MANIFEST_COLUMNS
    train = data.select(manifest, "DIV2K", (1, 800), 2)
    assert train["id"].tolist() == ["0001", "0002", "0003", "0004", "0005", "0006"]
    assert data.select(manifest, "DIV2K", (801, 810), 4)["id"].tolist() == ["0801", "0802"]
    assert data.select(manifest, "DIV2K", (2, 3))["index"].tolist() == [2, 3]
    assert len(data.select(manifest, "DIV2K", split="valid")) == 2
    assert len(data.select(manifest, "Set5")) == 0

    counts = data.check_dataset(_cfg(), (2, 3, 4))
    assert counts == {f"{split}_x{s}": n for split, n in (("train", 6), ("valid", 2)) for s in (2, 3, 4)}
    with pytest.raises(EdsrRayError, match=r"no DIV2K image in index range \[1, 800\] for train at x4 with LR"):
        data.check_dataset(_cfg(patch_size=100), (4,))  # the tallest training x4 LR is 84 px
    with pytest.raises(EdsrRayError, match=r"index range \[900, 910\]"):
        data.check_dataset(_cfg(val_range=(900, 910)), (2,))
    with pytest.raises(EdsrRayError, match=r"jobs/ingest\.py"):
        data.read_manifest(str(tmp_path))


# --------------------------------------------------------------------------------------------------------------------
# Cutting patches (no Ray)


def test_cut_patches_are_the_crops_at_their_positions(photos):
    hr = photos["astronaut"][:480, :504]
    for scale in (2, 3, 4):
        lr = imresize(hr, 1 / scale)
        p = data.cut_patches(lr, hr, scale, 200, 24, np.random.default_rng(scale), augment=True)
        assert p.lr.shape == (200, 24, 24, 3) and p.hr.shape == (200, 24 * scale, 24 * scale, 3)
        assert set(p.transforms.tolist()) == set(range(8))
        for i in range(200):
            y, x = p.positions[i]
            code = int(p.transforms[i])
            np.testing.assert_array_equal(data.invert_transform(p.lr[i], code), lr[y : y + 24, x : x + 24])
            hr_crop = hr[y * scale : (y + 24) * scale, x * scale : (x + 24) * scale]
            np.testing.assert_array_equal(data.invert_transform(p.hr[i], code), hr_crop)
        plain = data.cut_patches(lr, hr, scale, 10, 24, np.random.default_rng(0), augment=False)
        assert not plain.transforms.any()
    with pytest.raises(Exception, match="smaller than the 24x24 patch"):
        data.cut_patches(lr[:20], hr, 4, 1, 24, np.random.default_rng(0))


# --------------------------------------------------------------------------------------------------------------------
# The stream


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_stream_pairs_are_aligned(root, scale):
    ds = data.patch_dataset(_cfg(epoch_patches=96), (scale,), seed=scale)
    n = 0
    for block in ds.iter_batches(batch_size=None, batch_format="numpy"):
        assert block["lr"].dtype == np.uint8 and block["hr"].dtype == np.uint8
        assert block["lr"].shape[1:] == (24, 24, 3) and block["hr"].shape[1:] == (24 * scale, 24 * scale, 3)
        assert (block["scale"] == scale).all()
        for lr, hr in zip(block["lr"], block["hr"]):
            assert _max_interior_error(lr, hr, scale) <= 1
            n += 1
    assert n == 96


def test_epochs_are_fresh_and_seeds_reproduce(root):
    cfg = _cfg()
    ds = data.patch_dataset(cfg, (2,), seed=7)
    first, second = _hashes(ds), _hashes(ds)
    assert sum(first.values()) == sum(second.values()) == cfg.epoch_patches
    assert len(first & second) <= 2  # new crops (a collision among ~2e5 positions x 8 transforms is rare)

    again = data.patch_dataset(cfg, (2,), seed=7)
    assert _hashes(again) == first and _hashes(again) == second  # same seed: the same sequence of epochs
    other = data.patch_dataset(cfg, (2,), seed=8)
    assert len(_hashes(other) & first) <= 2
    unseeded = data.patch_dataset(cfg, (2,))
    assert len(_hashes(unseeded) & first) <= 2


def test_plan_uses_every_image_and_deals_scales_evenly(root):
    cfg = _cfg(epoch_patches=6 * 16 * 3)
    source = data.PatchDatasource(
        data._image_table(cfg, (2, 3, 4), "train", "DIV2K", None),
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

    long_epoch = data.PatchDatasource(
        source._images, epoch_patches=2500 * 16, patches_per_image=16, patch_size=24, augment=True, seed=1, storage=None
    )
    tasks = long_epoch.get_read_tasks(4)
    assert len(tasks) == 1250 and sum(t.metadata.num_rows for t in tasks) == 2500 * 16  # two images per task


@pytest.mark.slow
def test_mdsr_batches_hold_one_scale_drawn_evenly(root):
    cfg = _cfg(patches_per_image=8, epoch_patches=960)
    scales = (2, 3, 4)
    ds = data.patch_dataset(cfg, scales, seed=3)
    batch = 8
    seen = []
    for lr, hr, scale in data.iter_training_batches(ds, batch, scales, seed=0):
        assert lr.shape == (batch, 3, 24, 24) and hr.shape == (batch, 3, 24 * scale, 24 * scale)
        assert lr.dtype == torch.float32 and float(lr.min()) >= 0 and float(hr.max()) <= 255
        # Single scale for real: the HR patches shrink onto their LR patches at this batch's scale (a pair of
        # another scale would be off by far more than a grey level). Two per batch keep the test fast.
        for i in (0, batch - 1):
            lr_i = lr[i].permute(1, 2, 0).numpy().astype(np.uint8)
            hr_i = hr[i].permute(1, 2, 0).numpy().astype(np.uint8)
            assert _max_interior_error(lr_i, hr_i, scale) <= 1
        seen.append(scale)
    assert len(seen) >= data.batches_per_epoch(cfg, batch, 1, scales) == 118
    counts = np.array([seen.count(s) for s in scales])
    expected = len(seen) / 3
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 9.21, counts  # the 1% critical value with 2 degrees of freedom
    switches = sum(a != b for a, b in itertools.pairwise(seen))
    assert switches > len(seen) / 3, seen  # interleaved, not in runs (independent draws switch 2/3 of the time)

    exact = list(data.iter_training_batches(ds, batch, scales, num_batches=90))
    assert len(exact) == 90
    with pytest.raises(EdsrRayError, match="fewer than num_batches"):
        list(data.iter_training_batches(ds, batch, scales, num_batches=1000))


_AGREEMENT_RANK = """
import json, sys
import numpy as np
import torch.distributed as dist
from edsr_ray import data

rank, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)


class Shard:  # what iter_training_batches reads from a Ray Train dataset shard
    def __init__(self, blocks):
        self.blocks = blocks

    def iter_batches(self, **kwargs):
        return iter(self.blocks)


next_id = 100 * rank


def block(scale, n):
    global next_id
    ids = np.arange(next_id, next_id + n, dtype=np.uint8)
    next_id += n
    lr = np.broadcast_to(ids[:, None, None, None], (n, 4, 4, 3))
    hr = np.broadcast_to(ids[:, None, None, None], (n, 4 * scale, 4 * scale, 3))
    return {"lr": lr, "hr": hr, "scale": np.full(n, scale)}


# The shards disagree as much as they can: rank 0 streams its x2 patches first, rank 1 its x3 ones; only rank 1
# holds x4 patches, and the ranks hold different amounts.
if rank == 0:
    blocks = [block(2, 8) for _ in range(5)] + [block(3, 8) for _ in range(3)]
else:
    blocks = [block(3, 8) for _ in range(3)] + [block(4, 8) for _ in range(2)] + [block(2, 8) for _ in range(6)]
agreement = data.ScaleAgreement((2, 3, 4), seed=5, group=dist.new_group(backend="gloo"))
seen = []
for lr, hr, scale in data.iter_training_batches(Shard(blocks), 4, (2, 3, 4), seed=rank, agreement=agreement,
                                                shuffle_patches=8):
    assert hr.shape[-1] == 4 * scale and lr.shape[-1] == 4
    seen.append([scale, sorted(int(v) for v in lr[:, 0, 0, 0])])
json.dump(seen, open(out, "w"))
"""


def test_ranks_agree_on_every_batch_scale_whatever_their_shards_hold(tmp_path):
    import subprocess
    import sys

    from edsr_ray.infra.localcluster import free_ports

    script = tmp_path / "rank.py"
    script.write_text(_AGREEMENT_RANK)
    (port,) = free_ports(1)
    procs = [
        subprocess.Popen([sys.executable, str(script), str(r), str(port), str(tmp_path / f"{r}.json")])
        for r in range(2)
    ]
    try:
        for proc in procs:
            assert proc.wait(timeout=120) == 0  # a disagreement would hang a collective, then time out
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    seen = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    scales = [[scale for scale, _ in rank] for rank in seen]
    assert scales[0] == scales[1]  # the same scale at every update on both ranks
    # Everything both ranks can serve is used: x2 (40 on rank 0), x3 (24 on both); x4 (rank 1 only) never.
    assert Counter(scales[0]) == {2: 10, 3: 6}
    for rank in seen:
        ids = [i for _, batch in rank for i in batch]
        assert len(ids) == len(set(ids)) == 64  # no patch twice


def test_to_model_batch_layouts():
    rng = np.random.default_rng(0)
    batch = {"lr": rng.integers(0, 256, (4, 6, 5, 3), dtype=np.uint8), "hr": rng.integers(0, 256, (4, 12, 10, 3))}
    batch["hr"] = batch["hr"].astype(np.uint8)
    lr, hr = data.to_model_batch(batch, "cpu", channels_last=True)
    assert lr.shape == (4, 3, 6, 5) and hr.shape == (4, 3, 12, 10) and lr.dtype == torch.float32
    assert lr.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_array_equal(lr.numpy(), batch["lr"].transpose(0, 3, 1, 2).astype(np.float32))
    lr2, hr2 = data.to_model_batch({k: torch.from_numpy(v) for k, v in batch.items()}, None, channels_last=False)
    assert lr2.is_contiguous() and torch.equal(lr2, lr) and torch.equal(hr2, hr)


def test_validation_images(root):
    manifest = data.read_manifest(root).set_index("id")
    images = data.validation_images(_cfg(), (2, 4))
    assert [(v.id, v.scale) for v in images] == [("0801", 2), ("0802", 2), ("0801", 4), ("0802", 4)]
    for v in images:
        assert v.protocol == "div2k" and v.lr.dtype == np.uint8
        assert v.hr.shape == (v.lr.shape[0] * v.scale, v.lr.shape[1] * v.scale, 3)
        row = manifest.loc[v.id]
        assert v.lr.shape[:2] == (row[f"lr_x{v.scale}_height"], row[f"lr_x{v.scale}_width"])
        stored = data.decode_rgb8(storage.read_bytes(f"{root}/{row['hr_key']}"), "hr")
        np.testing.assert_array_equal(v.hr, stored[: v.hr.shape[0], : v.hr.shape[1]])

    cropped = data.validation_images(_cfg(val_max_size=100), (3,))
    for v in cropped:
        assert max(v.hr.shape[:2]) <= 100 and v.hr.shape[0] == 3 * v.lr.shape[0] == 99
        assert _max_interior_error(v.lr, v.hr, 3) <= 1  # a centre crop still aligned to the scale


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
    steps = data.batches_per_epoch(cfg, config["batch"], world, scales)
    seen: list[str] = []
    for epoch in range(2):
        for lr, hr, scale in data.iter_training_batches(shard, config["batch"], scales, seed=rank, num_batches=steps):
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

    cfg = _cfg(patches_per_image=8, epoch_patches=240)
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
        datasets={"train": data.patch_dataset(cfg, scales, seed=11)},
    )
    trainer.fit()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    steps = ranks[0]["steps"]
    assert steps == data.batches_per_epoch(cfg, 4, 2, scales) == 28
    for r in ranks:
        assert len(r["seen"]) == 2 * steps * 4
    a, b = set(ranks[0]["seen"]), set(ranks[1]["seen"])
    assert len(a) == len(ranks[0]["seen"]) and len(b) == len(ranks[1]["seen"])  # no repeats within a rank
    assert not a & b  # the ranks saw different patches
    by_epoch = [{h.split("/")[0] for h in ranks[0]["seen"] if h.endswith(f"/{e}")} for e in range(2)]
    assert len(by_epoch[0] & by_epoch[1]) <= 1  # and fresh crops in the second epoch
