"""Config loading: every preset loads, overrides apply, and every kind of mistake names the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from edsr_ray.config import (
    ExperimentConfig,
    ModelConfig,
    TrainConfig,
    apply_overrides,
    flatten,
    from_dict,
    load_config,
    to_dict,
)
from edsr_ray.errors import ConfigError

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_preset_loads_and_round_trips(path):
    cfg = load_config(path)
    assert isinstance(cfg, ExperimentConfig)
    assert from_dict(ExperimentConfig, to_dict(cfg)) == cfg


def test_presets_follow_the_paper():
    x2 = load_config(Path("configs/edsr_x2.yaml"))
    assert (x2.model.n_resblocks, x2.model.n_feats, x2.model.res_scale) == (32, 256, 0.1)
    assert (x2.train.lr, x2.train.lr_step, x2.train.lr_gamma, x2.train.batch_size) == (1e-4, 200_000, 0.5, 16)
    assert x2.train.betas == (0.9, 0.999) and x2.train.eps == 1e-8
    for name in ("edsr_x3", "edsr_x4", "edsr_baseline_x3", "edsr_baseline_x4"):
        assert load_config(Path(f"configs/{name}.yaml")).train.init_from is not None, name
    mdsr = load_config(Path("configs/mdsr.yaml"))
    assert mdsr.model.arch == "mdsr" and mdsr.model.scales == (2, 3, 4) and mdsr.model.n_resblocks == 80


def test_dotted_overrides_are_typed():
    cfg = load_config(None, ["train.lr=2e-4", "model.scales=[3]", "data.val_max_size=null", "train.total_steps=2e3"])
    assert cfg.train.lr == 2e-4
    assert cfg.model.scales == (3,)
    assert cfg.data.val_max_size is None
    assert cfg.train.total_steps == 2000 and isinstance(cfg.train.total_steps, int)


def test_yaml_scientific_notation_without_dot_is_a_number(tmp_path):
    # YAML 1.1 reads "1e-4" as a string; users write it that way all the time.
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 1e-4\n  lr_step: 2e5\n")
    cfg = load_config(p)
    assert cfg.train.lr == 1e-4 and cfg.train.lr_step == 200_000


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ("model:\n  scales: [5]\n", "model.scales", "scale 5"),
        ("train:\n  lr: 0\n", "train.lr", "> 0"),
        ("train:\n  lr: -1.0e-4\n", "train.lr", "> 0"),
        ("model:\n  n_feats: 0\n", "model.n_feats", ">= 1"),
        ("model:\n  n_feat: 64\n", "model.n_feat", "unknown key"),
        ("modle:\n  n_feats: 64\n", "modle", "unknown key"),
        ("train:\n  batch_size: sixteen\n", "train.batch_size", "expected an integer"),
        ("train:\n  batch_size: 16.5\n", "train.batch_size", "expected an integer"),
        ("data:\n  augment: 3\n", "data.augment", "true or false"),
        ("model:\n  arch: srcnn\n", "model.arch", "edsr"),
        ("model:\n  arch: edsr\n  scales: [2, 3]\n", "model.scales", "one scale"),
        ("data:\n  train_range: [10, 1]\n", "data.train_range", "first <= last"),
        ("train: 3\n", "train", "mapping"),
        ("storage:\n  endpoint_url: 127.0.0.1:8333\n", "storage.endpoint_url", "http://"),
        ("workers:\n  num_workers: 17\n", "workers.num_workers", "global batch of 16"),
        ("workers:\n  num_workers: [1, 17]\n", "workers.num_workers", "up to 17 workers"),
        ("workers:\n  num_workers: [2, 1]\n", "workers.num_workers", "1 <= min <= max, got [2, 1]"),
        ("workers:\n  num_workers: [0, 2]\n", "workers.num_workers", "1 <= min <= max, got [0, 2]"),
        ("workers:\n  num_workers: [1, 2, 3]\n", "workers.num_workers", "an integer or a list of 2 integers"),
        ("workers:\n  num_workers: [1.5, 2]\n", "workers.num_workers", "an integer or a list of 2 integers"),
        (
            "workers:\n  num_workers: [1, 2]\n  placement_strategy: STRICT_SPREAD\n",
            "workers.placement_strategy",
            "cannot be honoured by an elastic group",
        ),
        ("workers:\n  resize_check_s: -1\n", "workers.resize_check_s", ">= 0"),
        ("run:\n  checkpoint_every_s: 0\n", "run.checkpoint_every_s", "> 0 seconds"),
        ("run:\n  max_preemptions: -2\n", "run.max_preemptions", ">= -1"),
        ("storage:\n  max_read_bytes: 0\n", "storage.max_read_bytes", ">= 1"),
        ("storage:\n  read_budget_s: 0\n", "storage.read_budget_s", "> 0"),
    ],
)
def test_bad_values_name_the_file_and_key(tmp_path, text, key, fragment):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(p)
    message = str(info.value)
    assert str(p) in message
    assert f" {key}:" in message
    assert fragment in message


def test_bad_override_names_the_override():
    with pytest.raises(ConfigError, match=r"train\.lrr: unknown key"):
        load_config(Path("configs/edsr_baseline_x2.yaml"), ["train.lrr=1"])
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        load_config(None, ["train.lr"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "broken.yaml"
    p.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_configs_are_frozen():
    cfg = ModelConfig()
    with pytest.raises(AttributeError):
        cfg.n_feats = 3  # type: ignore[misc]


def test_flatten_and_apply_overrides_do_not_mutate():
    data = {"train": {"lr": 1e-4}}
    out = apply_overrides(data, ["train.lr=3e-4", "model.n_feats=8"], source="x")
    assert data == {"train": {"lr": 1e-4}}
    flat = flatten(from_dict(ExperimentConfig, out))
    assert flat["train.lr"] == 3e-4 and flat["model.n_feats"] == 8
    assert TrainConfig().lr == 1e-4


def test_readme_configuration_reference_is_current():
    from edsr_ray.config import splice_reference

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert splice_reference(readme) == readme, "run: python -m edsr_ray.config --write README.md"
    assert "| `patch_size` | int | `48` |" in readme


FOREIGN = ["gs://bucket/x", "S3://bucket/x", "s3a://bucket/x", "s3n://bucket/x", "ftp://host/x", "gs:bucket/x"]


@pytest.mark.parametrize("key", ["data.root", "run.storage_path", "train.init_from"])
@pytest.mark.parametrize("value", FOREIGN)
def test_locations_in_foreign_schemes_name_the_file_and_key(tmp_path, key, value):
    section, name = key.split(".")
    p = tmp_path / "cfg.yaml"
    p.write_text(f"{section}:\n  {name}: {value}\n")
    with pytest.raises(ConfigError) as info:
        load_config(p)
    message = str(info.value)
    assert message.startswith(f"{p}: {key}: {value}: unsupported scheme "), message
    assert "a local path" in message and "s3://bucket/key" in message
    assert ("models:/" in message) == (key == "train.init_from")  # only weights may come from MLflow
    # The same from a command-line override.
    with pytest.raises(ConfigError, match=f"{key}: "):
        load_config(None, [f"{key}={value}"])


def test_supported_locations_load():
    cfg = load_config(
        None, ["data.root=s3://b/div2k", "run.storage_path=file:///runs", "train.init_from=models:/edsr_x2/1"]
    )
    assert (cfg.data.root, cfg.run.storage_path, cfg.train.init_from) == (
        "s3://b/div2k",
        "file:///runs",
        "models:/edsr_x2/1",
    )
    assert load_config(None, ["data.root=./gs:bucket"]).data.root == "./gs:bucket"  # a local folder with a colon


def test_a_config_that_is_not_a_regular_file_fails_at_once(tmp_path, finishes):
    import os

    os.mkfifo(tmp_path / "cfg.yaml")
    with pytest.raises(ConfigError, match=r"cfg\.yaml: not a regular file: a FIFO"):
        finishes(lambda: load_config(tmp_path / "cfg.yaml"), 20)
    (tmp_path / "big.yaml").write_bytes(b"#" * (2 << 20))
    with pytest.raises(ConfigError, match=r"big\.yaml: 2,097,152 bytes is more than the 1,048,576 bytes"):
        load_config(tmp_path / "big.yaml")
    (tmp_path / "latin1.yaml").write_bytes("model: {arch: \xe9dsr}\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml: config file is not UTF-8 text"):
        load_config(tmp_path / "latin1.yaml")


def _train_job():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_job", Path(__file__).parents[1] / "jobs" / "train.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


@pytest.mark.parametrize("key", ["data.root", "run.storage_path", "train.init_from"])
def test_train_job_exits_2_on_foreign_schemes_before_anything_is_created(key, tmp_path, capsys, monkeypatch):
    import os

    job = _train_job()
    monkeypatch.chdir(tmp_path)
    config = Path(__file__).parents[1] / "configs" / "edsr_baseline_x2.yaml"
    for value in FOREIGN:
        assert job.main(["--config", str(config), f"{key}={value}"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {config}: {key}: {value}: unsupported scheme ") and "\n" not in err, err
        assert os.listdir(tmp_path) == [], "nothing may be created for a refused location"


@pytest.mark.parametrize(
    ("value", "expected"), [("3", (3, 3, 3, False)), ("[1, 8]", ((1, 8), 1, 8, True)), ("[4, 4]", ((4, 4), 4, 4, True))]
)
def test_num_workers_takes_a_count_or_a_range(value, expected):
    """A count fixes the group; a [min, max] list (YAML or override) makes it elastic, passed to Ray as a tuple."""
    cfg = load_config(None, [f"workers.num_workers={value}"])
    w = cfg.workers
    assert (w.num_workers, w.min_workers, w.max_workers, w.elastic) == expected
    assert load_config(None, [f"workers.num_workers={to_dict(cfg)['workers']['num_workers']}"]) == cfg
