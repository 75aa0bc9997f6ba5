"""The Ray Data stream of aligned LR/HR training patches, read from a dataset root through its manifest.

:func:`patch_dataset` is a ``ray.data.Dataset`` of ``epoch_patches`` random aligned patch pairs: ``lr`` uint8
(P, P, 3), ``hr`` uint8 (P*s, P*s, 3) cut at the same place, ``scale``. Every pass over it (every ``iter_batches`` /
``iter_torch_batches`` call, i.e. every epoch) cuts fresh crops. The worker side, which turns the stream into
batches, is :mod:`edsr_ray.training.batches`; the manifest is :mod:`edsr_ray.manifest`.

Speed: decoding a 2K image costs far more than cutting a patch from it, so each read task decodes one HR/LR pair and
cuts ``patches_per_image`` patches from it (the rates, and what one decode per patch would give instead:
``benchmarks/bench_patches.py``, figures in ``benchmarks/RESULTS.md``). Decoded images are deliberately not cached:
decoding is most of the read work, so a cache could win a small factor at most, for ~10 MB of memory per image and
scale (8+ GB for DIV2K), while the stream already has the margin it needs.

Randomness: the epoch's plan (which images, which scale, every crop) is drawn when Ray Data asks the datasource for
its read tasks, which happens once per execution, in the one process that drives the execution (the driver, or the
split coordinator that feeds all Ray Train ranks). Ranks therefore receive disjoint parts of one plan instead of
replaying the same random sequence, and each epoch differs from the last. With ``seed=None`` every plan is drawn from
fresh OS entropy (a restarted job does not replay its crops); with an integer seed the sequence of epochs is
reproducible for a given sequence of reads.
"""

from __future__ import annotations

import functools
import logging
import math
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from ray.data.block import BlockAccessor, BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from edsr_ray import storage as storage_lib
from edsr_ray.codecs import decode_rgb8
from edsr_ray.config import DataConfig
from edsr_ray.errors import EdsrRayError, ImageError
from edsr_ray.manifest import DIV2K, fits_patch, lr_column, read_manifest, select, split_range
from edsr_ray.storage import StorageConfig

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Read tasks per epoch at most; longer epochs put several images in one task.
MAX_READ_TASKS = 2000


# --------------------------------------------------------------------------------------------------------------------
# Decoding and cutting


def apply_transform(patch: np.ndarray, code: int) -> np.ndarray:
    """One of the 8 flips/rotations of an (H, W, C) patch: bit 2 transposes, bit 0 flips left-right, bit 1 up-down.

    Returns a view; the same code applied to the LR and HR patch keeps them aligned.
    """
    if code & 4:
        patch = patch.swapaxes(0, 1)
    if code & 1:
        patch = patch[:, ::-1]
    if code & 2:
        patch = patch[::-1]
    return patch


def invert_transform(patch: np.ndarray, code: int) -> np.ndarray:
    """Undo :func:`apply_transform` (flips first, then the transpose)."""
    if code & 2:
        patch = patch[::-1]
    if code & 1:
        patch = patch[:, ::-1]
    if code & 4:
        patch = patch.swapaxes(0, 1)
    return patch


class Patches(NamedTuple):
    """Aligned patches cut from one LR/HR pair, with where they came from (for tests and debugging)."""

    lr: np.ndarray  # (N, P, P, 3) uint8
    hr: np.ndarray  # (N, P*s, P*s, 3) uint8
    positions: np.ndarray  # (N, 2) top-left (y, x) in LR pixels; the HR patch starts at (y*s, x*s)
    transforms: np.ndarray  # (N,) apply_transform codes (all 0 without augmentation)


def cut_patches(
    lr: np.ndarray,
    hr: np.ndarray,
    scale: int,
    count: int,
    patch_size: int,
    rng: np.random.Generator,
    *,
    augment: bool = True,
) -> Patches:
    """Cut ``count`` random aligned pairs: LR (P, P) at (y, x) and HR (P*s, P*s) at (y*s, x*s), same flip/rotation.

    ``hr`` must cover at least ``lr`` x ``scale`` from its top-left corner (extra HR rows/columns beyond that, as in
    HR images whose size is not a multiple of the scale, are never used).
    """
    lh, lw = lr.shape[:2]
    if hr.shape[0] < lh * scale or hr.shape[1] < lw * scale:
        raise ImageError(f"HR {hr.shape[1]}x{hr.shape[0]} is smaller than LR {lw}x{lh} times {scale}")
    if lh < patch_size or lw < patch_size:
        raise ImageError(f"LR {lw}x{lh} is smaller than the {patch_size}x{patch_size} patch")
    p, hp = patch_size, patch_size * scale
    ys = rng.integers(0, lh - p + 1, size=count)
    xs = rng.integers(0, lw - p + 1, size=count)
    codes = rng.integers(0, 8, size=count) if augment else np.zeros(count, dtype=np.int64)
    out_lr = np.empty((count, p, p, 3), dtype=np.uint8)  # (N, P, P, 3)
    out_hr = np.empty((count, hp, hp, 3), dtype=np.uint8)  # (N, P*s, P*s, 3)
    for i, (y, x, code) in enumerate(zip(ys.tolist(), xs.tolist(), codes.tolist())):
        out_lr[i] = apply_transform(lr[y : y + p, x : x + p], code)
        out_hr[i] = apply_transform(hr[y * scale : y * scale + hp, x * scale : x * scale + hp], code)
    return Patches(out_lr, out_hr, np.stack([ys, xs], axis=1), codes)


# --------------------------------------------------------------------------------------------------------------------
# The patch datasource


@dataclass(frozen=True)
class _Image:
    """One LR/HR pair usable at one scale (what a read task needs to fetch and check it)."""

    hr_uri: str
    lr_uri: str
    lr_width: int
    lr_height: int


@dataclass(frozen=True)
class _Unit:
    """One read task: decode one pair, cut ``count`` patches with the RNG seeded by ``(entropy, number)``."""

    image: _Image
    scale: int
    count: int
    entropy: int
    number: int


def _read_unit(unit: _Unit, patch_size: int, augment: bool, cfg: StorageConfig | None) -> Any:
    """Fetch + decode one LR/HR pair and cut the unit's patches into one block (runs in a Ray Data read task)."""
    image, s = unit.image, unit.scale
    hr = decode_rgb8(storage_lib.read_bytes(image.hr_uri, cfg), image.hr_uri)
    lr = decode_rgb8(storage_lib.read_bytes(image.lr_uri, cfg), image.lr_uri)
    if lr.shape[:2] != (image.lr_height, image.lr_width):
        raise ImageError(
            f"{image.lr_uri}: {lr.shape[1]}x{lr.shape[0]} but the manifest says {image.lr_width}x{image.lr_height}; "
            "re-run the ingest"
        )
    rng = np.random.default_rng(np.random.SeedSequence(unit.entropy, spawn_key=(1, unit.number)))
    try:
        patches = cut_patches(lr, hr, s, unit.count, patch_size, rng, augment=augment)
    except ImageError as exc:
        raise ImageError(f"{image.hr_uri} / {image.lr_uri}: {exc}") from None
    batch = {"lr": patches.lr, "hr": patches.hr, "scale": np.full(unit.count, s, dtype=np.int64)}
    return BlockAccessor.batch_to_block(batch)


def _read_units(units: Sequence[_Unit], patch_size: int, augment: bool, cfg: StorageConfig | None) -> Iterator[Any]:
    for unit in units:
        yield _read_unit(unit, patch_size, augment, cfg)


class PatchDatasource(Datasource):
    """Ray Data source of random aligned patch pairs; each execution (epoch) draws a new plan.

    The plan: ``ceil(epoch_patches / patches_per_image)`` units, scales dealt out as evenly as possible in random
    order (so in MDSR mode every scale gets the same share of each epoch), images taken per scale from a fresh random
    permutation (every image is used before any repeats); each unit is one block of patches and, up to
    :data:`MAX_READ_TASKS` per epoch, one read task.
    """

    def __init__(
        self,
        images: dict[int, list[_Image]],
        *,
        epoch_patches: int,
        patches_per_image: int,
        patch_size: int,
        augment: bool,
        seed: int | None,
        storage: StorageConfig | None,
    ):
        super().__init__()
        self._images = images
        self._epoch_patches = epoch_patches
        self._per_image = patches_per_image
        self._patch_size = patch_size
        self._augment = augment
        self._seed = seed
        self._storage = storage
        # Executions so far. A one-element list so that shallow copies of this object (which Ray's planner may make)
        # keep counting together; a new plan per call is what makes every epoch's crops fresh.
        self._calls = [0]

    @property
    def scales(self) -> tuple[int, ...]:
        return tuple(self._images)

    def num_units(self) -> int:
        return math.ceil(self._epoch_patches / self._per_image)

    def estimate_inmemory_data_size(self) -> int:
        per_patch = np.mean([3 * self._patch_size**2 * (1 + s * s) for s in self._images])
        return int(self._epoch_patches * per_patch)

    def plan(self, entropy: int) -> list[_Unit]:
        """The units of one epoch, fully determined by ``entropy``."""
        rng = np.random.default_rng(np.random.SeedSequence(entropy, spawn_key=(0,)))
        n = self.num_units()
        counts = [self._per_image] * (n - 1) + [self._epoch_patches - self._per_image * (n - 1)]
        scales = list(self._images)
        unit_scales = [scales[i] for i in rng.permutation(np.arange(n) % len(scales)).tolist()]
        queues: dict[int, list[int]] = {s: [] for s in scales}
        units = []
        for number, (scale, count) in enumerate(zip(unit_scales, counts)):
            if not queues[scale]:
                queues[scale] = rng.permutation(len(self._images[scale])).tolist()
            image = self._images[scale][queues[scale].pop()]
            units.append(_Unit(image, scale, count, entropy, number))
        return units

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None
    ) -> list[ReadTask]:
        call = self._calls[0]
        self._calls[0] += 1
        # A 128-bit entropy per plan: from the seed and the call number (reproducible), or from the OS.
        entropy = self._seed * 2**64 + call if self._seed is not None else secrets.randbits(128)
        units = self.plan(entropy)
        # One unit per read task, unless an epoch is so long that scheduling that many tasks would cost more than
        # it spreads: then consecutive units share a task (each still one block).
        per_task = math.ceil(len(units) / MAX_READ_TASKS)
        size = self.estimate_inmemory_data_size() / self._epoch_patches
        tasks = []
        for start in range(0, len(units), per_task):
            group = units[start : start + per_task]
            rows = sum(u.count for u in group)
            meta = BlockMetadata(num_rows=rows, size_bytes=int(size * rows), input_files=None, exec_stats=None)
            fn = functools.partial(_read_units, group, self._patch_size, self._augment, self._storage)
            tasks.append(ReadTask(fn, meta, per_task_row_limit=per_task_row_limit))
        return tasks


def _image_table(
    cfg: DataConfig,
    scales: Sequence[int],
    split: str,
    dataset: str,
    storage: StorageConfig | None,
) -> dict[int, list[_Image]]:
    manifest = read_manifest(cfg.root, storage)
    index_range = split_range(cfg, split, dataset)
    images: dict[int, list[_Image]] = {}
    for scale in scales:
        rows = select(manifest, dataset, index_range, scale)
        too_small = len(rows) - int(fits_patch(rows, scale, cfg.patch_size).sum())
        rows = rows[fits_patch(rows, scale, cfg.patch_size)]
        if too_small:
            log.warning(
                "x%d: skipping %d images whose LR is smaller than the %d px patch", scale, too_small, cfg.patch_size
            )
        if not len(rows):
            what = f"index range {list(index_range)}" if index_range else "the dataset"
            raise EdsrRayError(
                f"{cfg.root}: no {dataset} image in {what} has an LR image at x{scale} of at least "
                f"{cfg.patch_size}x{cfg.patch_size} pixels"
            )
        images[scale] = [
            _Image(
                storage_lib.join(cfg.root, row["hr_key"]),
                storage_lib.join(cfg.root, row[lr_column(scale, "key")]),
                int(row[lr_column(scale, "width")]),
                int(row[lr_column(scale, "height")]),
            )
            for row in rows.to_dict("records")
        ]
    return images


def patch_dataset(
    cfg: DataConfig,
    scales: Sequence[int],
    *,
    storage: StorageConfig | None = None,
    split: str = "train",
    seed: int | None = None,
    dataset: str = DIV2K,
    num_cpus: float = 1.0,
) -> ray.data.Dataset:
    """A Ray Data dataset of ``cfg.epoch_patches`` random aligned patch pairs per pass, from the manifest at
    ``cfg.root``.

    Columns: ``lr`` uint8 (P, P, 3), ``hr`` uint8 (P*s, P*s, 3), ``scale`` int64, with P = ``cfg.patch_size``; one
    block holds ``cfg.patches_per_image`` patches of one image at one scale (with several scales, blocks of
    different scales have different HR shapes: batch them with :func:`iter_training_batches`, which never mixes
    scales). Images: ``split`` "train" uses ``cfg.train_range``, "valid" ``cfg.val_range`` (DIV2K numbers); other
    datasets are used whole. Augmentation (``cfg.augment``): random hflip, vflip and transpose, the same on LR and HR.

    ``seed=None`` draws every epoch from fresh entropy; an integer makes the sequence of epochs reproducible (e.g.
    ``seed=cfg.seed``). Pass the dataset to ``TorchTrainer(datasets={"train": ...})``: the randomness lives in the
    one execution that Ray Train splits over the ranks, so ranks never see the same crops.
    ``num_cpus`` is reserved per read task (decode + cut).
    """
    import ray.data

    scales = tuple(int(s) for s in scales)
    if not scales:
        raise EdsrRayError("patch_dataset needs at least one scale")
    images = _image_table(cfg, scales, split, dataset, storage)
    source = PatchDatasource(
        images,
        epoch_patches=cfg.epoch_patches,
        patches_per_image=cfg.patches_per_image,
        patch_size=cfg.patch_size,
        augment=cfg.augment,
        seed=seed,
        storage=storage,
    )
    log.info(
        "patch stream from %s: %s, %d patches per epoch in %d blocks",
        cfg.root,
        ", ".join(f"x{s}: {len(v)} images" for s, v in images.items()),
        cfg.epoch_patches,
        source.num_units(),
    )
    blocks = min(source.num_units(), MAX_READ_TASKS)
    return ray.data.read_datasource(source, override_num_blocks=blocks, num_cpus=num_cpus)
