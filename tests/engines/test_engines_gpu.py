"""The runtime end to end on a GPU (issue 13): provider "cuda" really runs on CUDA, provider "tensorrt"
with fp32 and fp16 plans matches the CPU images, plans share one activation memory block, device-side
timing works. Marked `tensorrt`; skipped without a GPU (benchmarks/gpu_proof.py requires them to run)."""

from __future__ import annotations

import numpy as np
import pytest
from engines_export_fixture import ANCHORS, build_export

from engines import Runtime
from engines.backends.ort import CUDA_EP, cuda_unavailable_reason

try:
    from aptp_export.tensorrt_build import tensorrt_available

    HAS_TRT = tensorrt_available()
except Exception:  # noqa: BLE001
    HAS_TRT = False
HAS_CUDA = cuda_unavailable_reason() is None

pytestmark = [pytest.mark.tensorrt, pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore")]
PROMPTS = [ANCHORS[0], ANCHORS[1], "a red circle", "a blue background", "the letter K above a square"]


def _psnr(a, b) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu running on an NVIDIA GPU")
def test_cuda_provider_really_runs_on_cuda():
    ex = build_export("pixel")
    ref = Runtime.load(ex.dir).generate_with_info(PROMPTS, steps=6, seed=0)
    rt = Runtime.load(ex.dir, provider="cuda")
    res = rt.generate_with_info(PROMPTS, steps=6, seed=0)
    assert res.expert_ids == ref.expert_ids
    assert all(CUDA_EP in s._sess.get_providers() for s in rt._sessions.values())
    assert min(_psnr(a, b) for a, b in zip(res.images, ref.images, strict=True)) >= 40


@pytest.mark.skipif(not (HAS_TRT and HAS_CUDA), reason="needs tensorrt, cuda-python and onnxruntime-gpu on a GPU")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_provider_end_to_end(precision):
    from engines.backends.cuda import plan_environment

    ex = build_export("pixel", precision=precision, backend="tensorrt")
    assert ex.manifest.tensorrt is not None and not ex.manifest.tensorrt.tf32
    assert ex.manifest.tensorrt.to_dict() | {"tf32": False} == plan_environment() | {"tf32": False}
    assert not (ex.dir / "timing.cache").exists(), "nothing unlisted in the shipped directory"
    ref = Runtime.load(ex.dir).generate_with_info(PROMPTS, steps=6, seed=0)
    rt = Runtime.load(ex.dir, provider="tensorrt")
    assert rt.part_providers["experts"] == "tensorrt" and rt.part_providers["router"] == "onnxruntime-cuda"
    # batch_size 8 is above the plans' profile (max_batch=4 prompts): generate chunks instead of failing
    res = rt.generate_with_info(PROMPTS * 2, steps=6, seed=0, batch_size=8)
    assert res.expert_ids[:len(PROMPTS)] == ref.expert_ids
    worst = min(_psnr(a, b) for a, b in zip(res.images[:len(PROMPTS)], ref.images, strict=True))
    assert worst >= 35, f"{precision}: {worst:.1f} dB"
    sessions = [s for k, s in rt._sessions.items() if k.startswith("expert")]
    assert len({id(s._pool) for s in sessions}) == 1, "the plans share one activation memory block"
    assert sessions[0]._pool.size == max(s.device_memory_size for s in sessions)
    feeds = {"sample": np.zeros((2, 3, 16, 16), np.float32), "timestep": np.full(2, 500, np.float32),
             "encoder_hidden_states": np.zeros((2, 16, 32), np.float32)}
    times = sessions[0].time_device(feeds, warmup=1, repeats=3)
    assert len(times) == 3 and all(t > 0 for t in times)


@pytest.mark.skipif(not (HAS_TRT and HAS_CUDA), reason="needs tensorrt, cuda-python and onnxruntime-gpu on a GPU")
def test_tensorrt_plan_of_an_sdxl_class_unet(tmp_path):
    """An SDXL-class UNet (text_embeds and time_ids inputs) as an fp32 TensorRT plan: the profile covers the two
    added inputs and the plan matches onnxruntime on CPU."""
    from arch_testkit import SDXL_LIKE, make_unet

    from aptp_export.export_spec import unet_spec
    from aptp_export.onnx_export import UNetGraph, export_onnx
    from aptp_export.tensorrt_build import build_engine
    from aptp_export.unet_configs import added_cond_dims
    from engines.manifest import UNET_ADDED_INPUTS, UNET_INPUTS
    from engines.backends import open_session
    from engines.backends.tensorrt import TensorRTSession

    unet = make_unet(SDXL_LIKE, seed=4)
    spec = unet_spec(4, (16, 16), 7, SDXL_LIKE["cross_attention_dim"], batch=(1, 2, 4), size_multiple=4,
                     text_embeds_dim=added_cond_dims(SDXL_LIKE)[0])
    export_onnx(UNetGraph(unet), spec, tmp_path / "xl.onnx")
    build_engine(tmp_path / "xl.onnx", spec, tmp_path / "xl.plan", allow_tf32=False)
    plan = TensorRTSession(tmp_path / "xl.plan", UNET_INPUTS + UNET_ADDED_INPUTS)
    cpu = open_session(tmp_path / "xl.onnx", "cpu")
    for n in (1, 4):
        feeds = {t.name: x.numpy() for t, x in zip(spec.inputs, spec.sample_inputs(spec.sizes(batch=n), seed=n),
                                                    strict=True)}
        a, b = plan.run(feeds)["out_sample"], cpu.run(feeds)["out_sample"]
        assert float(np.abs(a - b).max() / np.abs(b).max()) <= 1e-3, n
