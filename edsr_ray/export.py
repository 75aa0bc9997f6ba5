"""Export EDSR/MDSR models to ONNX, for ONNX Runtime, TensorRT, OpenVINO and the desktop upscalers that take ONNX.

Contract of every exported file (the convention of ONNX super-resolution models, so tools need no option for it):

- one input ``input``: float32 ``(batch, 3, height, width)``, RGB, values in [0, 1]; batch, height and width are
  dynamic (any size, including odd ones);
- one output ``output``: float32 ``(batch, 3, s*height, s*width)``, RGB, nominally in [0, 1] and **not clipped**: the
  caller clips and rounds, as it converts to its own pixel type;
- one scale per file. An MDSR model is exported once per scale (``--scale``), through :class:`FixedScale`, so the file
  holds only that scale's branch; the scale is in the metadata and can be read off the output shape.

The networks work in [0, ``rgb_range``] (255 for the official weights); the graph multiplies the input by
``rgb_range`` and divides the output by it, so callers never see the model's own range.

fp32 by default. ``fp16=True`` stores float16 weights and computes in float16 while keeping the float32 input and
output (:class:`HalfInside`), so every file has the same I/O contract; it halves the file and is for GPU runtimes
(CUDA, TensorRT, DirectML). ONNX Runtime's CPU provider converts such a graph back to float32, so on a CPU it only
saves disk space.

Opset: :data:`DEFAULT_OPSET` (17: TensorRT 8.6+, ONNX Runtime 1.14+, OpenVINO 2023+) unless asked; accepted
:data:`MIN_OPSET` to :data:`MAX_OPSET`. PyTorch's exporter writes opset 18 or later and converts down to 15-17; every
operator of these networks (Conv, Relu, Add, Mul, Div, DepthToSpace) has had its current definition since opset 13.

Metadata (``metadata_props``, all strings; ONNX Runtime: ``session.get_modelmeta().custom_metadata_map``): see
:func:`onnx_metadata`.

Every file is checked before it is written (``onnx.checker`` with ``full_check``, then ONNX Runtime on CPU against
the PyTorch model on small odd-sized inputs with batch 2 and 1, within :data:`FP32_TOLERANCE` or
:data:`FP16_TOLERANCE`), written atomically (a temporary file beside it, then a rename; one PUT on S3), and read back.
Nothing else is written. ``onnx``, ``onnxscript`` and ``onnxruntime`` (the ``[onnx]`` extra) are imported only here.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

import edsr_ray
from edsr_ray.errors import ConfigError, EdsrRayError

logger = logging.getLogger(__name__)

ONNX_FORMAT = "edsr-ray/onnx-v1"
DEFAULT_OPSET = 17
MIN_OPSET = 15  # lower targets fail the exporter's down-conversion (it then keeps opset 18 without saying so)
MAX_OPSET = 23  # the highest PyTorch's exporter writes
INPUT_NAME, OUTPUT_NAME = "input", "output"
# Largest |ONNX Runtime - PyTorch fp32| accepted, in the graph's [0, 1] units. fp32: 1e-4 is 0.03 grey levels, far
# below the 0.5 that can change a rounded 8-bit pixel (measured differences are around 1e-6). fp16: one grey level.
FP32_TOLERANCE = 1e-4
FP16_TOLERANCE = 1 / 255
# Inputs of the check after export: (batch, height, width), odd sizes and two batch sizes, so a graph that fixed any
# of the three dimensions, or mishandled an odd side, fails it.
PROBE_SHAPES = ((2, 13, 11), (1, 9, 17))
# The example the exporter traces with: batch 2 so the batch dimension is not specialised to 1.
_TRACE_SHAPE = (2, 3, 24, 20)


class ExportError(EdsrRayError):
    """The export failed: the exporter, ``onnx.checker``, or ONNX Runtime disagreeing with the PyTorch model."""


class FixedScale(nn.Module):
    """The network at one scale with the ONNX contract's pixel range: (B, 3, H, W) in [0, 1] → (B, 3, H*s, W*s)."""

    def __init__(self, net: nn.Module, scale: int):
        super().__init__()
        self.net = net
        self.scale = int(scale)
        self.rgb_range = float(net.config.rgb_range)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x * self.rgb_range, self.scale)  # (B, 3, H*s, W*s) in [0, rgb_range]
        return y / self.rgb_range


class HalfInside(nn.Module):
    """float32 in and out, float16 weights and arithmetic inside: one I/O contract for fp32 and fp16 files.

    Holds a float16 copy: ``.half()`` converts in place, and the caller's float32 model must stay as it is. (A graph
    converted to float16 after export fails ``onnx.checker``; exporting a half model directly gives a float16 input.)
    """

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = copy.deepcopy(inner).half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.half()).float()


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote."""

    output: str
    scale: int
    opset: int
    precision: str
    size_bytes: int
    max_abs_diff: float  # largest |ONNX Runtime - PyTorch fp32| on the check inputs, [0, 1] units
    metadata: dict[str, str]

    def line(self) -> str:
        """The command's one-line report."""
        tolerance = FP16_TOLERANCE if self.precision == "fp16" else FP32_TOLERANCE
        return (
            f"wrote {self.output} ({self.size_bytes / 1e6:.1f} MB): {self.metadata['architecture']} x{self.scale}, "
            f"{self.precision}, opset {self.opset}; ONNX Runtime matches PyTorch within {self.max_abs_diff:.1e} "
            f"(tolerance {tolerance:.1e}, [0, 1] units)"
        )


def require_onnx() -> None:
    """Fail with the install command when the ``[onnx]`` extra is missing, before any work is done."""
    missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"ONNX export needs {', '.join(missing)}: pip install 'edsr-ray[onnx]'")


def check_opset(opset: int) -> int:
    if not isinstance(opset, int) or isinstance(opset, bool) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ConfigError(f"--opset must be an integer from {MIN_OPSET} to {MAX_OPSET}, got {opset!r}")
    return opset


def check_output(output: str | os.PathLike[str]) -> str:
    """``output`` as a string after the checks that need no export: kind of location, name, writable folder.

    The name must end with ``.onnx``: a slip such as ``--output model.pt`` would otherwise replace a weights file.
    """
    from edsr_ray import storage

    text = os.fspath(output)
    kind = storage.location_kind(output, storage.DATA_LOCATIONS, what="--output")
    if not text.lower().endswith(".onnx"):
        raise ConfigError(f"--output {text}: the file name must end with .onnx")
    if kind == storage.LOCAL:
        path = storage.local_path(output)
        if path.is_dir():
            raise ConfigError(f"--output {text}: is a folder; give a file name such as {path / 'model.onnx'}")
        folder = path.parent
        while not folder.exists():  # the nearest existing folder is where the new folders would be made
            folder = folder.parent
        if not folder.is_dir():
            raise ConfigError(f"--output {text}: cannot be created: {folder} is a file, not a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError(f"--output {text}: cannot write into {folder}: permission denied")
    return text


def onnx_metadata(cfg: Any, scale: int, *, opset: int, precision: str, source: str) -> dict[str, str]:
    """The properties stored in every exported file: what it is, its I/O contract and where it came from."""
    return {
        "edsr_ray.format": ONNX_FORMAT,
        "edsr_ray.version": edsr_ray.__version__,
        "architecture": cfg.arch,
        "scale": str(scale),
        "n_resblocks": str(cfg.n_resblocks),
        "n_feats": str(cfg.n_feats),
        "res_scale": str(cfg.res_scale),
        "rgb_range": str(cfg.rgb_range),  # the network's own range; the graph maps [0, 1] onto it
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "input_layout": "NCHW",
        "input_channels": "RGB",
        "input_dtype": "float32",
        "input_range": "0..1",
        "output_range": "0..1, not clipped",
        "compute_dtype": "float16" if precision == "fp16" else "float32",
        "opset": str(opset),
        "source": source,
    }


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Keep the exporter's internal notices (missing torchvision ops, opset down-conversion) out of the user's log."""
    names = ("torch.onnx", "torch.export", "onnxscript", "onnx_ir")
    levels = {name: logging.getLogger(name).level for name in names}
    try:
        for name in names:
            logging.getLogger(name).setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _graph_module(model: nn.Module, scale: int, fp16: bool) -> nn.Module:
    module = FixedScale(model, scale).eval()
    return HalfInside(module).eval() if fp16 else module


def to_onnx(model: nn.Module, scale: int, *, opset: int, fp16: bool, source: str) -> Any:
    """The ``onnx.ModelProto`` of ``model`` at ``scale`` (dynamic batch, height and width), metadata included."""
    precision = "fp16" if fp16 else "fp32"
    module = _graph_module(model, scale, fp16)
    example = torch.rand(*_TRACE_SHAPE, generator=torch.Generator().manual_seed(0))
    try:
        with _quiet_exporter():
            program = torch.onnx.export(
                module,
                (example,),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=opset,
                dynamo=True,
                dynamic_shapes={"x": {0: "batch", 2: "height", 3: "width"}},
                external_data=False,
                verbose=False,
            )
    except Exception as exc:  # the exporter raises its own error types; say which model and what failed
        raise ExportError(f"the ONNX exporter failed: {type(exc).__name__}: {str(exc)[:300]}") from exc
    proto = program.model_proto
    written = next((imp.version for imp in proto.opset_import if imp.domain in ("", "ai.onnx")), None)
    if written != opset:
        raise ExportError(f"asked for opset {opset}, but the exporter wrote opset {written}")
    metadata = onnx_metadata(model.config, scale, opset=opset, precision=precision, source=source)
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = (
        f"{model.config.arch.upper()} x{scale} super-resolution: input float32 (batch, 3, height, width) RGB in "
        f"[0, 1]; output float32 (batch, 3, {scale}*height, {scale}*width) RGB, not clipped."
    )
    return proto


def _probe(batch: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(height * width).random((batch, 3, height, width), dtype=np.float32)


def verify(data: bytes, model: nn.Module, scale: int, *, fp16: bool) -> float:
    """Check a serialised graph: ``onnx.checker`` (full), then ONNX Runtime on CPU against PyTorch fp32.

    Returns the largest absolute difference ([0, 1] units); raises :class:`ExportError` past the tolerance, on a
    wrong output shape, or when the fp16 graph overflows (run in PyTorch fp16: ONNX Runtime's CPU provider computes
    such graphs in float32 and would hide it).
    """
    import onnx
    import onnxruntime as ort

    try:
        onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"onnx.checker rejects the exported graph: {str(exc)[:300]}") from exc
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    reference = FixedScale(model, scale).eval()
    half = _graph_module(model, scale, fp16=True) if fp16 else None
    tolerance = FP16_TOLERANCE if fp16 else FP32_TOLERANCE
    worst = 0.0
    for b, h, w in PROBE_SHAPES:
        x = _probe(b, h, w)
        y = session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]  # (b, 3, h*s, w*s)
        if y.shape != (b, 3, h * scale, w * scale) or y.dtype != np.float32:
            raise ExportError(
                f"the exported graph maps a {x.shape} input to {y.dtype} {y.shape}; expected float32 "
                f"{(b, 3, h * scale, w * scale)}"
            )
        with torch.inference_mode():
            expected = reference(torch.from_numpy(x)).numpy()
            if half is not None and not bool(torch.isfinite(half(torch.from_numpy(x))).all()):
                raise ExportError("the model overflows float16 (Inf/NaN outputs); export it as fp32")
        worst = max(worst, float(np.abs(y - expected).max()))
    if not worst <= tolerance:
        raise ExportError(
            f"ONNX Runtime's output differs from PyTorch's by {worst:.2e} ([0, 1] units), more than the tolerance "
            f"{tolerance:.1e}"
        )
    return worst


def export_onnx(
    model: nn.Module,
    output: str | os.PathLike[str],
    *,
    scale: int | None = None,
    fp16: bool = False,
    opset: int = DEFAULT_OPSET,
    source: str = "",
    storage: Any = None,
) -> OnnxExport:
    """Export ``model`` at ``scale`` to the ONNX file ``output`` (local path or ``s3://`` URI), verified.

    ``scale`` may be left out for a single-scale model; MDSR needs it. ``source`` is recorded in the metadata.
    """
    from edsr_ray import storage as store
    from edsr_ray.inference import resolve_scale
    from edsr_ray.models import unwrap_model

    require_onnx()
    text = check_output(output)
    opset = check_opset(opset)
    model = unwrap_model(model)
    scale = resolve_scale(model, scale)
    if model.config.n_colors != 3:
        raise ConfigError(f"the model has {model.config.n_colors} colour channel(s); ONNX export is for RGB models")
    precision = "fp16" if fp16 else "fp32"
    proto = to_onnx(model, scale, opset=opset, fp16=fp16, source=source)
    data = proto.SerializeToString()
    diff = verify(data, model, scale, fp16=fp16)
    store.write_bytes(text, data, storage)
    # Read back: the file at the output is exactly the graph that was verified.
    if store.read_bytes(text, storage, max_bytes=len(data) + 1) != data:
        raise ExportError(f"{text}: the file read back differs from the graph written")
    metadata = {p.key: p.value for p in proto.metadata_props}
    logger.info("exported %s x%d (%s, opset %d) to %s", model.config.arch, scale, precision, opset, text)
    return OnnxExport(text, scale, opset, precision, len(data), diff, metadata)


def export_model(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    scale: int | None = None,
    fp16: bool = False,
    opset: int = DEFAULT_OPSET,
    storage: Any = None,
) -> OnnxExport:
    """Load ``source`` (anything :func:`edsr_ray.models.load_model` takes) and export it with :func:`export_onnx`.

    The output and the options are checked before the model is read, so a mistake there costs no download.
    """
    from edsr_ray.weights import load_model

    require_onnx()
    check_output(output)
    check_opset(opset)
    model = load_model(source, storage=storage)
    return export_onnx(model, output, scale=scale, fp16=fp16, opset=opset, source=os.fspath(source), storage=storage)
