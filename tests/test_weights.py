"""Tests for edsr_ray.weights: reading weight files safely, the project's checkpoints, initialisation, model sources.

State dicts are built from the official key layout (tests/layouts.py, written out from REFERENCE-edsr.md) with random
tensors, never taken from the model under test.
"""

from __future__ import annotations

import logging
import os
import random

import pytest
import torch
from layouts import MEAN, TINY_F, TINY_R, edsr_layout, mdsr_layout, random_state_dict, randomised, ref_edsr
from torch import nn

from edsr_ray import models, weights
from edsr_ray.config import ModelConfig
from edsr_ray.errors import LocationError, ModelLoadError
from edsr_ray.mlflow_model import log_model

# --------------------------------------------------------------------------------------------------------------------
# Reading the architecture off the weights


@pytest.mark.parametrize(
    "layout, expected",
    [
        (edsr_layout(TINY_R, TINY_F, 2), ModelConfig("edsr", TINY_R, TINY_F, (2,))),
        (edsr_layout(TINY_R, TINY_F, 3), ModelConfig("edsr", TINY_R, TINY_F, (3,))),
        (edsr_layout(5, TINY_F, 4), ModelConfig("edsr", 5, TINY_F, (4,))),
        (mdsr_layout(TINY_R, TINY_F), ModelConfig("mdsr", TINY_R, TINY_F, (2, 3, 4))),
        (mdsr_layout(3, TINY_F, (2, 4)), ModelConfig("mdsr", 3, TINY_F, (2, 4))),
        (mdsr_layout(1, TINY_F, (3,)), ModelConfig("mdsr", 1, TINY_F, (3,))),
        (edsr_layout(TINY_R, TINY_F, 2, n_colors=1), ModelConfig("edsr", TINY_R, TINY_F, (2,), n_colors=1)),
    ],
    ids=["edsr-x2", "edsr-x3", "edsr-x4-R5", "mdsr", "mdsr-x2x4", "mdsr-x3", "edsr-grey"],
)
def test_infer_model_config_from_keys_and_shapes(layout, expected):
    sd = random_state_dict(layout)
    assert weights.infer_model_config(sd) == expected
    model = weights.load_model(sd)
    assert model.config == expected
    assert model.scales == expected.scales


@pytest.mark.parametrize("rgb_range", [1, 255, 1023])
def test_rgb_range_is_read_from_the_mean_shift(rgb_range, lr_input):
    sd = random_state_dict(edsr_layout(TINY_R, TINY_F, 2), rgb_range=rgb_range)
    model = weights.load_model(sd)
    assert model.config.rgb_range == rgb_range
    x = lr_input * (rgb_range / 255)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref_edsr(sd, x, TINY_R, 2, 1.0), atol=1e-3, rtol=0)


def test_inconsistent_mean_shift_is_an_error():
    sd = random_state_dict(edsr_layout(TINY_R, TINY_F, 2))
    sd["sub_mean.bias"] = torch.tensor([-100.0, -20.0, -3.0])
    with pytest.raises(ModelLoadError, match=r"sub_mean\.bias .* rgb_range"):
        weights.infer_model_config(sd, source="odd.pt")


def test_res_scale_convention_and_override(lr_input):
    wide = random_state_dict(edsr_layout(1, 256, 2), seed=3)
    narrow = random_state_dict(edsr_layout(1, 64, 2), seed=3)
    assert weights.infer_model_config(wide).res_scale == 0.1
    assert weights.infer_model_config(narrow).res_scale == 1.0
    assert weights.infer_model_config(narrow, res_scale=0.25).res_scale == 0.25

    model = weights.load_model(wide, res_scale=0.3)
    assert model.config.res_scale == 0.3
    with torch.no_grad():
        out = model(lr_input)
        torch.testing.assert_close(out, ref_edsr(wide, lr_input, 1, 2, 0.3), atol=1e-3, rtol=0)
        # res_scale really changes the result, so getting it wrong would be caught above.
        assert (out - ref_edsr(wide, lr_input, 1, 2, 0.1)).abs().max() > 1e-2


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_wrapper_prefixes_are_stripped(prefix, lr_input):
    sd = random_state_dict(edsr_layout(TINY_R, TINY_F, 3), seed=5)
    wrapped = {prefix + k: v for k, v in sd.items()}
    assert weights.infer_model_config(wrapped) == ModelConfig("edsr", TINY_R, TINY_F, (3,))
    model = weights.load_model(wrapped)
    with torch.no_grad():
        torch.testing.assert_close(model(lr_input, 3), ref_edsr(sd, lr_input, TINY_R, 3, 1.0), atol=1e-3, rtol=0)


def test_state_dict_under_a_wrapper_key(tmp_path):
    sd = random_state_dict(edsr_layout(TINY_R, TINY_F, 2))
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 3}, path)
    assert weights.load_model(path).config == ModelConfig("edsr", TINY_R, TINY_F, (2,))


# --------------------------------------------------------------------------------------------------------------------
# The project's own checkpoints


def test_project_checkpoint_round_trip_restores_res_scale_without_flags(tmp_path, lr_input):
    model = randomised(models.EDSR(TINY_R, TINY_F, 3, res_scale=0.37))
    ckpt_dir = tmp_path / "run" / "checkpoint_000001"
    path = weights.save_model(model, ckpt_dir / "model.pt")
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["model.pt"]  # no temp file left behind

    raw = torch.load(path, weights_only=True)  # only plain types and tensors inside
    assert raw["format"] == weights.CHECKPOINT_FORMAT
    assert raw["model_config"]["res_scale"] == 0.37
    assert raw["model_config"]["scales"] == [3]
    assert set(raw["state_dict"]) == set(edsr_layout(TINY_R, TINY_F, 3))

    with torch.no_grad():
        expected = model(lr_input, 3)
        for source in (path, ckpt_dir, str(ckpt_dir), weights.model_checkpoint(model)):
            loaded = weights.load_model(source)
            assert loaded.config == model.config
            assert loaded.config.res_scale == 0.37
            assert torch.equal(loaded(lr_input, 3), expected)
        # A bare state dict cannot know res_scale: the convention gives 1, and the output differs.
        bare = weights.load_model(model.state_dict())
        assert bare.config.res_scale == 1.0
        assert not torch.allclose(bare(lr_input, 3), expected, atol=1e-2)
        # An explicit res_scale overrides the stored one.
        assert weights.load_model(path, res_scale=0.5).config.res_scale == 0.5


def test_save_model_replaces_an_existing_file_atomically(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"old contents")
    weights.save_model(models.EDSR(1, 4, 2), path)
    assert weights.load_model(path).config == ModelConfig("edsr", 1, 4, (2,))
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_checkpoint_of_wrapped_models_has_plain_keys():
    model = randomised(models.MDSR(1, TINY_F, (2, 4)))
    plain = weights.model_checkpoint(model)
    assert plain["model_config"]["arch"] == "mdsr" and plain["model_config"]["scales"] == [2, 4]
    for wrapped in (nn.DataParallel(model), torch.compile(model)):
        ckpt = weights.model_checkpoint(wrapped)
        assert list(ckpt["state_dict"]) == list(plain["state_dict"])
        assert ckpt["model_config"] == plain["model_config"]
        assert all(torch.equal(ckpt["state_dict"][k], v) for k, v in plain["state_dict"].items())
        assert models.receptive_radius(wrapped) == models.receptive_radius(model)


# --------------------------------------------------------------------------------------------------------------------
# Refusing unsafe and foreign files


class _Payload:
    """Unpickling this object runs ``open(marker, "w")``, i.e. creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_code_is_refused_and_not_executed(tmp_path):
    sd = random_state_dict(edsr_layout(1, 4, 2))
    # Prove the payload is live: an unsafe load does create its marker.
    armed_marker = tmp_path / "armed-marker"
    torch.save({**sd, "extra": _Payload(armed_marker)}, tmp_path / "armed.pt")
    torch.load(tmp_path / "armed.pt", weights_only=False)["extra"].close()
    assert armed_marker.exists()

    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({**sd, "extra": _Payload(marker)}, path)
    for load in (weights.load_model, lambda p: weights.load_matching(models.EDSR(1, 4, 2), p)):
        with pytest.raises(ModelLoadError) as err:
            load(path)
        message = str(err.value)
        assert str(path) in message
        assert "refuses to unpickle arbitrary objects" in message
        assert "Nothing was executed" in message
        assert not marker.exists()


def test_saved_module_is_refused(tmp_path):
    path = tmp_path / "whole-model.pt"
    torch.save(models.EDSR(1, 4, 2), path)
    with pytest.raises(ModelLoadError, match=r"refuses to unpickle arbitrary objects .*Nothing was executed"):
        weights.load_model(path)


def _resnet_like_state_dict() -> dict[str, torch.Tensor]:
    sd = {"conv1.weight": torch.zeros(64, 3, 7, 7)}
    for name in ("bn1", "layer1.0.bn1", "layer1.0.bn2"):
        sd.update({f"{name}.{p}": torch.zeros(64) for p in ("weight", "bias", "running_mean", "running_var")})
        sd[f"{name}.num_batches_tracked"] = torch.tensor(0)
    sd["layer1.0.conv1.weight"] = torch.zeros(64, 64, 3, 3)
    sd["layer1.0.conv2.weight"] = torch.zeros(64, 64, 3, 3)
    sd["fc.weight"] = torch.zeros(1000, 64)
    sd["fc.bias"] = torch.zeros(1000)
    return sd


def test_other_architecture_lists_expected_and_found(tmp_path):
    path = tmp_path / "resnet.pt"
    torch.save(_resnet_like_state_dict(), path)
    with pytest.raises(ModelLoadError) as err:
        weights.load_model(path)
    message = str(err.value)
    assert str(path) in message
    assert "expected an EDSR state dict" in message and "head.0.weight [F, C, 3, 3]" in message
    assert "found conv1.weight [64, 3, 7, 7], bn1.weight [64]" in message
    assert "keys in all" in message

    with pytest.raises(ModelLoadError, match=r"^resnet-in-memory: not an EDSR/MDSR state dict"):
        weights.infer_model_config(_resnet_like_state_dict(), source="resnet-in-memory")


def test_damaged_edsr_state_dict_names_each_problem():
    sd = random_state_dict(edsr_layout(TINY_R, TINY_F, 2))
    del sd["body.1.body.2.bias"]
    sd["tail.1.weight"] = torch.zeros(3, TINY_F, 5, 5)
    sd["extra.weight"] = torch.zeros(2)
    with pytest.raises(ModelLoadError) as err:
        weights.load_model(sd)
    message = str(err.value)
    assert "EDSR x2 (n_resblocks=2, n_feats=8" in message
    assert "missing 1 keys: body.1.body.2.bias [8]" in message
    assert "unexpected keys: extra.weight [2]" in message
    assert "tail.1.weight is [3, 8, 5, 5], expected [3, 8, 3, 3]" in message


def _write(tmp_path, name: str, content) -> str:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    return str(path)


@pytest.mark.parametrize(
    "name, content, pattern",
    [
        ("empty.pt", b"", r"the file is empty \(0 bytes\)"),
        ("noise.pt", random.Random(0).randbytes(4096), r"not a PyTorch weights file \(4096 bytes of binary data\)"),
        ("notes.pt", b"these are not weights\n", r"not a PyTorch weights file \(22 bytes of UTF-8 text\)"),
        (
            "plain-pickle.pt",
            b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00}\x94.",
            r"not a PyTorch weights file \(a Python pickle\)",
        ),
        ("tensor.pt", torch.zeros(3), r"expected a state dict .* found a Tensor"),
        ("other-format.pt", {"format": "someone-else/v9", "state_dict": {}}, r"unknown checkpoint format"),
        (
            "bad-config.pt",
            {"format": "edsr-ray/model-v1", "model_config": {"arch": "edsr", "scales": [5]}, "state_dict": {}},
            r"\(model_config\): scales: scale 5 is not supported",
        ),
    ],
    ids=["zero-byte", "random-bytes", "text", "plain-pickle", "tensor", "foreign-format", "invalid-config"],
)
def test_bad_files_are_clear_errors(tmp_path, name, content, pattern):
    path = _write(tmp_path, name, content)
    with pytest.raises(ModelLoadError, match=pattern) as err:
        weights.load_model(path)
    assert path in str(err.value)
    if isinstance(content, bytes) and content:  # the message names the type, never quotes the file
        assert repr(content[:8])[2:-1] not in str(err.value) and content[:8].hex() not in str(err.value)


def test_special_files_and_foreign_schemes_fail_clearly_without_blocking(tmp_path, finishes):
    os.mkfifo(tmp_path / "model.pt")
    (tmp_path / "zero.pt").symlink_to("/dev/zero")
    (tmp_path / "ckpt").mkdir()
    os.mkfifo(tmp_path / "ckpt" / "model.pt")  # a checkpoint folder whose model.pt is a FIFO
    cases = {
        tmp_path / "model.pt": (ModelLoadError, "not a regular file: a FIFO"),
        tmp_path / "zero.pt": (ModelLoadError, "not a regular file: a character device reached through a symbolic"),
        tmp_path / "ckpt": (ModelLoadError, "not a regular file: a FIFO"),
        "gs://bucket/model.pt": (LocationError, "unsupported scheme 'gs://'"),
        "S3://bucket/model.pt": (LocationError, "did you mean s3://?"),
        "http://host/model.pt": (LocationError, "unsupported scheme 'http://'"),
        "gs:bucket/model.pt": (LocationError, "./gs:bucket/model.pt"),
    }
    for source, (error, words) in cases.items():
        with pytest.raises(error) as info:
            finishes(lambda s=source: weights.load_model(s), 20)
        assert words in str(info.value) and str(source).split("://")[-1] in str(info.value), info.value
        if isinstance(source, str):  # the supported kinds are named
            assert "s3://bucket/key" in str(info.value) and "models:/" in str(info.value)


def test_missing_file_and_empty_directory(tmp_path):
    missing = tmp_path / "nowhere" / "edsr_x2.pt"
    with pytest.raises(ModelLoadError, match=r"no such file") as err:
        weights.load_model(missing)
    assert str(missing) in str(err.value)

    folder = tmp_path / "checkpoint_000003"
    folder.mkdir()
    (folder / "notes.txt").write_text("not weights")
    with pytest.raises(ModelLoadError, match=r"no model\.pt .* it holds notes\.txt") as err:
        weights.load_model(folder)
    assert str(folder) in str(err.value)

    with pytest.raises(ModelLoadError, match="unsupported model source int"):
        weights.load_model(42)


# --------------------------------------------------------------------------------------------------------------------
# x2 -> x3 / x4 initialisation


@pytest.fixture
def x2_weights(tmp_path) -> tuple[dict[str, torch.Tensor], str]:
    sd = random_state_dict(edsr_layout(TINY_R, TINY_F, 2), seed=11)
    path = tmp_path / "edsr_x2.pt"
    torch.save(sd, path)
    return sd, str(path)


@pytest.mark.parametrize(
    "scale, left, skipped",
    [
        (3, ["tail.0.0.weight", "tail.0.0.bias"], ["tail.0.0.weight", "tail.0.0.bias"]),
        (4, ["tail.0.2.weight", "tail.0.2.bias"], []),
    ],
)
def test_x2_initialisation_reports_what_was_left_at_init(x2_weights, scale, left, skipped, caplog):
    sd, path = x2_weights
    for source in (path, sd):
        model = models.EDSR(TINY_R, TINY_F, scale)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with caplog.at_level(logging.INFO, logger="edsr_ray.weights"):
            report = weights.init_from(model, source)
        assert report.left_at_init == left
        assert report.skipped == skipped
        assert set(report.copied) == set(before) - set(left)
        after = model.state_dict()
        for key in report.copied:
            assert torch.equal(after[key], sd[key]), key
        for key in left:
            assert torch.equal(after[key], before[key]), key
        assert "left at init: " + ", ".join(left) in caplog.text


def test_initialisation_with_another_body_names_both(x2_weights):
    _, path = x2_weights
    with pytest.raises(ModelLoadError, match=r"n_resblocks=2, n_feats=8 but the model's has n_resblocks=2, n_feats=16"):
        weights.load_matching(models.EDSR(TINY_R, 16, 3), path)
    with pytest.raises(ModelLoadError, match=r"n_resblocks=2, n_feats=8 but the model's has n_resblocks=3, n_feats=8"):
        weights.load_matching(models.EDSR(3, TINY_F, 3), path)


def test_initialisation_with_nothing_in_common():
    with pytest.raises(ModelLoadError, match="no tensor matches the model"):
        weights.load_matching(models.EDSR(1, 4, 2), {"encoder.weight": torch.zeros(4, 4)})


def test_initialisation_keeps_the_models_own_mean_shift():
    sd = random_state_dict(edsr_layout(TINY_R, TINY_F, 2), rgb_range=1)
    model = models.EDSR(TINY_R, TINY_F, 2, rgb_range=255)
    report = weights.load_matching(model, sd)
    assert set(report.skipped) == {"sub_mean.bias", "add_mean.bias"}
    assert torch.allclose(model.sub_mean.bias, -255 * torch.tensor(MEAN))


# --------------------------------------------------------------------------------------------------------------------
# Object storage and the model registry (real services)


@pytest.mark.slow
def test_save_and_load_through_s3(s3, lr_input):
    from edsr_ray.errors import StorageError

    model = randomised(models.EDSR(1, TINY_F, 2, res_scale=0.5))
    uri = weights.save_model(model, "s3://edsr/test-models/run-1/checkpoint_000001/model.pt")
    with torch.no_grad():
        expected = model(lr_input)
        # The object itself, and the checkpoint "directory" (a prefix holding model.pt) with or without a slash.
        for source in (
            uri,
            "s3://edsr/test-models/run-1/checkpoint_000001",
            "s3://edsr/test-models/run-1/checkpoint_000001/",
        ):
            loaded = weights.load_model(source)
            assert loaded.config == model.config
            assert torch.equal(loaded(lr_input), expected)
    init = models.EDSR(1, TINY_F, 4)
    assert weights.init_from(init, uri).left_at_init == ["tail.0.2.weight", "tail.0.2.bias"]
    with pytest.raises(StorageError, match=r"test-models/missing\.pt"):
        weights.load_model("s3://edsr/test-models/missing.pt")


@pytest.mark.slow
def test_load_from_the_mlflow_registry(tmp_path, monkeypatch, lr_input):
    from edsr_ray import tracking
    from edsr_ray.config import TrackingConfig

    monkeypatch.setenv("EDSR_RAY_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking.resolve_tracking_uri()
    run_id = tracking.find_or_create_run(TrackingConfig(experiment="models-test"), "runs/m", "m", uri, resume=False)
    logger = tracking.RunLogger(run_id, uri)
    model = randomised(models.MDSR(1, TINY_F, (2, 3)))
    model_uri = log_model(logger, weights.save_model(model, tmp_path / "model.pt"))
    assert logger.register("tiny-mdsr", model_uri) == "1"
    with torch.no_grad():
        expected = model(lr_input, 3)
        for source in ("models:/tiny-mdsr/1", f"runs:/{run_id}/model"):
            loaded = weights.load_model(source)
            assert loaded.config == model.config
            assert torch.equal(loaded(lr_input, 3), expected)
