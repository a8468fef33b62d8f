"""TensorRT engine building and the TensorRT session. The GPU tests skip when tensorrt (or a GPU) is
absent; the "missing extra" behaviour is tested everywhere else."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from engines_export_fixture import tiny_unet

from aptp_export.export_spec import unet_spec
from aptp_export.onnx_export import UNetGraph, export_onnx
from aptp_export.tensorrt_build import TensorRTUnavailable, build_engine, tensorrt_available

HAS_TRT = importlib.util.find_spec("tensorrt") is not None

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore")]




@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed: the missing-extra path cannot be exercised")
def test_missing_tensorrt_names_the_extra(tmp_path):
    spec = unet_spec(3, (16, 16), 16, 32)
    with pytest.raises(TensorRTUnavailable, match=r'pip install -e "\.\[tensorrt\]"'):
        build_engine(tmp_path / "x.onnx", spec, tmp_path / "x.plan")
    assert not tensorrt_available()

    from engines import BackendError, Runtime

    with pytest.raises(BackendError, match=r'pip install -e "\.\[tensorrt\]"'):
        Runtime.load(tmp_path, provider="tensorrt")  # refused before the directory is even read

    from aptp_export.export_options import ExportOptions
    from aptp_export.export_parts import ExpertModel, ExportParts
    from aptp_export.manifest_writer import write_export_dir

    out = tmp_path / "export"
    with pytest.raises(TensorRTUnavailable, match="tensorrt"):
        parts = ExportParts(text_encoder=None, router_encoder=None, router_head=None, tokenizer=tmp_path,
                            scheduler_config={}, sample_size=(16, 16), in_channels=3, text_len=16, context_dim=32,
                            router_max_length=64, embedding_dim=32, dense_macs=1.0)
        write_export_dir(out, [ExpertModel(torch.nn.Identity(), 1.0)], parts,
                         ExportOptions(backend="tensorrt", progress=False))
    assert not out.exists(), "nothing may be exported when the backend cannot be built"


@pytest.mark.tensorrt
@pytest.mark.skipif(not (HAS_TRT and tensorrt_available()), reason="needs tensorrt and an NVIDIA GPU")
@pytest.mark.parametrize("precision, tol", [("fp32", 2e-4), ("fp16", 2e-2)])
def test_engine_matches_onnxruntime(tmp_path, precision, tol):
    """Build a plan (strongly typed: fp32, or fp16 from the converted graph) from the same ExportSpec as the
    ONNX graph and compare the TensorRT session with onnxruntime fp32 on shapes inside the profile; a
    shape outside it is refused with a clear error. fp32 plans have TF32 off, hence the tight tolerance."""
    from engines import BackendError
    from engines.backends.ort import OrtSession
    from engines.backends.tensorrt import TensorRTSession

    unet = tiny_unet((8, 16), 3, 16, seed=4)
    spec = unet_spec(3, (16, 16), 16, 32, batch=(1, 2, 8), size_multiple=2)
    onnx_path = tmp_path / "u.onnx"
    export_onnx(UNetGraph(unet), spec, onnx_path)
    plan_source = onnx_path
    if precision == "fp16":
        plan_source = tmp_path / "u16.onnx"
        export_onnx(UNetGraph(unet), spec, plan_source, precision="fp16")
    cache = tmp_path / "timing.cache"
    res = build_engine(plan_source, spec, tmp_path / "u.plan", timing_cache=cache)
    assert res.plan.is_file() and cache.is_file()
    trt_sess = TensorRTSession(res.plan, expected_inputs=tuple(spec.input_names))
    ort_sess = OrtSession(onnx_path)
    for n in (1, 2, 6):
        x, t, e = (v.numpy() for v in spec.sample_inputs(spec.sizes(batch=n), seed=n))
        feeds = {"sample": x, "timestep": t, "encoder_hidden_states": e}
        a, b = trt_sess.run(feeds)["out_sample"], ort_sess.run(feeds)["out_sample"]
        assert np.abs(a - b).max() / np.abs(b).max() <= tol
    with pytest.raises(BackendError, match="outside the engine's profile"):
        x, t, e = (v.numpy() for v in spec.sample_inputs(spec.sizes(batch=8), seed=0))
        trt_sess.run({"sample": np.concatenate([x, x]), "timestep": np.concatenate([t, t]),
                      "encoder_hidden_states": np.concatenate([e, e])})
    # rebuilding with the timing cache works and is not slower by much
    build_engine(plan_source, spec, tmp_path / "u2.plan", timing_cache=cache)
    assert trt_sess.max_batch == 8
