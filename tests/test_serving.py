"""The upscaling service on a small real Ray instance: pixels, limits, errors, auth, batching, and its config files.

One Ray + Serve instance serves three applications for the whole module: ``main`` (no auth, batching on),
``secure`` (bearer token from an environment variable) and ``strict`` (a request timeout no model call can meet).
The models are tiny random-weight EDSR x2/x3/x4 and MDSR networks saved to files, so every expected image is
computed independently here with :func:`edsr_ray.inference.upscale` on the same weights.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import socket
import struct
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import yaml

from edsr_ray.codecs import DecodedImage, decode_image, encode_image
from edsr_ray.errors import ConfigError
from edsr_ray.imaging import imresize
from edsr_ray.inference import upscale, upscale_decoded
from edsr_ray.models import EDSR, MDSR
from edsr_ray.serving import (
    INGRESS_DEPLOYMENT,
    MODEL_DEPLOYMENT,
    RequestRejected,
    app_builder,
    check_image,
    load_settings,
    output_format,
    settings_from_args,
)
from edsr_ray.weights import load_model, save_model

ROOT = Path(__file__).parents[1]
TOKEN_ENV = "EDSR_TEST_SERVE_TOKEN"
TOKEN = "test-token-7f3a9c"
TILE = 32  # LR tile side: the 48x64 test image is tiled, the 24x32 one is not
BATCH_MAX_PIXELS = 32 * 32  # 24x32 images take the batched path, 48x64 ones the single-image path
MAX_BODY = 256 * 1024
MAX_PIXELS = 200 * 200
MAX_CLIP_FRAMES = 30


# --------------------------------------------------------------------------------------------------------------------
# Settings and config files (no Ray)


def test_settings_from_dotted_args_as_serve_run_passes_them():
    s = settings_from_args(
        {"models.x2": "/w/x2.pt", "models.mdsr": "s3://b/mdsr.pt", "max_batch_size": "4", "tile": "null"}, environ={}
    )
    assert s.models == {"x2": "/w/x2.pt", "mdsr": "s3://b/mdsr.pt"}
    assert s.max_batch_size == 4 and s.tile is None
    assert s.default == "x2"  # no default_model: the first listed


@pytest.mark.parametrize(
    ("args", "key"),
    [
        ({"models.x2": "/a.pt", "max_batch_sise": "4"}, "max_batch_sise"),
        ({"models.x2": "/a.pt", "max_batch_size": "0"}, "max_batch_size"),
        ({"models.x2": "/a.pt", "max_batch_size": "many"}, "max_batch_size"),
        ({"models.x2": "/a.pt", "max_batch_size": "32", "max_ongoing_requests": "8"}, "max_ongoing_requests"),
        ({"models.x2": "/a.pt", "default_model": "x4"}, "default_model"),
        ({"models.x2": "/a.pt", "precision": "fp8"}, "precision"),
        ({"models.x2": "/a.pt", "storage.endpoint_url": "minio:9000"}, "storage.endpoint_url"),
        ({"models.bad name": "/a.pt"}, "models.bad name"),
        ({"models.x2": ""}, "models.x2"),
        ({"models.x2": "gs://bucket/x2.pt"}, "models.x2"),
        ({"models.x2": "S3://bucket/x2.pt"}, "models.x2"),
        ({"models.x2": "https://host/x2.pt"}, "models.x2"),
        ({"models.x2": "gs:bucket/x2.pt"}, "models.x2"),
        ({"models.x2": "/a.pt", "storage.max_read_bytes": "0"}, "storage.max_read_bytes"),
        ({}, "models"),
    ],
)
def test_bad_settings_name_the_key(args, key):
    with pytest.raises(ConfigError) as info:
        settings_from_args(args, environ={})
    assert f"{key}:" in str(info.value)
    assert str(info.value).startswith("application args:")


def test_model_sources_in_foreign_schemes_name_the_supported_ones():
    with pytest.raises(ConfigError) as info:
        settings_from_args({"models.x2": "S3://bucket/x2.pt"}, environ={})
    message = str(info.value)
    assert message.startswith("application args: models.x2: S3://bucket/x2.pt: unsupported scheme 'S3://'")
    assert "did you mean s3://?" in message and "models:/" in message and "a local path" in message
    s = settings_from_args(
        {"models.a": "models:/edsr/1", "models.b": "runs:/abc/model", "models.c": "./x:y.pt"}, environ={}
    )
    assert s.models == {"a": "models:/edsr/1", "b": "runs:/abc/model", "c": "./x:y.pt"}


def test_a_settings_file_that_is_not_a_regular_file_fails_at_once(tmp_path, finishes):
    os.mkfifo(tmp_path / "serve.yaml")
    with pytest.raises(ConfigError, match=r"serve\.yaml: not a regular file: a FIFO"):
        finishes(lambda: settings_from_args({"config": str(tmp_path / "serve.yaml")}, environ={}), 20)


def test_settings_file_from_arg_or_environment_with_args_on_top(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({"models": {"x2": "/w/x2.pt"}, "max_batch_size": 4}))
    s = settings_from_args({"config": str(path), "models.x4": "/w/x4.pt", "tile": "64"}, environ={})
    assert s.models == {"x2": "/w/x2.pt", "x4": "/w/x4.pt"} and s.max_batch_size == 4 and s.tile == 64
    s = settings_from_args({}, environ={"EDSR_SERVE_CONFIG": str(path)})
    assert s.models == {"x2": "/w/x2.pt"}
    path.write_text("models: {x2: /w/x2.pt}\nbatch: 3\n")
    with pytest.raises(ConfigError, match=r"serve\.yaml: batch: unknown key"):
        settings_from_args({"config": str(path)}, environ={})


def test_serve_config_yaml_is_valid_offline():
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    data = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    config = ServeDeploySchema.model_validate(data)
    (application,) = config.applications
    assert application.import_path == "edsr_ray.serving:app_builder"
    settings = settings_from_args(application.args, environ={})  # the app args pass the settings loader
    assert settings.num_gpus >= 1 and settings.max_ongoing_requests >= settings.max_batch_size
    names = {d.name for d in application.deployments}
    assert names == {INGRESS_DEPLOYMENT, MODEL_DEPLOYMENT}  # a misspelt name would silently configure nothing
    for deployment in application.deployments:
        AutoscalingConfig.model_validate(deployment.autoscaling_config)  # the schema leaves it a plain dict
    assert config.http_options.host == "127.0.0.1"


def test_serve_run_entry_point_builds_the_application():
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.deployment import Application

    # serve/app.py is what `serve run serve.app:app` imports from the repository root.
    spec = importlib.util.spec_from_file_location("serve_app_entry", ROOT / "serve" / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    app = module.app
    built = call_user_app_builder_with_args_if_necessary(app, {"models.x2": "/w/x2.pt", "num_cpus": "0"})
    assert isinstance(built, Application)
    with pytest.raises(ConfigError, match="max_batch_size"):
        app_builder({"models.x2": "/w/x2.pt", "max_batch_size": "-1"})


def test_image_checks_without_a_server():
    png = encode_image(np.zeros((10, 20, 3), np.uint8))
    assert check_image(png, name="a.png", max_pixels=200) == (20, 10, "PNG")
    with pytest.raises(RequestRejected) as info:
        check_image(png, name="a.png", max_pixels=199)
    assert info.value.status == 413
    assert output_format("JPG", "PNG") == "jpeg" and output_format("same", "WEBP") == "webp"
    assert output_format("same", "GIF") == "png"  # a format the service does not write falls back to PNG


# --------------------------------------------------------------------------------------------------------------------
# The running service


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, str]:
    """Tiny random-weight EDSR x2/x3/x4 and MDSR files, plus one configured name whose file does not exist."""
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    paths = {f"x{s}": save_model(EDSR(1, 8, s), folder / f"edsr_x{s}.pt") for s in (2, 3, 4)}
    paths["mdsr"] = save_model(MDSR(1, 8, scales=(2, 3, 4)), folder / "mdsr.pt")
    paths["missing"] = str(folder / "not-there.pt")
    return paths


@pytest.fixture(scope="module")
def nets(weights) -> dict:
    return {name: load_model(path) for name, path in weights.items() if name != "missing"}


@pytest.fixture(scope="module")
def service(weights):
    """URLs of a local Serve instance running the main, secure and strict applications, and of its metrics."""
    import ray
    from ray import serve

    from edsr_ray.serving import build_app

    old_token = os.environ.get(TOKEN_ENV)
    os.environ[TOKEN_ENV] = TOKEN  # set before Ray starts: its worker processes inherit the driver's environment
    port, metrics_port = _free_port(), _free_port()
    common = {
        "models": weights,
        "num_cpus": 0,
        "ingress_num_cpus": 0,
        "tile": TILE,
        "max_batch_size": 8,
        "batch_wait_timeout_s": 1.0,  # long enough for all concurrent test requests to meet in one batch
        "batch_max_pixels": BATCH_MAX_PIXELS,
        "max_body_bytes": MAX_BODY,
        "max_pixels": MAX_PIXELS,
        "max_clip_frames": MAX_CLIP_FRAMES,
    }
    ray.init(
        address="local",
        num_cpus=2,
        object_store_memory=200 * 2**20,
        include_dashboard=False,
        _metrics_export_port=metrics_port,
        _system_config={"metrics_report_interval_ms": 1000},  # custom metrics reach /metrics within a second
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for name, prefix, extra in (
            ("main", "/", {}),
            ("secure", "/secure", {"auth_token_env": TOKEN_ENV}),
            ("strict", "/strict", {"request_timeout_s": 0.001}),
        ):
            app = build_app(load_settings({**common, **extra}))
            serve.run(app, name=name, route_prefix=prefix, logging_config={"log_level": "WARNING"})
        yield {"url": f"http://127.0.0.1:{port}", "metrics": f"http://127.0.0.1:{metrics_port}/metrics"}
    finally:
        serve.shutdown()
        ray.shutdown()
        if old_token is None:
            os.environ.pop(TOKEN_ENV, None)
        else:
            os.environ[TOKEN_ENV] = old_token


@pytest.fixture(scope="module")
def client(service):
    with httpx.Client(base_url=service["url"], timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def image(photos) -> np.ndarray:
    return np.ascontiguousarray(photos["coffee"][100:148, 200:264])  # (48, 64, 3): tiled, single-image path


def _decoded(response: httpx.Response) -> DecodedImage:
    assert response.status_code == 200, response.text
    return decode_image(response.content)


@pytest.mark.slow
@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("style", ["raw", "multipart"])
def test_upscale_equals_the_shared_inference_path(client, nets, image, scale, style):
    png = encode_image(image, "png")
    kwargs = {"content": png} if style == "raw" else {"files": {"file": ("coffee.png", png, "image/png")}}
    response = client.post("/v1/upscale", params={"scale": scale}, **kwargs)
    out = _decoded(response)
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-upscale-model"] == f"x{scale}"  # no model named: the one with this scale
    assert out.rgb.shape == (48 * scale, 64 * scale, 3)
    expected = upscale(nets[f"x{scale}"], image, scale, tile=TILE)
    np.testing.assert_array_equal(out.rgb, expected)


@pytest.mark.slow
def test_mdsr_serves_every_scale_and_output_formats(client, nets, image):
    png = encode_image(image, "png")
    out = _decoded(client.post("/v1/upscale", params={"scale": 3, "model": "mdsr"}, content=png))
    np.testing.assert_array_equal(out.rgb, upscale(nets["mdsr"], image, 3, tile=TILE))
    jpeg = client.post("/v1/upscale", params={"scale": 2, "model": "mdsr", "format": "jpeg"}, content=png)
    assert jpeg.headers["content-type"] == "image/jpeg" and _decoded(jpeg).rgb.shape == (96, 128, 3)
    same = client.post("/v1/upscale", params={"scale": 4, "format": "same"}, content=encode_image(image, "webp"))
    assert same.headers["content-type"] == "image/webp" and _decoded(same).rgb.shape == (192, 256, 3)


@pytest.mark.slow
def test_grey_alpha_and_self_ensemble_go_through_upscale_decoded(client, nets, image):
    rgba = np.concatenate([image, np.linspace(0, 255, 48 * 64).reshape(48, 64, 1).astype(np.uint8)], axis=2)
    grey = image[..., 1]
    for array, ensemble in ((rgba, False), (grey, False), (image, True)):
        source = DecodedImage.from_array(array)
        response = client.post(
            "/v1/upscale", params={"scale": 2, "self_ensemble": ensemble}, content=encode_image(source, "png")
        )
        out = _decoded(response)
        expected = upscale_decoded(nets["x2"], source, 2, tile=TILE, self_ensemble=ensemble)
        assert out.grey == source.grey and (out.alpha is None) == (source.alpha is None)
        np.testing.assert_array_equal(out.rgb, expected.rgb)
        if source.alpha is not None:
            np.testing.assert_array_equal(out.alpha, expected.alpha)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose valid IHDR declares width x height, with no pixel data (a decompression bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk + b"\x00" * 32


def _chunks(total: int):
    sent = 0
    while sent < total:
        yield b"\x89PNG" + os.urandom(16_000)
        sent += 16_004


BAD_REQUESTS = [
    # (id, query params, request kwargs, status, words in the error)
    ("bytes-over-limit", {"scale": 2}, {"content": os.urandom(MAX_BODY + 1)}, 413, "exceeds the limit of 262,144"),
    ("chunked-over-limit", {"scale": 2}, {"content": "stream"}, 413, "exceeds the limit of 262,144"),
    ("pixels-over-limit", {"scale": 2}, {"content": "big"}, 413, "exceeds the limit of 40,000"),
    ("bomb-header", {"scale": 2}, {"content": _png_header_only(100_000, 100_000)}, 413, "10,000,000,000 pixels"),
    ("not-an-image", {"scale": 2}, {"content": b"hello, this is text"}, 415, "not an image"),
    ("corrupt-png", {"scale": 2}, {"content": "truncated"}, 400, "truncated"),
    ("empty-body", {"scale": 2}, {"content": b""}, 400, "no image"),
    ("no-file-field", {"scale": 2}, {"files": {"image": ("a.png", b"x", "image/png")}}, 400, "no file field"),
    ("scale-5", {"scale": 5}, {"content": "good"}, 422, "scale 5 is not supported"),
    ("scale-not-a-number", {"scale": "two"}, {"content": "good"}, 422, "scale: Input should be a valid integer"),
    ("scale-of-other-model", {"scale": 3, "model": "x2"}, {"content": "good"}, 422, "does not upscale by x3"),
    ("unknown-model", {"scale": 2, "model": "edsr_x8"}, {"content": "good"}, 422, "unknown model 'edsr_x8'"),
    ("mdsr-without-scale", {"model": "mdsr"}, {"content": "good"}, 422, "choose one with scale="),
    ("bad-format", {"scale": 2, "format": "gif"}, {"content": "good"}, 422, "format 'gif' is not supported"),
    ("bad-quality", {"scale": 2, "quality": 0}, {"content": "good"}, 422, "quality"),
    ("bad-bool", {"scale": 2, "self_ensemble": "maybe"}, {"content": "good"}, 422, "self_ensemble"),
    ("unloadable-model", {"scale": 2, "model": "missing"}, {"content": "good"}, 503, "ModelLoadError"),
    # 4096 x 9 is within the pixel limit, but its x4 result is 16384 pixels wide: more than WebP can store.
    ("too-wide-for-webp", {"scale": 4, "format": "webp"}, {"content": "wide"}, 422, "too large for WEBP"),
    # 16376 x 1: its x4 result is 65504 wide, 4 more than JPEG can store.
    ("too-wide-for-jpeg", {"scale": 4, "format": "jpeg"}, {"content": "jpeg-wide"}, 422, "too large for JPEG"),
    # Output sizes: bad values are 400s naming the parameter; limits apply to the final size.
    ("outscale-zero", {"outscale": "0"}, {"content": "good"}, 400, "outscale: must be greater than 0"),
    ("outscale-negative", {"outscale": "-1.5"}, {"content": "good"}, 400, "outscale: must be greater than 0"),
    ("outscale-not-a-number", {"outscale": "big"}, {"content": "good"}, 400, "outscale: expected a number"),
    ("width-not-a-number", {"width": "abc"}, {"content": "good"}, 400, "width: expected a positive whole number"),
    ("height-zero", {"height": "0"}, {"content": "good"}, 400, "height: must be a positive whole number"),
    ("outscale-and-width", {"outscale": "2", "width": "100"}, {"content": "good"}, 400, "not both"),
    # 1000 x 1000 is more than 16 times the 40,000-pixel input limit.
    ("output-over-pixel-limit", {"width": 1000, "height": 1000}, {"content": "good"}, 413, "limit of 640,000"),
    ("outscale-too-wide-for-jpeg", {"outscale": "4.1", "format": "jpeg"}, {"content": "jpeg-wide"}, 422, "JPEG"),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("params", "kwargs", "status", "words"), [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS]
)
def test_bad_requests_get_their_status_and_a_json_error(client, image, params, kwargs, status, words):
    good = encode_image(image, "png")
    content = kwargs.get("content")
    if isinstance(content, str):
        kwargs = {
            "content": {
                "stream": lambda: _chunks(MAX_BODY + 20_000),  # no Content-Length: chunked transfer
                "big": lambda: encode_image(np.zeros((201, 200, 3), np.uint8)),
                "truncated": lambda: good[: len(good) // 2],
                "good": lambda: good,
                "wide": lambda: encode_image(np.zeros((9, 4096, 3), np.uint8)),
                "jpeg-wide": lambda: encode_image(np.zeros((1, 16376, 3), np.uint8)),
            }[content]()
        }
    response = client.post("/v1/upscale", params=params, **kwargs)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert words in response.json()["error"]
    # The replica keeps serving after every refusal.
    assert client.post("/v1/upscale", params={"scale": 2}, content=good).status_code == 200


# (query, model that serves it, its scale, final rows x columns) for the 48 x 64 test image, worked out by hand: the
# smallest scale that covers the size (the default model x2 first, then the others), round half up, one side alone
# keeps the aspect ratio (48 x 100 / 64 = 75).
SIZE_QUERIES = [
    ({"outscale": "1.5"}, "x2", 2, (72, 96)),
    ({"outscale": "3.5"}, "x4", 4, (168, 224)),
    ({"outscale": "5"}, "x4", 4, (240, 320)),  # past the largest scale: x4, then enlarged
    ({"width": "100"}, "x2", 2, (75, 100)),
    ({"height": "150"}, "x4", 4, (150, 200)),
    ({"width": "200", "height": "100"}, "x4", 4, (100, 200)),  # an exact box: 200 / 64 needs x4
    ({"outscale": "2.5", "model": "mdsr"}, "mdsr", 3, (120, 160)),  # MDSR: its own smallest covering scale
    ({"outscale": "1.5", "scale": 3}, "x3", 3, (72, 96)),  # a scale given is the one used
]


@pytest.mark.slow
def test_output_sizes_are_exact_and_equal_the_resized_model_output(client, nets, image):
    png = encode_image(image, "png")
    for params, name, scale, final in SIZE_QUERIES:
        response = client.post("/v1/upscale", params=params, content=png)
        out = _decoded(response)
        assert (response.headers["x-upscale-model"], response.headers["x-upscale-scale"]) == (name, str(scale))
        assert out.rgb.shape == (*final, 3), params
        expected = imresize(upscale(nets[name], image, scale, tile=TILE), output_shape=final)
        np.testing.assert_array_equal(out.rgb, expected, err_msg=str(params))
    # Grey and alpha keep what they are at the new size.
    rgba = np.concatenate([image, np.linspace(0, 255, 48 * 64).reshape(48, 64, 1).astype(np.uint8)], axis=2)
    out = _decoded(client.post("/v1/upscale", params={"width": "100"}, content=encode_image(rgba, "png")))
    expected = upscale_decoded(nets["x2"], DecodedImage.from_array(rgba), 2, tile=TILE)
    np.testing.assert_array_equal(out.alpha, imresize(expected.alpha, output_shape=(75, 100)))
    grey = _decoded(client.post("/v1/upscale", params={"outscale": "1.5"}, content=encode_image(image[..., 1], "png")))
    assert grey.grey and grey.rgb.shape == (72, 96, 3)


@pytest.mark.slow
def test_the_models_own_factor_is_the_models_pixels_unchanged(client, image):
    png = encode_image(image, "png")
    plain = _decoded(client.post("/v1/upscale", params={"scale": 2}, content=png))
    for params in ({"outscale": "2"}, {"outscale": "2.0"}, {"width": "128"}, {"width": "128", "height": "96"}):
        response = client.post("/v1/upscale", params=params, content=png)
        assert response.headers["x-upscale-model"] == "x2", params
        np.testing.assert_array_equal(_decoded(response).rgb, plain.rgb, err_msg=str(params))
    assert client.get("/v1/models").json()["limits"]["max_output_pixels"] == 16 * MAX_PIXELS


@pytest.mark.slow
def test_a_png_past_the_fast_encoders_limits_comes_back_exact(client, nets, strip):
    source = strip((1, 33_000, 3))  # x2: 66000 wide, past the 65535 a side the fast PNG writer can store
    response = client.post("/v1/upscale", params={"scale": 2, "model": "x2"}, content=encode_image(source))
    out = _decoded(response)
    assert struct.unpack(">II", response.content[16:24]) == (66_000, 2)  # the IHDR itself
    np.testing.assert_array_equal(out.rgb, upscale(nets["x2"], source, 2, tile=TILE))


@pytest.mark.slow
def test_outputs_jpeg_and_webp_cannot_store_are_refused_before_any_compute(client, strip):
    def model_calls() -> tuple[int, int]:
        stats = client.get("/v1/models").json()["stats"]
        return stats["single_images"], sum(int(size) * n for size, n in stats["batches"].items())

    before = model_calls()
    for fmt, width, words in (("jpeg", 16_376, "65504x4 image is too large for JPEG"), ("webp", 4_096, "WEBP")):
        png = encode_image(strip((1, width, 3)))
        response = client.post("/v1/upscale", params={"scale": 4, "format": fmt}, content=png)
        assert response.status_code == 422 and words in response.json()["error"], response.text
    assert model_calls() == before, "a refused request reached the model replica"
    ok = client.post("/v1/upscale", params={"scale": 4, "format": "jpeg"}, content=encode_image(strip((1, 16_375, 3))))
    assert ok.status_code == 200 and decode_image(ok.content).width == 65_500  # JPEG's limit itself is served


def _raw_http(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one request sent as raw bytes on a loopback socket."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
            head, _, body = answer.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
            if "content-length" in headers and len(body) >= int(headers["content-length"]):
                return int(lines[0].split()[1]), headers, body
    raise AssertionError(f"incomplete answer: {answer[:200]!r}")


@pytest.mark.slow
def test_requests_the_http_server_refuses_before_the_app_are_as_the_readme_says(service, client):
    """Ray Serve's HTTP server (uvicorn) answers requests it cannot parse itself, before the app: a plain-text 400
    that no Serve option changes. The README's Serve section documents these answers; this keeps it true."""
    port = int(service["url"].rsplit(":", 1)[1])
    target = b"/healthz?q=" + b"a" * (65_535 - len(b"/healthz?q="))  # the longest request target it parses
    assert _raw_http(port, b"GET " + target + b" HTTP/1.1\r\nHost: t\r\n\r\n")[0] == 200
    for request in (
        b"GET " + target + b"a HTTP/1.1\r\nHost: t\r\n\r\n",  # one byte more
        b"GET /healthz?q=" + b"a" * 65_536 + b" HTTP/1.1\r\nHost: t\r\n\r\n",  # a 64 KiB query string
        b"POST /v1/upscale?scale=2 HTTP/1.1\r\nHost: t\r\nContent-Length: abc\r\n\r\n",
    ):
        status, headers, body = _raw_http(port, request)
        assert (status, headers["content-type"]) == (400, "text/plain; charset=utf-8")
        assert body == b"Invalid HTTP request received."
    assert client.get("/healthz").json() == {"status": "ok"}


@pytest.mark.slow
def test_other_answers_are_json_and_the_service_stays_up(client):
    missing = client.get("/v2/nothing")
    assert missing.status_code == 404 and "error" in missing.json()
    assert client.get("/healthz").json() == {"status": "ok"}
    listing = client.get("/v1/models").json()
    by_name = {m["name"]: m for m in listing["models"]}
    assert by_name["mdsr"]["scales"] == [2, 3, 4] and by_name["x3"]["scales"] == [3]
    assert by_name["x2"]["dtype"] == "float32" and listing["precision"] == "auto"
    assert "ModelLoadError" in by_name["missing"]["error"]
    assert "not-there.pt" not in str(listing)  # server paths stay in the server log
    openapi = client.get("/openapi.json").json()
    assert "/v1/upscale" in openapi["paths"] and client.get("/docs").status_code == 200


@pytest.mark.slow
def test_requests_past_the_timeout_get_504_json(service, image):
    with httpx.Client(base_url=f"{service['url']}/strict", timeout=60) as c:
        response = c.post("/v1/upscale", params={"scale": 2}, content=encode_image(image, "png"))
        assert response.status_code == 504
        assert "request timeout" in response.json()["error"]
        assert c.get("/healthz").status_code == 200


@pytest.mark.slow
def test_bearer_token_auth(service, client, image):
    png = encode_image(image, "png")
    with httpx.Client(base_url=f"{service['url']}/secure", timeout=60) as c:
        missing = c.post("/v1/upscale", params={"scale": 2}, content=png)
        assert missing.status_code == 401 and "missing bearer token" in missing.json()["error"]
        assert missing.headers["www-authenticate"] == "Bearer"
        wrong = c.post("/v1/upscale", params={"scale": 2}, content=png, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json() == {"error": "invalid bearer token"}
        assert c.get("/v1/models").status_code == 401
        assert c.get("/healthz").status_code == 200  # liveness stays open for load balancers
        good = c.post("/v1/upscale", params={"scale": 2}, content=png, headers={"Authorization": f"Bearer {TOKEN}"})
        assert _decoded(good).rgb.shape == (96, 128, 3)
        assert TOKEN not in good.text
    assert client.post("/v1/upscale", params={"scale": 2}, content=png).status_code == 200  # main app: no auth


@pytest.mark.slow
def test_concurrent_small_images_are_batched(service, client, nets, photos):
    # 24x32 crops (under batch_max_pixels): equal sizes queue together in the replica and share forward passes.
    crops = [np.ascontiguousarray(photos["astronaut"][i * 24 : i * 24 + 24, 64:96]) for i in range(8)]
    before = client.get("/v1/models").json()["stats"]["batches"]

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=service["url"], timeout=60) as c:
            return await asyncio.gather(
                *(c.post("/v1/upscale", params={"scale": 4}, content=encode_image(crop)) for crop in crops)
            )

    responses = asyncio.run(send_all())
    after = client.get("/v1/models").json()["stats"]["batches"]
    new = {int(size): n - before.get(size, 0) for size, n in after.items() if n > before.get(size, 0)}
    assert sum(size * n for size, n in new.items()) == len(crops)  # every image went through the batched path
    assert max(new) > 1, f"no forward pass held more than one image: {new}"
    for crop, response in zip(crops, responses):
        np.testing.assert_array_equal(_decoded(response).rgb, upscale(nets["x4"], crop, 4))


def _metric(text: str, name: str, **tags: str) -> float:
    """Sum of the Prometheus samples of ``name`` whose labels include ``tags``."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in tags.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.slow
def test_prometheus_metrics_count_images_megapixels_and_rejections(service, client, image):
    png = encode_image(image, "png")
    assert client.post("/v1/upscale", params={"scale": 3}, content=png).status_code == 200
    assert client.post("/v1/upscale", params={"scale": 9}, content=png).status_code == 422
    deadline = time.monotonic() + 30
    while True:
        text = httpx.get(service["metrics"], timeout=10).text
        images = _metric(text, "ray_edsr_serve_images_total", application="main", model="x3", scale="3")
        megapixels = _metric(text, "ray_edsr_serve_input_megapixels_total", application="main", model="x3")
        rejected = _metric(text, "ray_edsr_serve_rejections_total", application="main", reason="bad_scale")
        if (images >= 1 and rejected >= 1) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert images >= 1 and rejected >= 1, "custom counters never reached /metrics"
    assert megapixels == pytest.approx(images * 48 * 64 / 1e6)
    assert "ray_serve_num_http_requests_total" in text  # Serve's own metrics are still exported


# --------------------------------------------------------------------------------------------------------------------
# Video clips


def _clip(tmp_path: Path, name: str, **fields) -> bytes:
    from edsr_ray.video.samples import SampleVideo, write_video

    path = tmp_path / name
    write_video(str(path), SampleVideo(width=48, height=32, options={"g": "6"}, **fields))
    return path.read_bytes()


def test_a_short_clip_round_trips_with_its_frames_times_and_audio(client, nets, tmp_path):
    import io

    import av
    from video_cases import packets

    data = _clip(tmp_path, "clip.mp4", frames=20)
    response = client.post("/v1/upscale", params={"scale": 2, "model": "x2"}, content=data)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "video/mp4" and response.headers["x-upscale-frames"] == "20"
    (tmp_path / "out.mp4").write_bytes(response.content)
    with av.open(io.BytesIO(data)) as src, av.open(str(tmp_path / "out.mp4")) as out:
        tb_in, tb_out = src.streams.video[0].time_base, out.streams.video[0].time_base
        want = [(round(float(f.pts * tb_in), 4), f.to_ndarray(format="rgb24")) for f in src.decode(video=0)]
        got = [(round(float(f.pts * tb_out), 4), f.to_ndarray(format="rgb24")) for f in out.decode(video=0)]
    assert [t for t, _ in got] == [t for t, _ in want]
    assert all(frame.shape == (64, 96, 3) for _, frame in got)

    # H.264 (4:2:0, CRF 18): near the model's frames, not equal (the exact, lossless check is the batch job's); each
    # frame is nearest to the model's output for its own input frame.
    def error(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.abs(a.astype(int) - b.astype(int)).mean())

    references = [upscale(nets["x2"], frame, 2) for _, frame in want[4:7]]
    errors = [error(got[5][1], reference) for reference in references]
    assert errors[1] < 8 and errors[1] < min(errors[0], errors[2]), errors
    assert packets(tmp_path / "out.mp4", "audio") == packets(tmp_path / "clip.mp4", "audio")


def test_clips_over_a_limit_get_413_naming_it_and_the_batch_job(client, tmp_path):
    long = _clip(tmp_path, "long.mp4", frames=MAX_CLIP_FRAMES + 10)
    response = client.post("/v1/upscale", params={"scale": 2, "model": "x2"}, content=long)
    assert response.status_code == 413 and response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert f"over the limit of {MAX_CLIP_FRAMES}" in error and "batch job (jobs/upscale.py)" in error
    # Matroska declares no frame count: the frames are counted before any is upscaled.
    uncounted = _clip(tmp_path, "long.mkv", frames=MAX_CLIP_FRAMES + 10, audio=None)
    response = client.post("/v1/upscale", params={"scale": 2, "model": "x2"}, content=uncounted)
    assert response.status_code == 413 and "batch job" in response.json()["error"]
    # Output sizes are for images: a clip with one is refused, naming the parameters.
    short = _clip(tmp_path, "short.mp4", frames=4, audio=None)
    response = client.post("/v1/upscale", params={"outscale": "1.5", "model": "x2"}, content=short)
    assert response.status_code == 422 and "apply to images only" in response.json()["error"]
