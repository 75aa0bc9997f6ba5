"""edsr_ray.batch.inputs: what an --input holds, the keys and names of the outputs, the plan (refused collisions,
inputs inside the output), list files, and the litter a killed run leaves."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from edsr_ray import storage
from edsr_ray.batch.inputs import output_key, plan_tasks, read_list_file, relative_keys, remove_stale_temp_files
from edsr_ray.errors import ConfigError
from edsr_ray.storage import StorageConfig


def test_output_names():
    assert output_key("a/b/c.JPG", "same") == "a/b/c.JPG"
    assert output_key("a/b/c.jpeg", "png") == "a/b/c.png"
    assert output_key("c.png", "jpeg") == "c.jpg"
    assert output_key("c.png", "webp") == "c.webp"
    assert output_key("scan.tiff", "same") == "scan.png"  # a format we do not write


def test_relative_keys_of_listed_inputs():
    same_bucket = ["s3://b/photos/a/1.jpg", "s3://b/photos/c/2.jpg"]
    assert relative_keys(same_bucket) == ["a/1.jpg", "c/2.jpg"]
    assert relative_keys(["s3://b/photos/1.jpg"]) == ["1.jpg"]
    assert relative_keys(["s3://b/x/1.jpg", "s3://c/x/1.jpg"]) == ["b/x/1.jpg", "c/x/1.jpg"]
    assert relative_keys(["/data/in/1.png", "/data/in/sub/2.png"]) == ["1.png", "sub/2.png"]
    assert relative_keys(["/data/1.png", "s3://b/2.png"]) == ["data/1.png", "b/2.png"]


def test_plan_skips_the_output_folder_inside_the_input_and_refuses_collisions(tmp_path):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    for name in ("a.png", "a.jpg", "sub/b.webp", "sub/c.PNG", "readme.md", "_manifest.parquet"):
        (tmp_path / "in" / name).write_bytes(b"x")
    (tmp_path / "in" / "out" / "old").mkdir(parents=True)
    (tmp_path / "in" / "out" / "old" / "done.png").write_bytes(b"x")
    tasks, refused, ignored = plan_tasks(str(tmp_path / "in"), str(tmp_path / "in" / "out"), "png")
    assert [t.key for t in tasks] == ["a.jpg", "sub/b.webp", "sub/c.PNG"]
    assert [t.dest for t in tasks] == [str(tmp_path / "in" / "out" / k) for k in ("a.png", "sub/b.png", "sub/c.png")]
    assert [(t.key, "also the output of" in why) for t, why in refused] == [("a.png", True)]
    # Nothing vanishes: the files that are not inputs are ignored with the reason.
    assert [(Path(s).relative_to(tmp_path / "in").as_posix(), why.split(" ", 1)[1]) for s, why in ignored] == [
        ("_manifest.parquet", "is not an image or video extension"),
        ("out/old/done.png", "lies inside the output location " + str(tmp_path / "in" / "out")),
        ("readme.md", "is not an image or video extension"),
    ]

    single = plan_tasks(str(tmp_path / "in" / "readme.md"), str(tmp_path / "o")).tasks
    assert [(t.key, Path(t.dest).name) for t in single] == [("readme.md", "readme.png")]


def test_an_input_inside_the_output_is_refused_not_silently_skipped(tmp_path):
    (tmp_path / "out" / "raw" / "raw").mkdir(parents=True)
    for name in ("a.png", "raw/b.png"):
        (tmp_path / "out" / "raw" / name).write_bytes(b"x")
    # Outputs keep their relative key: raw/b.png would land on the input out/raw/b.png.
    for inp, out in ((tmp_path / "out" / "raw", tmp_path / "out"), (tmp_path / "out", tmp_path / "out")):
        with pytest.raises(ConfigError, match=r"lies inside --output .*outputs could overwrite inputs"):
            plan_tasks(str(inp), str(out))
    with pytest.raises(ConfigError, match="lies inside --output"):
        plan_tasks("s3://b/photos", "s3://b/photos/")
    # A list file naming files inside the output: those entries are refused, with the reason, the others run.
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "c.png").write_bytes(b"x")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tmp_path / 'in' / 'c.png'}\n{tmp_path / 'out' / 'raw' / 'a.png'}\n")
    tasks, refused, _ = plan_tasks(str(listing), str(tmp_path / "out"))
    assert [Path(t.source).name for t in tasks] == ["c.png"]
    assert [(Path(t.source).name, "inside the output location" in why) for t, why in refused] == [("a.png", True)]


def test_relative_entries_of_a_list_file_on_s3_resolve_like_paths(s3):
    storage.write_bytes("s3://edsr/lists/in.txt", b"./a/b.png\nx/../c.png\n# a comment\ns3://other/d.png\n")
    assert read_list_file("s3://edsr/lists/in.txt") == [
        "s3://edsr/lists/a/b.png",
        "s3://edsr/lists/c.png",
        "s3://other/d.png",
    ]
    storage.write_bytes("s3://edsr/lists/bad.txt", b"../../up.png\n")
    with pytest.raises(ConfigError, match=r"'../../up.png' points above the bucket s3://edsr"):
        read_list_file("s3://edsr/lists/bad.txt")


def test_list_files_are_bounded_by_the_memory_their_entries_take(tmp_path):
    """A short file can name a great many entries: a text list of empty lines, a Parquet list repeating one long
    entry through its dictionary (the file stays a few kilobytes)."""
    text = tmp_path / "many.txt"
    text.write_bytes(b"\n" * 20_000)
    cfg = StorageConfig(max_read_bytes=1_000_000)
    with pytest.raises(ConfigError, match=r"many\.txt: the list's entries take more than the 1,000,000 bytes"):
        read_list_file(str(text), cfg)
    assert read_list_file(str(text)) == []  # within the default limit: blank lines, no entries
    parquet = tmp_path / "many.parquet"
    pq.write_table(pa.table({"path": ["a" * 1000 + ".png"] * 20_000}), parquet, compression="zstd")
    assert parquet.stat().st_size < 10_000
    with pytest.raises(ConfigError, match=r"many\.parquet: the list's entries take more than the 1,000,000 bytes"):
        read_list_file(str(parquet), cfg)
    assert read_list_file(str(parquet)) == [str(tmp_path / ("a" * 1000 + ".png"))]


def test_stale_temp_files_are_removed_and_outputs_kept(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / ".x.png.abcd.edsr-tmp").write_bytes(b"partial")
    (tmp_path / "a" / "x.png").write_bytes(b"complete")
    (tmp_path / "a" / "keep.edsr-tmp").write_bytes(b"not ours: no leading dot")
    assert remove_stale_temp_files(str(tmp_path)) == 1
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["keep.edsr-tmp", "x.png"]
    assert remove_stale_temp_files("s3://edsr/anything") == 0
