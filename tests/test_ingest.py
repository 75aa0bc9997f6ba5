"""Ingest into the embedded S3 server (real SeaweedFS) with real Ray tasks: layout, manifest, idempotency, bad input."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from edsr_ray import storage
from edsr_ray.errors import EdsrRayError
from edsr_ray.imaging import imresize
from edsr_ray.ingest import assign_indices, discover, ingest
from edsr_ray.manifest import read_manifest

TRAIN = ("0001", "0002", "0003", "0004", "0005", "0006")
VALID = ("0801", "0802")


@pytest.fixture(scope="module")
def ray_local(s3):
    """A local Ray instance started after the S3 variables are set, so its workers reach the server."""
    import ray

    ray.init(address="local", num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def _load(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _hr_path(src: Path, image_id: str) -> Path:
    return src / f"DIV2K_{'train' if int(image_id) <= 800 else 'valid'}_HR" / f"{image_id}.png"


def _expected_keys(ids, scales=(2, 3, 4)) -> set[str]:
    keys = {"manifest.parquet"}
    for image_id in ids:
        split = "train" if int(image_id) <= 800 else "valid"
        keys.add(f"DIV2K_{split}_HR/{image_id}.png")
        keys |= {f"DIV2K_{split}_LR_bicubic/X{s}/{image_id}x{s}.png" for s in scales}
    return keys


def _keys(root: str) -> set[str]:
    return {uri[len(root) + 1 :] for uri in storage.list_files(root)}


def _run_job(argv: list[str]) -> int:
    spec = importlib.util.spec_from_file_location("ingest_job", Path(__file__).parents[1] / "jobs" / "ingest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


@pytest.fixture(scope="module")
def hr_only_root(sample_div2k, ray_local):
    root = "s3://edsr/ingest-tests/hr-only"
    report = ingest([str(sample_div2k)], root, progress=False)
    return root, report


def test_hr_only_folder_gives_layout_and_manifest(sample_div2k, hr_only_root):
    root, report = hr_only_root
    assert report.failed == [] and report.images == report.ok == 8
    assert (report.uploaded, report.generated, report.skipped) == (32, 24, 0)
    assert report.manifest_written
    assert _keys(root) == _expected_keys(TRAIN + VALID)

    manifest = read_manifest(root).set_index("id")
    assert sorted(manifest.index) == sorted(TRAIN + VALID)
    assert (manifest.loc[list(TRAIN), "split"] == "train").all()
    assert (manifest.loc[list(VALID), "split"] == "valid").all()
    assert manifest.loc["0801", "index"] == 801 and manifest.loc["0003", "index"] == 3
    for image_id, row in manifest.iterrows():
        source = _hr_path(sample_div2k, image_id).read_bytes()
        stored = storage.read_bytes(f"{root}/{row['hr_key']}")
        assert row["hr_source_sha256"] == _sha(source) and row["hr_sha256"] == _sha(stored)
        hr = _decode(stored)
        np.testing.assert_array_equal(hr, _decode(source))  # re-encoded losslessly
        assert (row["hr_width"], row["hr_height"]) == (hr.shape[1], hr.shape[0])
        for s in (2, 3, 4):
            lr_bytes = storage.read_bytes(f"{root}/{row[f'lr_x{s}_key']}")
            assert row[f"lr_x{s}_sha256"] == _sha(lr_bytes)
            assert bool(row[f"lr_x{s}_generated"])
            lr = _decode(lr_bytes)
            assert (row[f"lr_x{s}_width"], row[f"lr_x{s}_height"]) == (hr.shape[1] // s, hr.shape[0] // s)
            np.testing.assert_array_equal(lr, imresize(hr, 1 / s))  # sizes are multiples of 12: no crop


@pytest.mark.slow
def test_second_ingest_uploads_nothing_and_a_changed_image_is_redone(sample_div2k, hr_only_root, tmp_path):
    root, _ = hr_only_root
    before = storage.read_bytes(f"{root}/manifest.parquet")
    again = ingest([str(sample_div2k)], root, progress=False)
    assert (again.uploaded, again.generated, again.failed) == (0, 0, [])
    assert again.skipped == 32 and not again.manifest_written
    assert storage.read_bytes(f"{root}/manifest.parquet") == before

    # Re-read and re-hash instead of trusting the listing: still nothing to do.
    verified = ingest([str(sample_div2k)], root, progress=False, verify=True)
    assert (verified.uploaded, verified.skipped) == (0, 32)

    # One changed source image: its HR and its three LR images are redone, nothing else.
    changed = tmp_path / "DIV2K"
    shutil.copytree(sample_div2k, changed)
    path = _hr_path(changed, "0003")
    path.write_bytes(_png(255 - _load(path)))
    third = ingest([str(changed)], root, progress=False)
    assert (third.uploaded, third.generated, third.skipped) == (4, 3, 28)
    row = read_manifest(root).set_index("id").loc["0003"]
    assert row["hr_source_sha256"] == _sha(path.read_bytes())
    ingest([str(sample_div2k)], root, progress=False)  # back to the original for the other tests


def test_supplied_lr_folders_are_used_and_missing_pairs_generated(sample_div2k, ray_local, tmp_path):
    src = tmp_path / "DIV2K"
    shutil.copytree(sample_div2k, src)
    supplied = {}
    for image_id in TRAIN:
        if image_id == "0004":
            continue  # this pair is missing from the LR folder
        hr = _load(_hr_path(src, image_id))
        folder = src / "DIV2K_train_LR_bicubic" / "X2"
        folder.mkdir(parents=True, exist_ok=True)
        # Not what imresize gives, so the test can tell a supplied LR from a generated one.
        lr = np.ascontiguousarray(hr[::2, ::2])
        (folder / f"{image_id}x2.png").write_bytes(_png(lr))
        supplied[image_id] = (folder / f"{image_id}x2.png").read_bytes()

    root = "s3://edsr/ingest-tests/with-lr"
    report = ingest([str(src)], root, scales=(2, 4), progress=False)
    assert report.failed == []
    assert report.generated == 8 + 1 + 2  # x4 everywhere, the missing x2 pair, x2 of the two valid images
    assert len(report.missing_lr) == 1 and "0004.png" in report.missing_lr[0] and "x2" in report.missing_lr[0]
    assert _keys(root) == _expected_keys(TRAIN + VALID, scales=(2, 4))

    manifest = read_manifest(root).set_index("id")
    assert manifest["lr_x3_key"].isna().all()
    for image_id, data in supplied.items():
        row = manifest.loc[image_id]
        assert not row["lr_x2_generated"] and row["lr_x2_source_sha256"] == _sha(data)
        stored = storage.read_bytes(f"{root}/{row['lr_x2_key']}")
        assert row["lr_x2_sha256"] == _sha(stored)
        np.testing.assert_array_equal(_decode(stored), _decode(data))
    assert bool(manifest.loc["0004", "lr_x2_generated"])
    # Valid images had no LR folder at all: generated, and not reported as missing.
    assert bool(manifest.loc["0801", "lr_x2_generated"])


def test_official_zips_give_the_same_dataset(sample_div2k, hr_only_root, tmp_path):
    hr_root, _ = hr_only_root
    zips = []
    for split, ids in (("train", TRAIN), ("valid", VALID)):
        path = tmp_path / f"DIV2K_{split}_HR.zip"
        with zipfile.ZipFile(path, "w") as archive:
            for image_id in ids:
                archive.write(_hr_path(sample_div2k, image_id), f"DIV2K_{split}_HR/{image_id}.png")
        zips.append(path)
    # The LR zip: official internal paths, made with the same bicubic (so the checksums must agree).
    lr_zip = tmp_path / "DIV2K_train_LR_bicubic_X2.zip"
    with zipfile.ZipFile(lr_zip, "w") as archive:
        for image_id in TRAIN:
            lr = imresize(_load(_hr_path(sample_div2k, image_id)), 1 / 2)
            archive.writestr(f"DIV2K_train_LR_bicubic/X2/{image_id}x2.png", _png(lr))
    zips.append(lr_zip)

    root = "s3://edsr/ingest-tests/zips"
    report = ingest([str(p) for p in zips], root, progress=False)
    assert report.failed == [] and report.ok == 8 and report.missing_lr == []
    assert report.generated == 8 * 2 + 2  # x3 and x4 everywhere, x2 for the two valid images
    assert _keys(root) == _expected_keys(TRAIN + VALID)

    from_zips = read_manifest(root).set_index("id").sort_index()
    from_folder = read_manifest(hr_root).set_index("id").sort_index()
    # Same pixels stored the same way: the same objects, whatever container the sources came in.
    columns = ("hr_key", "hr_sha256", "hr_source_sha256", "lr_x2_key", "lr_x2_sha256", "lr_x3_sha256", "lr_x4_sha256")
    for column in (*columns, "index", "split"):
        assert from_zips[column].tolist() == from_folder[column].tolist(), column
    assert not from_zips.loc[list(TRAIN), "lr_x2_generated"].any()
    assert from_zips.loc[list(VALID), "lr_x2_generated"].all()


def test_corrupt_and_wrong_size_images_are_reported_by_name(sample_div2k, ray_local, tmp_path, capsys):
    src = tmp_path / "DIV2K"
    shutil.copytree(sample_div2k, src)
    corrupt = _hr_path(src, "0005")
    corrupt.write_bytes(corrupt.read_bytes()[:5000])  # truncated download
    hr = _load(_hr_path(src, "0002"))
    folder = src / "DIV2K_train_LR_bicubic" / "X2"
    folder.mkdir(parents=True)
    (folder / "0002x2.png").write_bytes(_png(imresize(hr, 1 / 2)[:-3]))  # 3 rows short
    (folder / "0009x2.png").write_bytes(_png(imresize(hr, 1 / 2)))  # no HR image 0009

    root = "s3://edsr/ingest-tests/bad"
    code = _run_job(["--source", str(src), "--dest", root, "--scales", "2", "3", "--no-progress"])
    assert code == 1
    out = capsys.readouterr().out
    assert "3 failed" in out
    assert f"{corrupt}: corrupt image" in out
    assert f"{folder / '0002x2.png'}: LR is" in out and "expected" in out
    assert f"{folder / '0009x2.png'}: LR image without an HR image" in out

    manifest = read_manifest(root).set_index("id")
    assert "0005" not in manifest.index and len(manifest) == 7
    row = manifest.loc["0002"]
    assert pd.isna(row["lr_x2_key"]) and row["lr_x3_key"] == "DIV2K_train_LR_bicubic/X3/0002x3.png"
    assert not storage.exists(f"{root}/DIV2K_train_HR/0005.png")
    # The X2 folder lacks the other training images: generated, and named in the summary.
    assert "4 LR images missing from the source folders were generated" in out
    assert f"{_hr_path(src, '0006')} x2" in out


def test_benchmark_layout_crops_hr_to_a_multiple_of_the_scale(photos, ray_local, tmp_path):
    src = tmp_path / "Set5"
    (src / "HR").mkdir(parents=True)
    (src / "LR_bicubic" / "X2").mkdir(parents=True)
    sizes = {"baby": (301, 257), "bird": (288, 288), "butterfly": (257, 263)}  # (w, h), not multiples of 3 or 4
    for (name, (w, h)), photo in zip(sizes.items(), ("coffee", "chelsea", "astronaut")):
        hr = photos[photo][:h, :w]
        (src / "HR" / f"{name}.png").write_bytes(_png(hr))
        lr = imresize(hr[: h // 2 * 2, : w // 2 * 2], 1 / 2)
        (src / "LR_bicubic" / "X2" / f"{name}x2.png").write_bytes(_png(lr))

    root = "s3://edsr/ingest-tests/bench"
    report = ingest([str(src)], root, progress=False)
    assert report.failed == [] and report.ok == 3 and report.missing_lr == []
    manifest = read_manifest(root).set_index("id").sort_values("index")
    assert list(manifest.index) == ["baby", "bird", "butterfly"] and list(manifest["index"]) == [1, 2, 3]
    assert set(manifest["dataset"]) == {"Set5"} and set(manifest["split"]) == {"test"}
    for name, (w, h) in sizes.items():
        row = manifest.loc[name]
        assert row["hr_key"] == f"benchmark/Set5/HR/{name}.png"
        hr = _decode(storage.read_bytes(f"{root}/{row['hr_key']}"))
        assert hr.shape == (h, w, 3)  # stored uncropped
        for s in (3, 4):
            assert row[f"lr_x{s}_key"] == f"benchmark/Set5/LR_bicubic/X{s}/{name}x{s}.png"
            lr = _decode(storage.read_bytes(f"{root}/{row[f'lr_x{s}_key']}"))
            np.testing.assert_array_equal(lr, imresize(hr[: h // s * s, : w // s * s], 1 / s))
        assert not row["lr_x2_generated"]


def test_split_and_index_rules_for_loose_images(photo, tmp_path):
    loose = tmp_path / "loose"
    loose.mkdir()
    for name in ("0007", "0805", "0950"):
        (loose / f"{name}.png").write_bytes(_png(photo[:48, :48]))
    items, problems = discover([str(loose)])
    assert problems == []
    assert {i.id: (i.split, i.index) for i in items} == {
        "0007": ("train", 7),
        "0805": ("valid", 805),
        "0950": ("test", 950),
    }

    named = tmp_path / "named"
    named.mkdir()
    for name in ("zebra", "apple"):
        (named / f"{name}.jpg").write_bytes(_png(photo[:48, :48]))
    with pytest.raises(EdsrRayError, match=r"cannot tell the DIV2K split of .*apple\.jpg.*--split"):
        discover([str(named)])
    items, _ = discover([str(named)], split="valid")
    existing = [{"dataset": "DIV2K", "id": "0801", "index": 801}]
    assign_indices(items, existing)
    assert {i.id: i.index for i in items} == {"apple": 802, "zebra": 803}

    with pytest.raises(EdsrRayError, match="comes from two files"):
        discover([str(loose), str(loose)])
    with pytest.raises(EdsrRayError, match="no such folder"):
        discover([str(tmp_path / "missing")])


def test_job_usage_errors_exit_2(tmp_path, capsys):
    assert _run_job(["--source", str(tmp_path / "nope"), "--dest", str(tmp_path / "out")]) == 2
    assert "no such folder or file" in capsys.readouterr().err
    assert _run_job(["--source", str(tmp_path), "--dest", "x", "--endpoint-url", "ftp://host"]) == 2
    assert "endpoint_url" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        _run_job(["--source", str(tmp_path), "--dest", "x", "--max-source-mb", "0"])
    assert info.value.code == 2 and "--max-source-mb must be >= 1, got 0" in capsys.readouterr().err


def test_special_files_in_a_source_are_reported_and_the_run_finishes(
    sample_div2k, ray_local, tmp_path, capsys, special_files, finishes
):
    src = tmp_path / "DIV2K"
    shutil.copytree(sample_div2k, src)
    expected = special_files(src / "DIV2K_train_HR")
    expected.pop("folder.png")  # a real folder: walked into (it is empty)
    root = "s3://edsr/ingest-tests/special"
    argv = ["--source", str(src), "--dest", root, "--scales", "2", "--no-progress"]
    assert finishes(lambda: _run_job(argv), 300) == 1
    out = capsys.readouterr().out
    assert f"{len(expected)} failed" in out
    for name, words in expected.items():
        assert f"{src / 'DIV2K_train_HR' / name}: {words}" in out, name
    assert len(read_manifest(root)) == len(TRAIN) + len(VALID)  # the real images are all in

    os.mkfifo(tmp_path / "DIV2K_train_HR.zip")  # a FIFO named like an archive: refused before the zip reader opens it
    assert finishes(lambda: _run_job(["--source", str(tmp_path / "DIV2K_train_HR.zip"), "--dest", root]), 60) == 2
    err = capsys.readouterr().err
    assert "DIV2K_train_HR.zip: not a regular file: a FIFO" in err and err.startswith("error: --source")


@pytest.mark.parametrize("flag", ["--source", "--dest"])
def test_foreign_schemes_exit_2_before_anything_is_created(flag, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "src").mkdir()
    for value in ("gs://bucket/x", "S3://bucket/x", "s3a://bucket/x", "ftp://host/x", "gs:bucket/x", "s3:bucket"):
        args = {"--source": str(tmp_path / "src"), "--dest": str(tmp_path / "out"), flag: value}
        assert _run_job([x for pair in args.items() for x in pair]) == 2, value
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {flag} {value}: unsupported scheme ") and "\n" not in err, err
        assert "a local path" in err and ("s3://bucket/key" in err) == (flag == "--dest"), err
        assert sorted(os.listdir(tmp_path)) == ["src"], "nothing may be created for a refused location"
    assert _run_job(["--source", "s3://bucket/photos", "--dest", str(tmp_path / "out")]) == 2
    assert "--source s3://bucket/photos: s3://bucket/key is not supported here" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------------
# Images past the fast PNG writer's limits, and archives that lie


def test_images_past_the_fast_png_writers_sides_are_stored_exactly(ray_local, strip, tmp_path):
    src = tmp_path / "strips"
    src.mkdir()
    images = {"wide": strip((2, 70_000, 3)), "tall": strip((70_000, 2, 3))}  # fpng would store 4464 for 70000
    for name, pixels in images.items():
        (src / f"{name}.png").write_bytes(_png(pixels))
    root = str(tmp_path / "root")
    report = ingest([str(src)], root, dataset="Strips", scales=(2,), progress=False)
    assert report.failed == [] and report.ok == 2
    manifest = read_manifest(root).set_index("id")
    for name, pixels in images.items():
        row = manifest.loc[name]
        with Image.open(Path(root) / row["hr_key"]) as im:
            assert (row["hr_width"], row["hr_height"]) == im.size == (pixels.shape[1], pixels.shape[0])
            np.testing.assert_array_equal(np.asarray(im), pixels)
        with Image.open(Path(root) / row["lr_x2_key"]) as im:
            assert (row["lr_x2_width"], row["lr_x2_height"]) == im.size == (pixels.shape[1] // 2, pixels.shape[0] // 2)
            np.testing.assert_array_equal(np.asarray(im), imresize(pixels, output_shape=(im.height, im.width)))


def _patch_zip_sizes(path: Path, member: str, *, file_size: int | None = None, compress_size: int | None = None):
    """Rewrite the sizes ``member`` declares, in its local header and its central directory entry, as a forger would
    (the CRC stays that of the real data)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        local = archive.getinfo(member).header_offset
    end = data.rfind(b"PK\x05\x06")  # end of central directory: entry count at +10, directory offset at +16
    count, pos = struct.unpack("<H", data[end + 10 : end + 12])[0], struct.unpack("<I", data[end + 16 : end + 20])[0]
    for _ in range(count):
        name_len, extra_len, comment_len = struct.unpack("<HHH", data[pos + 28 : pos + 34])
        if data[pos + 46 : pos + 46 + name_len].decode() == member:
            break
        pos += 46 + name_len + extra_len + comment_len
    else:
        raise AssertionError(f"{member} not in the central directory")
    assert data[local : local + 4] == b"PK\x03\x04" and data[pos : pos + 4] == b"PK\x01\x02"
    for header, offsets in ((local, (18, 22)), (pos, (20, 24))):  # (compressed size, uncompressed size)
        if compress_size is not None:
            struct.pack_into("<I", data, header + offsets[0], compress_size)
        if file_size is not None:
            struct.pack_into("<I", data, header + offsets[1], file_size)
    path.write_bytes(bytes(data))


def _zeros_member(archive: zipfile.ZipFile, name: str, mib: int) -> None:
    """A member of ``mib`` MiB of zeros, written in 1 MiB pieces (deflate makes it ~1000x smaller)."""
    with archive.open(name, "w") as member:
        for _ in range(mib):
            member.write(bytes(1 << 20))


def test_zip_members_that_lie_or_break_fail_by_name_and_the_others_are_ingested(photos, ray_local, tmp_path):
    archive_path = tmp_path / "DIV2K_train_HR.zip"
    good = {i: _png(np.ascontiguousarray(photos["coffee"][:48, 8 * i : 8 * i + 60])) for i in range(1, 9)}

    def name(i: int) -> str:
        return f"DIV2K_train_HR/{i:04d}.png"

    with zipfile.ZipFile(archive_path, "w", zipfile.ZIP_DEFLATED) as archive:
        for i in (1, 4, 6, 7, 8):
            archive.writestr(name(i), good[i])
        _zeros_member(archive, name(2), 64)  # will declare 1000 bytes
        _zeros_member(archive, name(3), 16)  # honest, but over the 8 MiB limit of this run
        archive.writestr(zipfile.ZipInfo(name(5)), good[5], compress_type=zipfile.ZIP_BZIP2)
    with zipfile.ZipFile(archive_path) as archive:
        half = archive.getinfo(name(4)).compress_size // 2
    _patch_zip_sizes(archive_path, name(2), file_size=1000)
    _patch_zip_sizes(archive_path, name(4), compress_size=half)  # its compressed data ends early
    _patch_zip_sizes(archive_path, name(6), file_size=len(good[6]) + 5000)  # declares more than it holds

    root = "s3://edsr/ingest-tests/lying-zip"
    report = ingest([str(archive_path)], root, scales=(2,), progress=False, max_source_bytes=8 << 20)
    reasons = dict(report.failed)
    expected = {
        2: "does not match the size (1,000 bytes)",
        3: f"{16 << 20:,} bytes is larger than the {8 << 20:,} allowed",
        4: "corrupt archive member",
        5: "compression method 12 is not read; only stored and deflate members are",
        6: f"the archive declares {len(good[6]) + 5000:,} bytes; its data holds {len(good[6]):,}",
    }
    assert set(reasons) == {f"{archive_path}:{name(i)}" for i in expected}, report.failed
    for i, words in expected.items():
        assert words in reasons[f"{archive_path}:{name(i)}"], reasons
    assert report.ok == 3 and sorted(read_manifest(root)["id"]) == ["0001", "0007", "0008"]
    stored = _decode(storage.read_bytes(f"{root}/DIV2K_train_HR/0007.png"))
    np.testing.assert_array_equal(stored, _decode(good[7]))


@pytest.mark.slow
def test_a_member_inflating_to_a_gibibyte_is_read_in_bounded_memory(tmp_path):
    """The peak memory of ingesting a member that declares 1000 bytes and inflates to 1 GiB, measured in a fresh
    process: zipfile's one-call read used to inflate it all (2 GB more) before its checksum failed."""
    archive_path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive_path, "w", zipfile.ZIP_DEFLATED) as archive:
        _zeros_member(archive, "DIV2K_train_HR/0001.png", 1024)
    _patch_zip_sizes(archive_path, "DIV2K_train_HR/0001.png", file_size=1000)
    # One image's whole ingest (what each Ray task of a run does), in a fresh process.
    code = (
        "import resource\n"
        "from edsr_ray.ingest import Item, SourceFile, _Task, ingest_item\n"
        f"hr = SourceFile({str(archive_path)!r}, 'DIV2K_train_HR/0001.png')\n"
        f"task = _Task(Item('DIV2K', 'train', '0001', 1, hr), (2,), {str(tmp_path / 'root')!r}, None, frozenset(), "
        "False, None)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "result = ingest_item(task)\n"
        "print(result.failed[0][1] if result.failed and result.row is None else 'ingested?')\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"  # KiB on Linux
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    message, grown_kib = result.stdout.strip().splitlines()
    assert f"{archive_path}:DIV2K_train_HR/0001.png" in message and "does not match the size" in message
    assert not (tmp_path / "root").exists()
    assert int(grown_kib) < 32 * 1024, f"reading grew the process by {int(grown_kib) / 1024:.0f} MiB"
