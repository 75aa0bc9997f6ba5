"""ONNX export (edsr_ray.export, jobs/export.py): every exported graph is run by ONNX Runtime on CPU and compared with
the PyTorch model computed here directly (``model(x * 255, s) / 255``), on crops of real photos at odd sizes.

Sources are real: a bare state dict in the official layout, project checkpoints on the embedded S3 server, and a
model registered in MLflow on sqlite.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edsr_ray import storage
from edsr_ray.config import TrackingConfig
from edsr_ray.export import (
    DEFAULT_OPSET,
    FP16_TOLERANCE,
    FP32_TOLERANCE,
    MAX_OPSET,
    MIN_OPSET,
    ONNX_FORMAT,
    export_model,
    export_onnx,
)
from edsr_ray.inference import Upscaler
from edsr_ray.mlflow_model import log_model
from edsr_ray.models import EDSR, MDSR
from edsr_ray.weights import save_model

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "export.py"
SIZES = ((17, 23), (64, 48), (101, 67))  # (height, width), odd ones included
VARIANTS = [("edsr", 2), ("edsr", 3), ("edsr", 4), ("mdsr", 2), ("mdsr", 3), ("mdsr", 4)]


@pytest.fixture(scope="module")
def nets() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)  # freshly initialised weights: random, so every scale and branch computes something else
    out = {f"edsr_x{s}": EDSR(2, 16, s).eval() for s in (2, 3, 4)}
    out["mdsr"] = MDSR(1, 16, (2, 3, 4)).eval()
    return out


def _net(nets, arch: str, scale: int) -> torch.nn.Module:
    return nets["mdsr"] if arch == "mdsr" else nets[f"edsr_x{scale}"]


@pytest.fixture(scope="module")
def crops(photos) -> dict[tuple[int, int, int], np.ndarray]:
    """(batch, height, width) -> float32 (batch, 3, h, w) in [0, 1]: crops of real photos, batch 1 and 3."""
    names = ("motorcycle_right", "chelsea", "astronaut")
    out = {}
    for h, w in SIZES:
        for batch in (1, 3):
            imgs = [photos[n][31 + 5 * i : 31 + 5 * i + h, 47 + 3 * i : 47 + 3 * i + w] for i, n in enumerate(names)]
            out[batch, h, w] = np.stack(imgs[:batch]).transpose(0, 3, 1, 2).astype(np.float32) / 255
    return out


def _torch_reference(net: torch.nn.Module, x: np.ndarray, scale: int) -> np.ndarray:
    """The contract computed independently of the export module: [0, 1] in, the network on [0, 255], [0, 1] out."""
    with torch.inference_mode():
        return (net(torch.from_numpy(x) * 255, scale) / 255).numpy()


def _session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


@pytest.mark.parametrize(("arch", "scale"), VARIANTS, ids=[f"{a}_x{s}" for a, s in VARIANTS])
def test_onnx_runtime_matches_pytorch_on_photos_at_any_size(nets, crops, tmp_path, arch, scale, one_torch_thread):
    net = _net(nets, arch, scale)
    path = tmp_path / f"{arch}_x{scale}.onnx"
    result = export_onnx(net, path, scale=scale if arch == "mdsr" else None, source="test")
    assert result.scale == scale and result.opset == DEFAULT_OPSET and result.max_abs_diff <= FP32_TOLERANCE
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary or report files left behind

    onnx.checker.check_model(str(path), full_check=True)
    graph = onnx.load(str(path))
    assert [i.version for i in graph.opset_import if i.domain in ("", "ai.onnx")] == [DEFAULT_OPSET]
    (inp,), (out,) = graph.graph.input, graph.graph.output
    assert (inp.name, out.name) == ("input", "output")
    assert inp.type.tensor_type.elem_type == out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert _dims(inp) == ["batch", 3, "height", "width"]
    assert _dims(out)[:2] == ["batch", 3] and all(isinstance(d, str) for d in _dims(out)[2:])  # dynamic, not fixed

    session = _session(path)
    up = Upscaler(net, precision="fp32", device="cpu")
    for (batch, h, w), x in crops.items():
        y = session.run(None, {"input": x})[0]
        assert y.shape == (batch, 3, h * scale, w * scale) and y.dtype == np.float32
        ref = _torch_reference(net, x, scale)
        assert np.abs(y - ref).max() <= FP32_TOLERANCE, (batch, h, w)
        # The project's inference path, rounded to 8 bits, agrees within one level (float summation order).
        pixels = np.clip(np.round(y * 255), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
        expected = up.upscale_batch(np.round(x * 255).astype(np.uint8).transpose(0, 2, 3, 1), scale)
        assert np.abs(pixels.astype(int) - expected.astype(int)).max() <= 1


def test_metadata_round_trips_through_onnx_runtime(nets, tmp_path):
    net = nets["mdsr"]
    path = tmp_path / "mdsr_x3.onnx"
    export_onnx(net, path, scale=3, opset=18, source="s3://bucket/mdsr.pt")
    meta = _session(path).get_modelmeta()
    expected = {
        "edsr_ray.format": ONNX_FORMAT,
        "architecture": "mdsr",
        "scale": "3",
        "n_resblocks": "1",
        "n_feats": "16",
        "res_scale": "1.0",
        "rgb_range": "255",
        "input_name": "input",
        "output_name": "output",
        "input_layout": "NCHW",
        "input_channels": "RGB",
        "input_dtype": "float32",
        "input_range": "0..1",
        "output_range": "0..1, not clipped",
        "compute_dtype": "float32",
        "opset": "18",
        "source": "s3://bucket/mdsr.pt",
    }
    found = dict(meta.custom_metadata_map)
    assert {k: found.get(k) for k in expected} == expected
    assert found["edsr_ray.version"]
    assert "x3" in meta.description and "[0, 1]" in meta.description
    assert [i.version for i in onnx.load(str(path)).opset_import if i.domain in ("", "ai.onnx")] == [18]


def test_fp16_keeps_float32_io_and_stays_close(nets, crops, tmp_path):
    net = nets["edsr_x4"]
    before = copy.deepcopy(net.state_dict())
    fp32, fp16 = tmp_path / "x4.onnx", tmp_path / "x4_fp16.onnx"
    export_onnx(net, fp32)
    result = export_onnx(net, fp16, fp16=True)
    assert result.precision == "fp16" and result.metadata["compute_dtype"] == "float16"
    # The caller's model is still float32 and unchanged (the export converts a copy).
    assert all(v.dtype == torch.float32 and torch.equal(v, before[k]) for k, v in net.state_dict().items())

    onnx.checker.check_model(str(fp16), full_check=True)
    graph = onnx.load(str(fp16))
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert graph.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    conv_weights = [t for t in graph.graph.initializer if len(t.dims) == 4 and t.dims[2] == 3]
    assert conv_weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in conv_weights)
    assert fp16.stat().st_size < 0.6 * fp32.stat().st_size
    x = crops[3, 64, 48]
    y = _session(fp16).run(None, {"input": x})[0]
    assert np.abs(y - _torch_reference(net, x, 4)).max() <= FP16_TOLERANCE


def test_official_state_dict_file_exports(nets, crops, tmp_path):
    sd_file = tmp_path / "edsr_x3_official.pt"
    torch.save(nets["edsr_x3"].state_dict(), sd_file)  # a bare state dict: the released files' layout
    out = tmp_path / "out" / "model.onnx"
    result = export_model(sd_file, out)
    assert result.scale == 3 and result.metadata["source"] == str(sd_file)
    x = crops[1, 17, 23]
    y = _session(out).run(None, {"input": x})[0]
    assert np.abs(y - _torch_reference(nets["edsr_x3"], x, 3)).max() <= FP32_TOLERANCE


def _main(argv: list) -> int:
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("export_job", JOB)
    job = module_from_spec(spec)
    spec.loader.exec_module(job)
    return job.main([str(a) for a in argv])


def _check_output(path: Path, net: torch.nn.Module, scale: int, x: np.ndarray) -> None:
    y = _session(path).run(None, {"input": x})[0]
    assert np.abs(y - _torch_reference(net, x, scale)).max() <= FP32_TOLERANCE


def test_checkpoints_on_s3_export_and_s3_output(s3, nets, crops, tmp_path, capsys):
    save_model(nets["mdsr"], "s3://edsr/export-tests/run/checkpoint_000001/model.pt")
    x = crops[1, 17, 23]
    # The object itself, and the checkpoint folder (a prefix holding model.pt).
    for i, source in enumerate(
        ("s3://edsr/export-tests/run/checkpoint_000001/model.pt", "s3://edsr/export-tests/run/checkpoint_000001")
    ):
        out = tmp_path / f"mdsr_{i}.onnx"
        assert _main(["--model", source, "--scale", 4, "--output", out, "-q"]) == 0
        assert f"wrote {out}" in capsys.readouterr().out
        _check_output(out, nets["mdsr"], 4, x)
    # An S3 output: one object, verified before it was written.
    assert (
        _main(
            [
                "--model",
                "s3://edsr/export-tests/run/checkpoint_000001",
                "--scale",
                2,
                "--output",
                "s3://edsr/export-tests/x2.onnx",
            ]
        )
        == 0
    )
    local = tmp_path / "from_s3.onnx"
    local.write_bytes(storage.read_bytes("s3://edsr/export-tests/x2.onnx"))
    _check_output(local, nets["mdsr"], 2, x)
    assert storage.list_files("s3://edsr/export-tests/", None) == [
        "s3://edsr/export-tests/run/checkpoint_000001/model.pt",
        "s3://edsr/export-tests/x2.onnx",
    ]


@pytest.fixture
def registry(mlflow_store):
    """A run logger in a real MLflow store on sqlite, where the test registers its model."""
    from edsr_ray import tracking

    uri = mlflow_store
    run_id = tracking.find_or_create_run(TrackingConfig(experiment="export"), "runs/e", "e", uri, resume=False)
    logger = tracking.RunLogger(run_id, uri)
    return logger


def test_registered_model_exports_by_uri(registry, nets, crops, tmp_path, capsys):
    net = nets["edsr_x2"]
    weights = save_model(net, tmp_path / "model.pt")
    assert registry.register("export-edsr", log_model(registry, weights), aliases=("best",)) == "1"
    out = tmp_path / "registered.onnx"
    assert _main(["--model", "models:/export-edsr@best", "--output", out, "--opset", MAX_OPSET]) == 0
    assert "edsr x2, fp32, opset 23" in capsys.readouterr().out
    _check_output(out, net, 2, crops[3, 101, 67])
    assert _session(out).get_modelmeta().custom_metadata_map["source"] == "models:/export-edsr@best"


@pytest.mark.slow
def test_export_command_in_its_own_process(nets, crops, tmp_path):
    model = tmp_path / "mdsr.pt"
    save_model(nets["mdsr"], model)
    out = tmp_path / "onnx" / "mdsr_x3_fp16.onnx"
    result = subprocess.run(
        [
            sys.executable,
            str(JOB),
            "--model",
            str(model),
            "--scale",
            "3",
            "--format",
            "onnx",
            "--output",
            str(out),
            "--fp16",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"wrote {out}") and "mdsr x3, fp16" in result.stdout
    assert "Traceback" not in result.stderr and "torchvision" not in result.stderr  # the exporter's notices stay quiet
    y = _session(out).run(None, {"input": crops[1, 64, 48]})[0]
    assert np.abs(y - _torch_reference(nets["mdsr"], crops[1, 64, 48], 3)).max() <= FP16_TOLERANCE
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]


def test_bad_inputs_exit_2_with_one_error_line(nets, tmp_path, capsys):
    edsr, mdsr = tmp_path / "edsr_x2.pt", tmp_path / "mdsr.pt"
    save_model(nets["edsr_x2"], edsr)
    save_model(nets["mdsr"], mdsr)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "folder.onnx").mkdir()
    (tmp_path / "notes.pt").write_text("not weights")
    out = tmp_path / "out" / "model.onnx"
    cases = [
        (["--model", tmp_path / "missing.pt", "--output", out], "missing.pt"),
        (["--model", tmp_path / "notes.pt", "--output", out], "notes.pt"),
        (["--model", mdsr, "--output", out], "choose one with --scale"),
        (["--model", mdsr, "--scale", 5, "--output", out], "scale 5 is not one of the model's scales [2, 3, 4]"),
        (["--model", edsr, "--scale", 4, "--output", out], "scale 4 does not match the model"),
        (["--model", "gs://bucket/model.pt", "--output", out], "unsupported scheme 'gs://'"),
        (["--model", edsr, "--output", "gs://bucket/model.onnx"], "--output gs://bucket/model.onnx: unsupported"),
        (["--model", edsr, "--output", "models:/x/1"], "is not supported here"),
        (["--model", edsr, "--output", tmp_path / "afile" / "model.onnx"], "is a file, not a folder"),
        (["--model", edsr, "--output", tmp_path / "folder.onnx"], "is a folder"),
        (["--model", edsr, "--output", tmp_path / "model.pt"], "must end with .onnx"),
        (["--model", edsr, "--output", out, "--opset", MIN_OPSET - 1], f"from {MIN_OPSET} to {MAX_OPSET}"),
        (["--model", edsr, "--output", out, "--opset", MAX_OPSET + 1], f"from {MIN_OPSET} to {MAX_OPSET}"),
    ]
    for argv, words in cases:
        assert _main(argv) == 2, argv
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and words in errors[0], (argv, err)
        assert "Traceback" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "model.pt").exists()
    assert sorted(p.name for p in (tmp_path / "folder.onnx").iterdir()) == []
