"""The OpenVINO backend and `aptp quantize` on the tiny pixel export: OpenVINO fp32 = onnxruntime, int8 IR
outputs independent of batch composition (bitwise), a quantized export runs on OpenVINO by default (and in
fp32 with provider "cpu"), both batching policies give Runtime.generate's images bitwise on it, the guard's
refusal keeps an expert fp32 and says why, the manifest's IR files are hashed and checked, and the runtime
runs it with torch blocked. Skipped when openvino / nncf are not installed."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from engines_export_fixture import ANCHORS, build_export

pytest.importorskip("openvino", reason='the OpenVINO backend needs openvino: pip install -e ".[openvino]"')
pytest.importorskip("nncf", reason='aptp quantize needs nncf: pip install -e ".[quantize]"')

from aptp_export.quantize import QuantizeOptions, quantize_export  # noqa: E402
from engines import Runtime  # noqa: E402
from engines.backends.openvino import OvSession  # noqa: E402
from engines.backends.ort import OrtSession  # noqa: E402
from engines.errors import IntegrityError, ManifestError  # noqa: E402
from engines.manifest import Manifest  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [ANCHORS[0], ANCHORS[1], "a red circle", "the letter K above a square", "a blue square on the left",
           "three green diamonds", "a white background", "the digit 7 in orange"]


def _feeds(m, batch: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"sample": rng.standard_normal((batch, m.in_channels, *m.sample_size), dtype=np.float32),
            "timestep": rng.uniform(0, 999, batch).astype(np.float32),
            "encoder_hidden_states": rng.standard_normal((batch, m.text_len, m.text_encoder.hidden_size),
                                                         dtype=np.float32)}


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """The tiny export quantized with a guard every int8 graph passes (random weights: fidelity is not
    what this module tests), plus one refused by an impossible guard."""
    src = build_export("pixel").dir
    root = tmp_path_factory.mktemp("ov")
    opts = dict(prompts=PROMPTS, guard_prompts=PROMPTS[::-1], per_expert=2, guard_per_expert=2, steps=3,
                guidance=3.0, threads=1, progress=False)
    ok = quantize_export(src, root / "int8", QuantizeOptions(min_psnr=0.0, mean_psnr=0.0, **opts), log=lambda *_: None)
    refused = quantize_export(src, root / "refused", QuantizeOptions(min_psnr=500.0, mean_psnr=500.0, scan=False,
                                                                      experts=[1], **opts), log=lambda *_: None)
    return {"src": src, "int8": root / "int8", "refused": root / "refused", "report": ok, "refused_report": refused}


def test_openvino_fp32_matches_onnxruntime(pixel):
    m = pixel.manifest
    for e in m.experts:
        path = pixel.dir / e.files["onnx"].path
        feeds = _feeds(m, 3, e.id)
        a = OrtSession(path, threads=1).run(feeds)["out_sample"]
        b = OvSession(path, threads=1, cache_dir="").run(feeds)["out_sample"]
        assert np.max(np.abs(a - b)) <= 1e-5 * max(1.0, float(np.max(np.abs(a))))


def test_session_settings_thread_count_precision_and_disk_cache(pixel, tmp_path, monkeypatch):
    path = pixel.dir / pixel.manifest.experts[0].files["onnx"].path
    s = OvSession(path, threads=1, cache_dir=str(tmp_path / "cache"))
    assert s.setting("INFERENCE_NUM_THREADS") == "1"
    assert "float32" in s.setting("INFERENCE_PRECISION_HINT")  # not bf16, even on CPUs with AVX512_BF16 / AMX
    assert any((tmp_path / "cache").iterdir())  # the compiled blob, reused by the next process
    monkeypatch.setenv("APTP_OPENVINO_PRECISION", "bf16")
    assert OvSession(path, threads=1, cache_dir="").precision == "bf16"
    monkeypatch.setenv("APTP_OPENVINO_PRECISION", "int4")
    with pytest.raises(Exception, match="precision must be one of"):
        OvSession(path, cache_dir="")


def test_quantized_export_is_complete_and_hashed(quantized):
    d = quantized["int8"]
    m = Manifest.from_dict(json.loads((d / "manifest.json").read_text()))
    assert m.format_version == 4 and m.openvino is not None and m.openvino.nncf
    for e in m.experts:
        assert {"onnx", "openvino", "openvino_bin"} <= set(e.files), e.files
        assert e.precision == "int8" and e.quantization["calibration"]["prompts"] == 2
        assert e.quantization["calibration"]["unet_calls"] >= 1 and e.quantization["tried"][0]["passed"]
    assert (d / "quantize_report.md").is_file() and "| 0 | int8 |" in (d / "quantize_report.md").read_text()
    rt = Runtime.load(d, threads=1)
    assert rt.provider == "openvino" and rt.part_providers["experts"] == "openvino-int8"
    assert rt.part_providers["router"] == "onnxruntime-cpu"
    # tampering with the weights of an IR is caught before anything runs
    bad = d.parent / "tampered"
    shutil.copytree(d, bad)
    binf = bad / m.experts[0].files["openvino_bin"].path
    data = bytearray(binf.read_bytes())
    data[len(data) // 2] ^= 0xFF
    binf.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        Runtime.load(bad)


def test_manifest_rules_for_openvino_files(quantized):
    d = json.loads((quantized["int8"] / "manifest.json").read_text())
    half = json.loads(json.dumps(d))
    del half["experts"][0]["files"]["openvino_bin"]
    with pytest.raises(ManifestError, match="needs both openvino"):
        Manifest.from_dict(half)
    anon = json.loads(json.dumps(d))
    anon["openvino"] = None
    with pytest.raises(ManifestError, match="not what wrote them"):
        Manifest.from_dict(anon)
    old = json.loads(json.dumps(d))
    old["format_version"] = 3
    with pytest.raises(ManifestError):
        Manifest.from_dict(old)
    wrong = json.loads(json.dumps(d))
    wrong["experts"][0]["quantization"]["precision"] = "int4"
    with pytest.raises(ManifestError, match="int4"):
        Manifest.from_dict(wrong)


def test_int8_outputs_do_not_depend_on_batch_composition(quantized):
    rt = Runtime.load(quantized["int8"], threads=1)
    for e in rt.manifest.experts:
        s = rt.unet(e.id)
        feeds = _feeds(rt.manifest, 5, 10 + e.id)
        whole = s.run(feeds)["out_sample"]
        for i in range(5):
            one = s.run({k: v[i:i + 1] for k, v in feeds.items()})["out_sample"]
            assert np.array_equal(one[0], whole[i]), (e.id, i)
        pair = s.run({k: v[[3, 1]] for k, v in feeds.items()})["out_sample"]
        assert np.array_equal(pair, whole[[3, 1]])


def test_int8_is_int8_and_provider_cpu_is_the_fp32_export(quantized):
    src = Runtime.load(quantized["src"], threads=1)
    as_cpu = Runtime.load(quantized["int8"], provider="cpu", threads=1)
    q = Runtime.load(quantized["int8"], threads=1)
    kw = dict(steps=3, seed=4, guidance_scale=3.0)
    ref, cpu, int8 = src.generate(PROMPTS[:4], **kw), as_cpu.generate(PROMPTS[:4], **kw), q.generate(PROMPTS[:4], **kw)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(ref, cpu, strict=True))
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(ref, int8, strict=True))
    xml = (quantized["int8"] / q.manifest.experts[0].files["openvino"].path).read_text()
    assert "FakeQuantize" in xml or "i8" in xml or "u8" in xml


@pytest.mark.parametrize("policy", ["request", "step"])
def test_batching_policies_give_generate_images_bitwise_on_openvino(quantized, policy):
    from engines.serving.batching import Batcher
    from engines.serving.config import ServeConfig

    rt = Runtime.load(quantized["int8"], threads=1)
    ref = {p: rt.generate([p, p], steps=4, seed=5, guidance_scale=3.0) for p in PROMPTS[:4]}
    with Batcher(rt, ServeConfig(batching=policy, workers=2, max_batch=3)) as b:
        tickets = [b.submit(p, n=2, seed=5, steps=4, guidance_scale=3.0) for p in PROMPTS[:4] * 2]
        for t in tickets:
            got = [r.image for r in t.result(60)]
            assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(got, ref[t.prompt], strict=True))


def test_guard_refusal_keeps_the_expert_fp32_and_says_why(quantized):
    rep = quantized["refused_report"]
    assert [e["id"] for e in rep["experts"]] == [1]
    e = rep["experts"][0]
    assert e["precision"] == "fp32" and "stays fp32" in e["reason"]
    assert [t["candidate"] for t in e["tried"]] == ["int8", "int8 weights only"]
    assert not any(t["passed"] for t in e["tried"])
    rt = Runtime.load(quantized["refused"], threads=1)
    m = rt.manifest
    assert "openvino" not in m.experts[1].files and m.experts[1].quantization["precision"] == "fp32"
    assert m.experts[0].quantization is None  # not asked for
    assert rt.provider == "cpu"  # nothing to run on OpenVINO


def test_quantized_runtime_without_torch(quantized):
    from test_engines_torchfree import ENGINES_SCRIPT, HEAVY, _run

    out = _run(ENGINES_SCRIPT, json.dumps([*HEAVY, "aptp_export", "training", "benchmarks", "nncf"]),
               str(quantized["int8"]), json.dumps(list(ANCHORS)))
    assert out["loaded"] == [] and out["experts"] == [0, 1]


def test_bench_times_int8_beside_fp32(quantized):
    from benchmarks.engines_bench import precision_table
    from benchmarks.unet_latency import InputShape, ModelUnderTest, available_backends, bench_unets

    m = Manifest.from_dict(json.loads((quantized["int8"] / "manifest.json").read_text()))
    d = quantized["int8"]
    e0, e1 = m.experts
    models = [ModelUnderTest("dense", e0.macs, 1.0, onnx=d / e0.files["onnx"].path),  # fp32 reference, no IR
              ModelUnderTest("expert_01", e1.macs, e1.macs_fraction, onnx=d / e1.files["onnx"].path,
                             ir=d / e1.files["openvino"].path, precision=e1.precision)]
    assert available_backends(models) == ["onnxruntime", "openvino-int8"]
    shape = InputShape(m.in_channels, *m.sample_size, m.text_len, m.text_encoder.hidden_size)
    rows = bench_unets(models, shape, [1], ["onnxruntime", "openvino-int8"], warmup=1, repeats=3, threads=1)
    by = {(r["expert"], r["backend"]): r for r in rows}
    assert by[("expert_01", "openvino-int8")]["precision"] == "int8"
    assert by[("dense", "openvino-int8")]["precision"] == "fp32"  # ran on onnxruntime, as the runtime would
    table = precision_table(rows)
    assert [(t["expert"], t["precision"]) for t in table] == [("expert_01", "int8")]
    t = table[0]
    assert t["int8_speedup"] == pytest.approx(t["fp32_ms"] / t["int8_ms"])
    assert t["macs_fraction_over_speedup"] == pytest.approx(e1.macs_fraction / t["int8_speedup"])


@pytest.mark.slow  # a sensitivity scan: ~9 NNCF quantizations (2 min on 2 busy cores)
def test_ladder_goes_on_after_the_given_fp32_groups(tmp_path):
    """--fp32-groups is where the ladder starts: when the guard still refuses, the scanned groups are added
    one by one, then weights-only int8, then fp32 — each attempt recorded."""
    opts = QuantizeOptions(prompts=PROMPTS, guard_prompts=PROMPTS[::-1], per_expert=2, guard_per_expert=2, steps=3,
                           guidance=3.0, threads=1, min_psnr=500.0, mean_psnr=500.0, experts=[0],
                           fp32_groups=["conv_in"], max_scan_steps=2)
    rep = quantize_export(build_export("pixel").dir, tmp_path / "q", opts, log=lambda *_: None)
    e = rep["experts"][0]
    names = [t["candidate"] for t in e["tried"]]
    assert names[0] == "int8 + fp32 conv_in" and names[-1] == "int8 weights only" and len(names) == 4, names
    assert all(n.startswith("int8 + fp32 conv_in, ") for n in names[1:3])
    assert "conv_in" not in e["calibration"]["sensitivity"] and e["precision"] == "fp32"
    with pytest.raises(Exception, match="unknown layer group"):
        quantize_export(build_export("pixel").dir, tmp_path / "q2",
                        QuantizeOptions(**{**opts.__dict__, "fp32_groups": ["conv_inn"]}), log=lambda *_: None)


def test_without_openvino_a_quantized_export_runs_its_fp32_graphs(quantized, monkeypatch):
    import engines.runtime as runtime_mod
    from engines.errors import BackendError

    real = runtime_mod.check_provider

    def no_openvino(provider):
        if provider == "openvino":
            raise BackendError('openvino is not installed: pip install -e ".[openvino]"')
        real(provider)

    monkeypatch.setattr(runtime_mod, "check_provider", no_openvino)
    with pytest.warns(RuntimeWarning, match="int8 OpenVINO engines cannot run here"):
        rt = Runtime.load(quantized["int8"], threads=1)
    assert rt.provider == "cpu" and rt.part_providers["experts"] == "onnxruntime-cpu"
    with pytest.raises(BackendError, match="openvino is not installed"):
        Runtime.load(quantized["int8"], provider="openvino")  # asked for by name: refused, not replaced


def test_only_unets_may_list_openvino_files(quantized):
    d = json.loads((quantized["int8"] / "manifest.json").read_text())
    bad = json.loads(json.dumps(d))
    bad["router"]["files"]["openvino"] = bad["experts"][0]["files"]["openvino"]
    with pytest.raises(ManifestError, match="router.files"):
        Manifest.from_dict(bad)
