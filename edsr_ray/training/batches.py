"""The worker side of the patch stream: what a Ray Train worker loops over, and the validation images of rank 0.

* :func:`iter_training_batches` - single-scale float batches on the worker's device from its dataset shard, mixed
  across images by a small shuffle pool, the same number of batches on every rank (:func:`batches_per_epoch`), and
  under DDP one common scale per update (:class:`ScaleAgreement`, for MDSR).
* :func:`validation_images` - whole (or centre-cropped) validation images, read through the manifest.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from edsr_ray import storage as storage_lib
from edsr_ray.codecs import decode_rgb8
from edsr_ray.config import DataConfig
from edsr_ray.errors import EdsrRayError, ImageError
from edsr_ray.manifest import DIV2K, lr_column, read_manifest, select, split_range
from edsr_ray.storage import StorageConfig

if TYPE_CHECKING:
    import torch


class TrainingBatch(NamedTuple):
    """One single-scale training batch on the device: float (B, 3, H, W) in [0, 255]."""

    lr: torch.Tensor  # (B, 3, P, P)
    hr: torch.Tensor  # (B, 3, P*s, P*s)
    scale: int


def batches_per_epoch(cfg: DataConfig, batch_size: int, world_size: int, scales: Sequence[int]) -> int:
    """Batches of ``batch_size`` every rank is guaranteed to get from one epoch of the patch stream
    (:func:`~edsr_ray.training.patches.patch_dataset`). With shares of the global batch that differ by one patch,
    pass the largest share: the rank that takes it runs out first.

    Ray Train splits an epoch into ``epoch_patches // world_size`` rows per rank (``streaming_split(equal=True)``).
    With one scale that is ``rows // batch_size`` batches. With S scales a rank's rows may split unevenly over the
    scales, and each scale can leave up to ``batch_size - 1`` rows that do not fill a batch, so only
    ``(rows - (S - 1)(batch_size - 1)) // batch_size`` batches are certain; every rank must stop there, or DDP ranks
    would wait for each other forever.
    """
    rows = cfg.epoch_patches // world_size
    spare = (len(scales) - 1) * (batch_size - 1)
    return max(0, (rows - spare) // batch_size)


class _Pool:
    """Patches of one scale waiting to be batched: fixed arrays with swap-remove, so a draw copies only the batch."""

    def __init__(self) -> None:
        self.lr: np.ndarray | None = None
        self.hr: np.ndarray | None = None
        self.size = 0

    def push(self, lr: np.ndarray, hr: np.ndarray) -> None:
        k = len(lr)
        if self.lr is None or self.size + k > len(self.lr):
            capacity = max(2 * (self.size + k), 64)
            new_lr = np.empty((capacity, *lr.shape[1:]), dtype=lr.dtype)
            new_hr = np.empty((capacity, *hr.shape[1:]), dtype=hr.dtype)
            if self.lr is not None:
                new_lr[: self.size] = self.lr[: self.size]
                new_hr[: self.size] = self.hr[: self.size]
            self.lr, self.hr = new_lr, new_hr
        self.lr[self.size : self.size + k] = lr
        self.hr[self.size : self.size + k] = hr
        self.size += k

    def take(self, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        assert self.lr is not None and self.hr is not None and count <= self.size
        picked = rng.choice(self.size, size=count, replace=False)
        lr, hr = self.lr[picked], self.hr[picked]  # fancy indexing copies: (count, ...)
        # Fill the holes below the new size with the surviving rows above it.
        new_size = self.size - count
        holes = np.sort(picked[picked < new_size])
        tail = np.setdiff1d(np.arange(new_size, self.size), picked)
        self.lr[holes] = self.lr[tail]
        self.hr[holes] = self.hr[tail]
        self.size = new_size
        return lr, hr


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class ScaleAgreement:
    """Lets the DDP ranks of a multi-scale (MDSR) run train every update at one common scale, as the paper does.

    Without it each rank would draw its own scale: the shared body would still learn, but each upsampling branch would
    get its gradient averaged with the zeros of the ranks that did not use it. With it, before each batch the ranks
    exchange how many batches of each scale their pools can serve, each at its own share of the global batch (shares
    may differ by one patch: :func:`~edsr_ray.training.update.batch_share`; one small all-reduce on a CPU process
    group: no GPU sync) and all take the same scale, drawn by an RNG seeded alike on every rank among the scales every
    rank can serve, weighted by what the emptiest rank can serve. If no scale can be served yet, ranks that still
    have data read more; when none can, the epoch ends for all of them at the same batch.

    ``group``: a gloo process group (``torch.distributed.new_group(backend="gloo")`` when the default group is NCCL),
    or None for the default group when that is already gloo. ``seed`` must be equal on every rank.
    """

    MORE = -1  # decision: read more data, then ask again
    END = 0  # decision: the epoch is over for every rank

    def __init__(self, scales: Sequence[int], seed: int, group: Any = None) -> None:
        self.scales = tuple(int(s) for s in scales)
        self.rng = np.random.default_rng(seed)
        self.group = group

    def decide(self, sizes: Sequence[int], batch_size: int, exhausted: bool) -> int:
        """A scale every rank can batch now, or ``MORE`` / ``END`` (collective: every rank calls it in step)."""
        import torch
        import torch.distributed as dist

        # One MIN all-reduce carries both: the batches of each scale the emptiest rank can serve (``batch_size`` is
        # this rank's share), and -1 if any rank can still read.
        state = torch.tensor([*(size // batch_size for size in sizes), 0 if exhausted else -1], dtype=torch.int64)
        dist.all_reduce(state, op=dist.ReduceOp.MIN, group=self.group)
        eligible = state[:-1].numpy().astype(np.float64)
        anyone_reading = int(state[-1]) < 0
        if eligible.sum() > 0:
            return self.scales[int(self.rng.choice(len(self.scales), p=eligible / eligible.sum()))]
        return self.MORE if anyone_reading else self.END


def iter_training_batches(
    shard: Any,
    batch_size: int,
    scales: Sequence[int],
    *,
    device: torch.device | str | None = None,
    channels_last: bool = False,
    seed: int | None = None,
    num_batches: int | None = None,
    agreement: ScaleAgreement | None = None,
    shuffle_patches: int = 512,
    prefetch_blocks: int = 4,
) -> Iterator[TrainingBatch]:
    """One epoch of single-scale training batches from a Ray Train dataset shard (or a whole Dataset).

    ``shard`` is what ``ray.train.get_dataset_shard("train")`` returns for a
    :func:`~edsr_ray.training.patches.patch_dataset`. Patches are
    pooled per scale and batches drawn at random from the pool (at least ``shuffle_patches`` patches pooled before a
    draw while the stream lasts), which mixes several images into each batch; a batch's scale is that of a random
    pooled patch, so scales come out as often as the epoch holds them - equally often, as the datasource deals them
    out evenly. Each batch is ``batch_size`` patches of one scale, as float (B, 3, H, W) in [0, 255] on ``device``
    (see :func:`to_model_batch`); ``TrainingBatch`` unpacks as ``lr, hr, scale``.

    ``num_batches``: stop after that many batches and discard the rest of the epoch (it is still read, so that the
    ranks of a streaming split finish the epoch together). ``seed`` seeds the pool's draws (None: fresh entropy).

    With several scales under DDP the ranks must take the same number of steps: pass an ``agreement``
    (:class:`ScaleAgreement`, which also makes every update single-scale across the ranks, and ends the epoch for all
    ranks at once; ``num_batches`` is then a cap) or ``num_batches=batches_per_epoch(cfg.data, batch_size,
    world_size, scales)`` (each rank then draws its own scales and must reach that count).
    """
    scales = tuple(int(s) for s in scales)
    if batch_size < 1:
        raise EdsrRayError(f"batch_size must be >= 1, got {batch_size}")
    if num_batches is None and agreement is None and len(scales) > 1 and _world_size() > 1:
        raise EdsrRayError(
            "with several scales under DDP, ranks may hold different numbers of full single-scale batches; pass "
            "agreement=ScaleAgreement(...) or num_batches=batches_per_epoch(cfg.data, batch_size, world_size, "
            "scales) so every rank takes the same number of steps"
        )
    if agreement is not None and agreement.scales != scales:
        raise EdsrRayError(f"the agreement is for scales {list(agreement.scales)}, the batches for {list(scales)}")
    rng = np.random.default_rng(seed)
    pools = {s: _Pool() for s in scales}
    threshold = max(shuffle_patches, batch_size * len(scales))
    blocks = iter(shard.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=prefetch_blocks))
    exhausted = False

    def pull() -> None:
        """Pool the next block of the stream (or note that the stream has ended)."""
        nonlocal exhausted
        block = next(blocks, None)
        if block is None:
            exhausted = True
            return
        block_scales = np.asarray(block["scale"])
        for scale in np.unique(block_scales).tolist():
            if scale not in pools:
                raise EdsrRayError(f"the stream holds x{scale} patches but training expects scales {list(scales)}")
            rows = block_scales == scale
            lr, hr = block["lr"], block["hr"]
            pools[scale].push(lr if rows.all() else lr[rows], hr if rows.all() else hr[rows])

    def next_scale() -> int | None:
        """This batch's scale, reading from the stream as needed; None when the epoch is over."""
        while True:
            while not exhausted and sum(p.size for p in pools.values()) < threshold:
                pull()
            sizes = [pools[s].size for s in scales]
            if agreement is not None:
                decision = agreement.decide(sizes, batch_size, exhausted)
                if decision == ScaleAgreement.END:
                    return None
                if decision != ScaleAgreement.MORE:
                    return decision
            else:
                eligible = np.array([n if n >= batch_size else 0 for n in sizes], dtype=np.float64)
                if eligible.sum() > 0:
                    return scales[int(rng.choice(len(scales), p=eligible / eligible.sum()))]
                if exhausted:
                    return None
            if not exhausted:
                pull()

    emitted = 0
    while num_batches is None or emitted < num_batches:
        scale = next_scale()
        if scale is None:
            break
        lr, hr = pools[scale].take(batch_size, rng)
        emitted += 1
        lr_t, hr_t = to_model_batch({"lr": lr, "hr": hr}, device=device, channels_last=channels_last)
        yield TrainingBatch(lr_t, hr_t, scale)
    for _ in blocks:
        pass  # drain: finish the epoch, so that the ranks of a streaming split end it together
    if agreement is None and num_batches is not None and emitted < num_batches:
        raise EdsrRayError(
            f"the epoch ended after {emitted} batches, fewer than num_batches={num_batches}; compute it with "
            "batches_per_epoch() from the same epoch_patches, batch size and number of workers"
        )


def to_model_batch(
    batch: dict[str, Any], device: torch.device | str | None = None, channels_last: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 NHWC ``batch["lr"]``, ``batch["hr"]`` (numpy or torch) -> float NCHW in [0, 255] on ``device``.

    On an accelerator the uint8 tensors cross first (4x fewer bytes than float), from pinned memory so the copy is
    asynchronous, and are converted there. Permuting an NHWC tensor to NCHW gives exactly the channels_last memory
    layout, so ``channels_last=True`` costs no extra copy; otherwise the result is made contiguous.
    """
    import torch

    device = torch.device(device) if device is not None else torch.device("cpu")
    out = []
    for key in ("lr", "hr"):
        x = batch[key]  # (B, H, W, 3) uint8
        on_cpu = not isinstance(x, torch.Tensor) or x.device.type == "cpu"
        if device.type == "cpu" and on_cpu:
            # Convert in NumPy, in one single-threaded pass: torch would spread these small copies over its intra-op
            # threads, which costs several times the CPU of the copy itself (the trainer-side row of
            # benchmarks/bench_patches.py measures this path).
            x = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
            if channels_last:
                t = torch.from_numpy(x.astype(np.float32)).permute(0, 3, 1, 2)  # (B, 3, H, W), NHWC storage
            else:
                t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32))
        else:
            t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
            if t.device.type == "cpu" and device.type == "cuda":
                t = t.pin_memory()
            t = t.to(device, non_blocking=True).permute(0, 3, 1, 2).float()  # (B, 3, H, W), channels_last strides
            t = t if channels_last else t.contiguous()
        out.append(t)
    return out[0], out[1]


@dataclass(frozen=True, eq=False)
class ValidationImage:
    """One validation pair: ``hr`` is exactly ``lr`` x ``scale`` (HR cropped to that, as the protocol does)."""

    id: str
    dataset: str
    scale: int
    lr: np.ndarray  # (h, w, 3) uint8
    hr: np.ndarray  # (h*s, w*s, 3) uint8

    @property
    def protocol(self) -> str:
        """The evaluation protocol of :mod:`edsr_ray.metrics`: RGB for DIV2K, Y channel for benchmark sets."""
        return "div2k" if self.dataset == DIV2K else "benchmark"


def _centre_crop(lr: np.ndarray, hr: np.ndarray, scale: int, max_hr_side: int | None) -> tuple[np.ndarray, np.ndarray]:
    lh, lw = lr.shape[:2]
    ch, cw = lh, lw
    if max_hr_side is not None:
        ch, cw = min(lh, max_hr_side // scale), min(lw, max_hr_side // scale)
    y, x = (lh - ch) // 2, (lw - cw) // 2
    lr = lr[y : y + ch, x : x + cw]
    hr = hr[y * scale : (y + ch) * scale, x * scale : (x + cw) * scale]
    return np.ascontiguousarray(lr), np.ascontiguousarray(hr)


def validation_images(
    cfg: DataConfig,
    scales: Sequence[int],
    *,
    storage: StorageConfig | None = None,
    split: str = "valid",
    dataset: str = DIV2K,
    max_workers: int = 8,
) -> list[ValidationImage]:
    """The validation pairs for every scale, loaded here (meant for rank 0; a handful of images).

    ``split`` "valid" takes DIV2K ``cfg.val_range`` (paper: 801-810); other datasets are used whole (e.g.
    ``dataset="Set5"``). With ``cfg.val_max_size`` each pair is a centre crop whose HR side is at most that, aligned
    to the scale; otherwise whole images (HR cropped to LR x scale).
    """
    manifest = read_manifest(cfg.root, storage)
    index_range = split_range(cfg, split, dataset)
    jobs = []
    for scale in scales:
        rows = select(manifest, dataset, index_range, scale)
        if not len(rows):
            raise EdsrRayError(f"{cfg.root}: no {dataset} validation image in {index_range} at x{scale}")
        jobs += [(row, int(scale)) for row in rows.to_dict("records")]

    def load(job: tuple[dict[str, Any], int]) -> ValidationImage:
        row, scale = job
        hr_uri = storage_lib.join(cfg.root, row["hr_key"])
        lr_uri = storage_lib.join(cfg.root, row[lr_column(scale, "key")])
        hr = decode_rgb8(storage_lib.read_bytes(hr_uri, storage), hr_uri)
        lr = decode_rgb8(storage_lib.read_bytes(lr_uri, storage), lr_uri)
        lr, hr = _centre_crop(lr, hr, scale, cfg.val_max_size)
        if hr.shape[:2] != (lr.shape[0] * scale, lr.shape[1] * scale):
            raise ImageError(f"{hr_uri}: HR is smaller than {lr_uri} x{scale}")
        return ValidationImage(str(row["id"]), dataset, scale, lr, hr)

    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        return list(pool.map(load, jobs))
