"""What can be checked of the GPU path without a GPU (issue 13): a "cuda" provider that would run on the
CPU is refused, manifests record and check where plans were built, generate() keeps to a plan's profile,
export profiles follow the runtime's batch, TensorRT failures become BackendError, `aptp doctor`."""

from __future__ import annotations

import dataclasses
import json
import sys
import types

import numpy as np
import onnxruntime as ort
import pytest
from engines_export_fixture import ANCHORS, copy_export

import engines.runtime as runtime_mod
import engines.backends as backends
import engines.backends.ort as sessions
from engines import BackendError, ManifestError, Runtime
from engines.backends.cuda import plan_mismatch
from engines.denoise import DEFAULT_BATCH_SIZE, unet_batch
from engines.manifest import FORMAT_VERSION, Manifest, TensorRTInfo
from engines.backends.ort import CUDA_EP, OrtSession, probe_model_bytes

pytestmark = pytest.mark.usefixtures("one_thread")

HAS_CUDA = CUDA_EP in ort.get_available_providers()


@pytest.fixture
def cuda_listed(monkeypatch):
    """onnxruntime-gpu on a machine where CUDA cannot start: the build lists CUDA, sessions fall back to the
    CPU. The real CPU onnxruntime is asked for CUDA (it then logs and runs on the CPU, as onnxruntime-gpu
    does without a GPU or without the CUDA/cuDNN libraries); only the list of built-in providers is widened."""
    if HAS_CUDA:
        pytest.skip("this onnxruntime really has CUDA")
    real = ort.get_available_providers()
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA_EP, *real])
    monkeypatch.setattr(sessions, "_installed", lambda d: "1.0" if d == "onnxruntime-gpu" else None)


# -- provider "cuda" never runs on the CPU --------------------------------------------------------------
def test_probe_model_is_a_valid_onnx_graph():
    import onnx

    model = onnx.load_from_string(probe_model_bytes())
    onnx.checker.check_model(model, full_check=True)
    assert sessions.probe_provider("cpu") == ["CPUExecutionProvider"]


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime really has CUDA")
def test_cuda_without_cuda_build_is_one_clear_line(pixel):
    with pytest.raises(BackendError) as e:
        Runtime.load(pixel.dir, provider="cuda")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith('provider "cuda" cannot run here') and 'pip install -e ".[gpu]"' in msg


def test_cuda_listed_but_falling_back_to_cpu_is_refused(pixel, cuda_listed):
    with pytest.raises(BackendError) as e:
        Runtime.load(pixel.dir, provider="cuda")
    msg = str(e.value)
    assert "\n" not in msg
    assert "lists CUDA but a session created with it runs on CPUExecutionProvider" in msg


def test_cuda_session_that_fell_back_is_refused(pixel, cuda_listed):
    """Past the up-front check (e.g. CUDA lost between load and first use), each session checks itself."""
    with pytest.raises(BackendError, match="could not start CUDA for this graph .* refusing to run it on the CPU"):
        OrtSession(pixel.dir / "router.onnx", "cuda")


def test_cuda_session_reporting_only_cpu_is_refused(pixel, monkeypatch):
    """The session check reads what onnxruntime reports for the session, whatever the wheel."""
    real = ort.InferenceSession

    class CpuOnly(real):
        def get_providers(self):
            return ["CPUExecutionProvider"]

    monkeypatch.setattr(ort, "InferenceSession", CpuOnly)
    monkeypatch.setattr(sessions, "_ort_providers", lambda p: ["CPUExecutionProvider"])
    with pytest.raises(BackendError, match="could not start CUDA"):
        OrtSession(pixel.dir / "router.onnx", "cuda")
    with pytest.raises(BackendError, match="runs on CPUExecutionProvider"):
        monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA_EP, "CPUExecutionProvider"])
        monkeypatch.setattr(sessions, "_installed", lambda d: "1.0" if d == "onnxruntime-gpu" else None)
        backends.check_provider("cuda")


def test_both_onnxruntime_flavours_installed_is_named(monkeypatch):
    monkeypatch.setattr(sessions, "_installed", lambda d: "1.20.0")
    reason = sessions.cuda_unavailable_reason()
    assert "onnxruntime and onnxruntime-gpu are both installed" in reason and "pip uninstall" in reason


# -- manifest: where plans were built -------------------------------------------------------------------
ENV = {"version": "10.8.0.43", "gpu": "NVIDIA H200", "compute_capability": "9.0"}


def as_version(d: dict, version: int) -> dict:
    """A manifest dict as an older aptp wrote it: without the keys later format versions added."""
    d["format_version"] = version
    if version < 4:
        d.pop("openvino", None)
        d.pop("sampling", None)
    if version < 3:
        for k in ("family", "added_cond"):
            d.pop(k, None)
        for k in ("pooled_dim", "uncond"):
            d["text_encoder"].pop(k, None)
    if version < 2:
        d.pop("tensorrt", None)
    return d


def _with_plans(pixel, tensorrt=ENV, version=FORMAT_VERSION) -> dict:
    d = as_version(json.loads((pixel.dir / "manifest.json").read_text()), version)
    d.pop("tensorrt", None)
    d["experts"][0]["files"]["tensorrt"] = dict(d["experts"][0]["files"]["onnx"], path="experts/expert_00.plan")
    if tensorrt is not None:
        d["tensorrt"] = dict(tensorrt, tf32=False)
    return d


def test_manifest_records_plan_environment(pixel):
    m = Manifest.from_dict(_with_plans(pixel))
    assert m.tensorrt == TensorRTInfo("10.8.0.43", "NVIDIA H200", "9.0", False)
    assert Manifest.from_dict(json.loads(json.dumps(m.to_dict()))) == m  # round trip
    with pytest.raises(ManifestError, match="tensorrt: TensorRT plans are listed but not where they were built"):
        Manifest.from_dict(_with_plans(pixel, tensorrt=None))
    with pytest.raises(ManifestError, match="compute_capability: '9' is not of the form"):
        Manifest.from_dict(_with_plans(pixel, tensorrt=dict(ENV, compute_capability="9")))


def test_version_1_manifests_still_load(pixel, tmp_path):
    d = copy_export(pixel, tmp_path / "v1")
    m = json.loads((d / "manifest.json").read_text())
    assert "tensorrt" in m and "family" in m
    (d / "manifest.json").write_text(json.dumps(as_version(m, 1)))  # what aptp 0.1 wrote: no such keys
    rt = Runtime.load(d)
    assert rt.manifest.format_version == 1 and rt.manifest.tensorrt is None
    assert "tensorrt" not in rt.manifest.to_dict()  # written back as version 1
    assert rt.route(list(ANCHORS)) == [0, 1]
    assert rt.manifest.family == "pixel" and rt.manifest.text_encoder.uncond == "empty_prompt"
    now = Runtime.load(pixel.dir).generate(list(ANCHORS), steps=2, seed=3)
    assert [np.asarray(a).tobytes() for a in rt.generate(list(ANCHORS), steps=2, seed=3)] == \
        [np.asarray(a).tobytes() for a in now]  # an old manifest generates what a current one does
    v1_plans = _with_plans(pixel, tensorrt=None, version=1)
    assert Manifest.from_dict(v1_plans).tensorrt is None  # v1 could not record it: unchecked, accepted
    with pytest.raises(ManifestError, match="unknown key.*'tensorrt'"):
        Manifest.from_dict(_with_plans(pixel, version=1))  # the key did not exist in version 1


def test_plan_mismatch_rules():
    assert plan_mismatch(ENV, ENV) == (None, None)
    err, _ = plan_mismatch(ENV, dict(ENV, version="10.9.0.34"))
    assert "built with TensorRT 10.8.0.43" in err and "rebuild them here" in err
    err, _ = plan_mismatch(ENV, dict(ENV, gpu="NVIDIA A100", compute_capability="8.0"))
    assert "compute capability 8.0" in err
    err, warn = plan_mismatch(ENV, dict(ENV, gpu="NVIDIA H100 80GB HBM3"))
    assert err is None and "tuned on NVIDIA H200" in warn


def test_runtime_refuses_plans_from_another_machine(pixel, monkeypatch):
    rt = Runtime.load(pixel.dir)
    rt.manifest = dataclasses.replace(rt.manifest, tensorrt=TensorRTInfo(**ENV))
    monkeypatch.setattr(runtime_mod, "plan_environment", lambda: dict(ENV, version="11.0.0.1"))
    with pytest.raises(BackendError, match="built with TensorRT 10.8.0.43 .* this machine has TensorRT 11.0.0.1"):
        rt._check_plan_environment()
    monkeypatch.setattr(runtime_mod, "plan_environment", lambda: dict(ENV))
    rt._check_plan_environment()


# -- generate keeps to the plan's profile; profiles follow the runtime's batch ----------------------------
class ProfileLimited:
    """A real onnxruntime session that, like a TensorRT plan, refuses batches above its profile's maximum."""

    def __init__(self, inner, max_batch):
        self.inner, self.max_batch, self.batches = inner, max_batch, []
        self.input_names, self.output_names = inner.input_names, inner.output_names

    def run(self, feeds):
        n = feeds["sample"].shape[0]
        self.batches.append(n)
        if n > self.max_batch:
            raise BackendError(f"batch {n} is outside the profile (max {self.max_batch})")
        return self.inner.run(feeds)


@pytest.mark.parametrize("guidance, per_call", [(7.5, 2), (1.0, 4)])
def test_generate_chunks_to_the_profile_maximum(pixel, guidance, per_call):
    prompts = [ANCHORS[0]] * 5
    ref = Runtime.load(pixel.dir).generate(prompts, steps=2, guidance_scale=guidance, expert=0, batch_size=8)
    rt = Runtime.load(pixel.dir)
    limited = ProfileLimited(rt.unet(0), max_batch=4)
    rt._sessions["expert:0"] = limited
    images = rt.generate(prompts, steps=2, guidance_scale=guidance, expert=0, batch_size=8)
    assert max(limited.batches) == unet_batch(per_call, guidance) <= 4
    assert sorted(set(limited.batches)) == sorted({unet_batch(per_call, guidance), unet_batch(5 % per_call, guidance)})
    for a, b in zip(images, ref, strict=True):  # an image never depends on its batch
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=1)


def test_unet_profiles_follow_the_runtime_batch(pixel):
    from aptp_export.export_options import ExportOptions
    from aptp_export.export_spec import unet_batch_range, unet_spec

    assert ExportOptions().max_batch == DEFAULT_BATCH_SIZE
    assert unet_batch_range(DEFAULT_BATCH_SIZE) == (1, unet_batch(DEFAULT_BATCH_SIZE, 7.5), 16)
    assert unet_batch_range(4) == (1, 8, 8)  # opt never above max
    spec = unet_spec(3, (16, 16), 16, 32)
    lo, opt, hi = spec.profile()["sample"]
    assert (lo[0], opt[0], hi[0]) == (1, 16, 16)
    assert spec.sizes()["batch"] == 2  # traced small: the same graph, a fraction of the memory
    specs = json.loads((pixel.dir / "specs.json").read_text())
    assert specs["expert_00"]["axes"]["batch"] == {"min": 1, "opt": 8, "max": 8, "multiple_of": 1, "trace": 2}


# -- TensorRT failures become BackendError -----------------------------------------------------------------
def _fake_tensorrt(monkeypatch):
    """A stand-in `tensorrt` module whose constructors fail as the real ones do without a usable GPU."""

    def no_gpu(*_a, **_k):
        raise TypeError("pybind11::init(): factory function returned nullptr")

    logger = type("Logger", (), {"ERROR": 0, "WARNING": 1, "VERBOSE": 2, "__init__": lambda self, *a: None})
    trt = types.SimpleNamespace(__version__="10.8.0.43", Builder=no_gpu, Runtime=no_gpu, Logger=logger)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt


def test_builder_type_error_becomes_backend_error(monkeypatch, tmp_path):
    import aptp_export.tensorrt_build as tb
    from aptp_export.export_spec import unet_spec

    _fake_tensorrt(monkeypatch)
    with pytest.raises(BackendError, match="TensorRT could not start on a CUDA GPU"):
        tb.build_engine(tmp_path / "x.onnx", unet_spec(3, (16, 16), 16, 32), tmp_path / "x.plan")
    monkeypatch.setattr(tb, "device_info", lambda: None)  # even with a GPU listed, no builder -> False
    assert tb.tensorrt_available() is False


def test_runtime_type_error_becomes_backend_error(monkeypatch, tmp_path):
    import engines.backends.tensorrt as ts

    trt = _fake_tensorrt(monkeypatch)
    monkeypatch.setattr(ts, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(ts, "import_cudart", lambda: object())
    with pytest.raises(BackendError, match=r"x\.plan: TensorRT could not start on a CUDA GPU"):
        ts.TensorRTSession(tmp_path / "x.plan")


def test_refused_timing_cache_is_replaced():
    from aptp_export.tensorrt_build import _set_timing_cache

    class Config:
        def __init__(self):
            self.calls = []

        def create_timing_cache(self, data):
            return data

        def set_timing_cache(self, cache, ignore_mismatch):
            self.calls.append(cache)
            return cache == b""  # a cache from another GPU is refused

    cfg, notes = Config(), []
    _set_timing_cache(cfg, b"other gpu", notes)
    assert cfg.calls == [b"other gpu", b""] and "ignored" in notes[0]


# -- aptp doctor --------------------------------------------------------------------------------------------
def test_doctor_reports_versions_providers_and_export(pixel, capsys):
    from aptp.cli import main
    from engines.backends.doctor import collect

    report = collect(pixel.dir)
    assert report["versions"]["onnxruntime"].startswith("onnxruntime")
    assert "cpu" in report["onnxruntime"]["working"] and report["providers"][0] == "cpu"
    assert report["export"]["format_version"] == FORMAT_VERSION and report["export"]["plans"] == []
    if not HAS_CUDA:
        assert "no CUDA provider" in report["onnxruntime"]["cuda"] and "tensorrt" not in report["providers"]
    assert main(["doctor", "--export", str(pixel.dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["export"]["experts"] == 2


def test_doctor_says_when_plans_do_not_match(pixel, tmp_path, monkeypatch):
    import engines.backends.doctor as doctor

    d = copy_export(pixel, tmp_path / "p")
    (d / "manifest.json").write_text(json.dumps(_with_plans(pixel)))
    monkeypatch.setattr(doctor, "plan_environment", lambda: dict(ENV, compute_capability="8.6", gpu="RTX 3090"))
    out = doctor.collect(d)["export"]
    assert out["plans_match"] is False and "compute capability 8.6" in out["error"]
