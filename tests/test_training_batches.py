"""edsr_ray.training.batches: single-scale batches from the patch stream, the ranks' agreement on each batch's scale,
the model layout of a batch, and the validation images of rank 0."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import numpy as np
import pytest
import torch
from sample_data import data_config, max_interior_error

from edsr_ray import manifest, storage
from edsr_ray.errors import EdsrRayError
from edsr_ray.training import batches, patches


@pytest.fixture(scope="module")
def root(sample_root, ray_data) -> str:
    return sample_root


@pytest.mark.slow
def test_mdsr_batches_hold_one_scale_drawn_evenly(root):
    cfg = data_config(patches_per_image=8, epoch_patches=960)
    scales = (2, 3, 4)
    ds = patches.patch_dataset(cfg, scales, seed=3)
    batch = 8
    seen = []
    for lr, hr, scale in batches.iter_training_batches(ds, batch, scales, seed=0):
        assert lr.shape == (batch, 3, 24, 24) and hr.shape == (batch, 3, 24 * scale, 24 * scale)
        assert lr.dtype == torch.float32 and float(lr.min()) >= 0 and float(hr.max()) <= 255
        # Single scale for real: the HR patches shrink onto their LR patches at this batch's scale (a pair of
        # another scale would be off by far more than a grey level). Two per batch keep the test fast.
        for i in (0, batch - 1):
            lr_i = lr[i].permute(1, 2, 0).numpy().astype(np.uint8)
            hr_i = hr[i].permute(1, 2, 0).numpy().astype(np.uint8)
            assert max_interior_error(lr_i, hr_i, scale) <= 1
        seen.append(scale)
    assert len(seen) >= batches.batches_per_epoch(cfg, batch, 1, scales) == 118
    counts = np.array([seen.count(s) for s in scales])
    expected = len(seen) / 3
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 9.21, counts  # the 1% critical value with 2 degrees of freedom
    switches = sum(a != b for a, b in itertools.pairwise(seen))
    assert switches > len(seen) / 3, seen  # interleaved, not in runs (independent draws switch 2/3 of the time)

    exact = list(batches.iter_training_batches(ds, batch, scales, num_batches=90))
    assert len(exact) == 90
    with pytest.raises(EdsrRayError, match="fewer than num_batches"):
        list(batches.iter_training_batches(ds, batch, scales, num_batches=1000))


_AGREEMENT_RANK = """
import json, sys
import numpy as np
import torch.distributed as dist
from edsr_ray import manifest
from edsr_ray.training import batches, patches

rank, port, out, share = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
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
agreement = batches.ScaleAgreement((2, 3, 4), seed=5, group=dist.new_group(backend="gloo"))
seen = []
for lr, hr, scale in batches.iter_training_batches(Shard(blocks), share, (2, 3, 4), seed=rank, agreement=agreement,
                                                shuffle_patches=8):
    assert hr.shape[-1] == 4 * scale and lr.shape[-1] == 4 and len(lr) == share
    seen.append([scale, sorted(int(v) for v in lr[:, 0, 0, 0])])
json.dump(seen, open(out, "w"))
"""


@pytest.mark.parametrize(
    ("shares", "expected"),
    [
        # Everything both ranks can serve is used: x2 (40 on rank 0), x3 (24 on both); x4 (rank 1 only) never.
        ((4, 4), {2: 10, 3: 6}),
        # Unequal shares of a global batch of 8 (as an elastic group of 2 splits 9, or any odd batch): the rank
        # taking 5 can serve 8 x2 and 4 x3 batches, the rank taking 3 more; both stop at what rank 0 can serve.
        ((5, 3), {2: 8, 3: 4}),
    ],
)
def test_ranks_agree_on_every_batch_scale_whatever_their_shards_hold(tmp_path, shares, expected):
    import subprocess
    import sys

    from edsr_ray.infra.localcluster import free_ports

    script = tmp_path / "rank.py"
    script.write_text(_AGREEMENT_RANK)
    (port,) = free_ports(1)
    procs = [
        subprocess.Popen([sys.executable, str(script), str(r), str(port), str(tmp_path / f"{r}.json"), str(shares[r])])
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
    assert Counter(scales[0]) == expected
    for rank, share in zip(seen, shares):
        ids = [i for _, batch in rank for i in batch]
        assert len(ids) == len(set(ids)) == share * sum(expected.values())  # no patch twice


def test_to_model_batch_layouts():
    rng = np.random.default_rng(0)
    batch = {"lr": rng.integers(0, 256, (4, 6, 5, 3), dtype=np.uint8), "hr": rng.integers(0, 256, (4, 12, 10, 3))}
    batch["hr"] = batch["hr"].astype(np.uint8)
    lr, hr = batches.to_model_batch(batch, "cpu", channels_last=True)
    assert lr.shape == (4, 3, 6, 5) and hr.shape == (4, 3, 12, 10) and lr.dtype == torch.float32
    assert lr.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_array_equal(lr.numpy(), batch["lr"].transpose(0, 3, 1, 2).astype(np.float32))
    lr2, hr2 = batches.to_model_batch({k: torch.from_numpy(v) for k, v in batch.items()}, None, channels_last=False)
    assert lr2.is_contiguous() and torch.equal(lr2, lr) and torch.equal(hr2, hr)


def test_validation_images(root):
    frame = manifest.read_manifest(root).set_index("id")
    images = batches.validation_images(data_config(), (2, 4))
    assert [(v.id, v.scale) for v in images] == [("0801", 2), ("0802", 2), ("0801", 4), ("0802", 4)]
    for v in images:
        assert v.protocol == "div2k" and v.lr.dtype == np.uint8
        assert v.hr.shape == (v.lr.shape[0] * v.scale, v.lr.shape[1] * v.scale, 3)
        row = frame.loc[v.id]
        assert v.lr.shape[:2] == (row[f"lr_x{v.scale}_height"], row[f"lr_x{v.scale}_width"])
        stored = patches.decode_rgb8(storage.read_bytes(f"{root}/{row['hr_key']}"), "hr")
        np.testing.assert_array_equal(v.hr, stored[: v.hr.shape[0], : v.hr.shape[1]])

    cropped = batches.validation_images(data_config(val_max_size=100), (3,))
    for v in cropped:
        assert max(v.hr.shape[:2]) <= 100 and v.hr.shape[0] == 3 * v.lr.shape[0] == 99
        assert max_interior_error(v.lr, v.hr, 3) <= 1  # a centre crop still aligned to the scale
