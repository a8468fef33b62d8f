"""engines.Runtime on tiny exported models: images match the torch path, batching does not change them,
corrupted exports and bad prompts are refused with errors that name the culprit."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
from engines_export_fixture import ANCHORS, build_export, copy_export, psnr, torch_reference

from engines import EngineError, IntegrityError, ManifestError, PromptError, Runtime

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 8
MIXED = [ANCHORS[0], ANCHORS[1], "a red circle", "the letter K above a square", "a blue background"]




@pytest.fixture(scope="module")
def rt(pixel):
    return Runtime.load(pixel.dir)


def _arr(img) -> np.ndarray:
    return np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0


def _unsaturated(ref: np.ndarray) -> float:
    return float(((ref > 0.02) & (ref < 0.98)).mean())


def test_export_files_are_readable_by_others(pixel):
    import stat

    modes = {p.relative_to(pixel.dir).as_posix(): stat.S_IMODE(p.stat().st_mode)
             for p in pixel.dir.rglob("*") if p.is_file()}
    assert {"manifest.json", "specs.json", "tokenizer/tokenizer.json", "router.onnx"} <= set(modes)
    mask = os.umask(0)
    os.umask(mask)
    assert all(m == 0o666 & ~mask for m in modes.values()), modes  # not the 0600 of temporary files


def test_routes_anchor_prompts_to_their_experts(rt):
    res = rt.route_scores(list(ANCHORS) + MIXED)
    assert res.expert_ids[:2] == [0, 1]
    assert res.scores.shape == (2 + len(MIXED), 2)
    # batched routing equals routing one prompt at a time (padding to the longest must not matter)
    assert res.expert_ids == [rt.route([p])[0] for p in list(ANCHORS) + MIXED]
    alone = np.concatenate([rt.route_scores([p]).scores for p in MIXED])
    np.testing.assert_allclose(res.scores[2:], alone, atol=1e-5)


def test_generate_matches_torch_reference(pixel, rt):
    """Acceptance: runtime (onnxruntime + numpy DDIM) vs torch UNet + diffusers DDIM, same noise: PSNR >= 40 dB."""
    res = rt.generate_with_info(list(ANCHORS), steps=STEPS, guidance_scale=7.5, seed=11)
    assert res.expert_ids == [0, 1]
    for i, prompt in enumerate(ANCHORS):
        ref = torch_reference(pixel, prompt, expert=res.expert_ids[i], seed=11 + i, steps=STEPS, guidance=7.5)
        assert _unsaturated(ref) > 0.4, "reference image saturated: the comparison would be vacuous"
        value = psnr(_arr(res.images[i]), ref)
        assert value >= 40, f"prompt {i}: PSNR {value:.1f} dB"
        assert res.images[i].info["aptp_expert"] == str(res.expert_ids[i])
    # a different seed really gives a different image (the comparison is not trivially satisfied)
    other = torch_reference(pixel, ANCHORS[0], expert=0, seed=12, steps=STEPS, guidance=7.5)
    assert psnr(_arr(res.images[0]), other) < 30


@pytest.mark.parametrize("name", ["pndm", "euler"])
def test_other_samplers_match_diffusers(pixel, rt, name):
    from diffusers import EulerDiscreteScheduler, PNDMScheduler

    cls = {"pndm": PNDMScheduler, "euler": EulerDiscreteScheduler}[name]
    img = rt.generate([ANCHORS[1]], steps=6, guidance_scale=4.0, seed=5, scheduler=name)[0]
    ref = torch_reference(pixel, ANCHORS[1], expert=1, seed=5, steps=6, guidance=4.0, scheduler_cls=cls)
    assert _unsaturated(ref) > 0.4
    assert psnr(_arr(img), ref) >= 40


def test_latent_model_with_vae_matches_torch():
    latent = build_export("latent")
    rt = Runtime.load(latent.dir)
    assert rt.manifest.latent and rt.manifest.vae_decoder is not None
    res = rt.generate_with_info([ANCHORS[0]], steps=5, guidance_scale=3.0, seed=2)
    ref = torch_reference(latent, ANCHORS[0], expert=res.expert_ids[0], seed=2, steps=5, guidance=3.0)
    assert ref.shape == (3, 16, 16) and res.images[0].size == (16, 16)
    assert _unsaturated(ref) > 0.4
    assert psnr(_arr(res.images[0]), ref) >= 40


def test_batch_composition_does_not_change_images(rt):
    """Acceptance: each image of a mixed batch equals the image of its prompt generated alone (PSNR >= 40)."""
    seeds = [101, 7, 55, 3, 900]
    mixed = rt.generate_with_info(MIXED, steps=5, guidance_scale=7.5, seed=seeds, batch_size=3)
    assert set(mixed.expert_ids) == {0, 1}, "the mixed batch should use both experts"
    assert mixed.expert_ids == rt.route(MIXED)
    for i, prompt in enumerate(MIXED):
        alone = rt.generate_with_info([prompt], steps=5, guidance_scale=7.5, seed=[seeds[i]])
        assert alone.expert_ids[0] == mixed.expert_ids[i]
        assert psnr(_arr(alone.images[0]), _arr(mixed.images[i])) >= 40, f"prompt {i} depends on its batch"


def test_int_seed_means_seed_plus_index(rt):
    pair = rt.generate([MIXED[2], MIXED[3]], steps=3, seed=20)
    second = rt.generate([MIXED[3]], steps=3, seed=21)
    assert np.array_equal(np.asarray(pair[1]), np.asarray(second[0])) or psnr(_arr(pair[1]), _arr(second[0])) >= 40
    same_seed = rt.generate([MIXED[3]], steps=3, seed=20)
    assert psnr(_arr(pair[1]), _arr(same_seed[0])) < 30


def test_forced_expert_and_records(rt):
    res = rt.generate_with_info(list(ANCHORS), steps=2, expert=1)
    assert res.expert_ids == [1, 1]
    recs = res.records()
    assert [r["expert"] for r in recs] == [1, 1] and [r["seed"] for r in recs] == [0, 1]
    json.dumps(recs)
    with pytest.raises(EngineError, match="no dense model"):
        rt.generate(["x"], steps=2, expert="dense")
    with pytest.raises(ManifestError, match="no expert 5"):
        rt.generate(["x"], steps=2, expert=5)


def test_bad_prompts(rt):
    with pytest.raises(PromptError, match="prompt 0: empty"):
        rt.generate([""], steps=2)
    with pytest.raises(PromptError, match="prompt 1: empty"):
        rt.route(["ok", " \t\n "])
    with pytest.raises(PromptError, match="prompt 2: expected a string, got int"):
        rt.generate(["a", "b", 3], steps=2)
    with pytest.raises(PromptError, match="prompt 0: empty"):
        rt.route(["\x00\x01\x7f"])
    with pytest.raises(PromptError, match="no prompts"):
        rt.route([])
    with pytest.raises(PromptError, match="string or a list"):
        rt.route(None)
    # documented: control characters are removed, so these give the same image
    a = rt.generate(["a red\x00 circle\x07"], steps=3, seed=4)[0]
    b = rt.generate(["a red circle"], steps=3, seed=4)[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))
    # documented: a 10,000-character prompt is truncated to the token limits, not refused
    long = ("a red circle " * 800)[:10_000]
    img = rt.generate([long], steps=2, seed=1)[0]
    same = rt.generate([long[:200]], steps=2, seed=1)[0]  # same first 16 tokens
    assert np.array_equal(np.asarray(img), np.asarray(same))
    assert rt.route([long]) == rt.route([long[:3000]])  # router keeps its first 256 tokens
    with pytest.raises(PromptError, match="more than"):
        rt.route(["x" * 100_001])


def test_bad_arguments_fail_before_any_work(pixel):
    rt = Runtime.load(pixel.dir)
    for kwargs, match in [({"steps": 0}, "steps"), ({"guidance_scale": math.nan}, "guidance_scale"),
                          ({"batch_size": 0}, "batch_size"), ({"scheduler": "lms"}, "unknown scheduler"),
                          ({"seed": [1, 2]}, "2 seeds given, 1 needed"), ({"seed": -1}, "seed"),
                          ({"seed": 1.5}, "seed")]:
        with pytest.raises(EngineError, match=match):
            rt.generate(["a red circle"], **kwargs)
    assert rt._sessions == {}, "nothing may be loaded or run for invalid arguments"


def test_unknown_provider_is_refused(pixel):
    with pytest.raises(EngineError, match="unknown provider"):
        Runtime.load(pixel.dir, provider="gpu")


def test_cuda_provider_without_gpu_names_the_extra(pixel):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu with CUDA is available here")
    with pytest.raises(EngineError, match=r'pip install -e "\.\[gpu\]"'):
        Runtime.load(pixel.dir, provider="cuda")


# -- integrity: acceptance "a corrupted or truncated expert file, a wrong hash, an unknown format version" --
def _corrupt_byte(path, offset=-100):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupted_expert_file_is_named(pixel, tmp_path):
    d = copy_export(pixel, tmp_path / "x")
    _corrupt_byte(d / "experts" / "expert_01.onnx")
    with pytest.raises(IntegrityError, match=r"expert_01\.onnx: sha256 .* corrupted"):
        Runtime.load(d)


def test_truncated_expert_file_is_named(pixel, tmp_path):
    d = copy_export(pixel, tmp_path / "x")
    p = d / "experts" / "expert_00.onnx"
    p.write_bytes(p.read_bytes()[:1000])
    with pytest.raises(IntegrityError, match=r"expert_00\.onnx: truncated: 1000 bytes"):
        Runtime.load(d)


def test_missing_file_is_named(pixel, tmp_path):
    d = copy_export(pixel, tmp_path / "x")
    (d / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(IntegrityError, match=r"tokenizer\.json: missing"):
        Runtime.load(d)


def test_wrong_hash_in_manifest_is_named(pixel, tmp_path):
    d = copy_export(pixel, tmp_path / "x")
    m = json.loads((d / "manifest.json").read_text())
    m["router"]["files"]["onnx"]["sha256"] = "0" * 64
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IntegrityError, match=r"router\.onnx: sha256 .* does not match"):
        Runtime.load(d)


def test_unknown_format_version(pixel, tmp_path):
    d = copy_export(pixel, tmp_path / "x")
    m = json.loads((d / "manifest.json").read_text())
    m["format_version"] = 99
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match=r"manifest\.json: format_version 99 is not supported"):
        Runtime.load(d)


def test_missing_or_broken_manifest(pixel, tmp_path):
    with pytest.raises(ManifestError, match="not a directory"):
        Runtime.load(tmp_path / "nope")
    d = copy_export(pixel, tmp_path / "x")
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match=r"manifest\.json: not valid JSON"):
        Runtime.load(d)
    (d / "manifest.json").unlink()
    with pytest.raises(ManifestError, match=r"manifest\.json: not found"):
        Runtime.load(d)


def test_file_corrupted_after_load_is_refused_at_first_use(pixel, tmp_path):
    d = copy_export(pixel, tmp_path / "x")
    rt = Runtime.load(d)
    _corrupt_byte(d / "experts" / "expert_00.onnx")
    with pytest.raises(IntegrityError, match=r"expert_00\.onnx"):
        rt.generate([ANCHORS[0]], steps=2)
    assert "expert:0" not in rt._sessions


def test_separate_router_tokenizer_is_used(pixel, tmp_path):
    """tokenizer.files.router_json (a router encoder that tokenises differently from the UNet's text
    encoder, e.g. MiniLM router + CLIP UNet) feeds the router; the UNet side keeps tokenizer.json."""
    from engines.manifest import FileRef

    d = copy_export(pixel, tmp_path / "x")
    tok = json.loads((d / "tokenizer" / "tokenizer.json").read_text())
    tok["normalizer"]["lowercase"] = False  # upper-case words become [UNK] for the router only
    (d / "tokenizer" / "router").mkdir()
    (d / "tokenizer" / "router" / "tokenizer.json").write_text(json.dumps(tok))
    m = json.loads((d / "manifest.json").read_text())
    m["tokenizer"]["files"]["router_json"] = FileRef.of(d, "tokenizer/router/tokenizer.json").__dict__
    (d / "manifest.json").write_text(json.dumps(m))
    shouting = ANCHORS[1].upper()
    base, split = Runtime.load(pixel.dir), Runtime.load(d)
    assert np.allclose(split.route_scores([ANCHORS[0]]).scores, base.route_scores([ANCHORS[0]]).scores, atol=1e-6)
    assert not np.allclose(split.route_scores([shouting]).scores, base.route_scores([shouting]).scores, atol=1e-3)
    np.testing.assert_array_equal(split.encode_text([shouting]), base.encode_text([shouting]))


@pytest.mark.slow
def test_fp16_export_runs_and_stays_close(pixel):
    """fp16 graphs (fp32 I/O) run in the same runtime; images stay close to the fp32 ones."""
    half = build_export("pixel", "fp16")
    rt16, rt32 = Runtime.load(half.dir), Runtime.load(pixel.dir)
    assert rt16.manifest.precision == "fp16"
    a = rt16.generate_with_info(list(ANCHORS), steps=STEPS, seed=11)
    b = rt32.generate_with_info(list(ANCHORS), steps=STEPS, seed=11)
    assert a.expert_ids == b.expert_ids
    values = [psnr(_arr(x), _arr(y)) for x, y in zip(a.images, b.images, strict=True)]
    print("fp16 vs fp32 PSNR (dB):", [round(float(v), 1) for v in values])
    assert min(values) >= 30


def test_sampling_defaults_travel_with_the_export(pixel, tmp_path):
    """An export's recorded steps / guidance are what Runtime.generate, the batcher and /v1/models use when
    the caller names none (an export without them: 25 steps, guidance 7.5)."""
    import json
    import shutil

    from engines.serving.batching import Batcher
    from engines.serving.config import ServeConfig
    from engines.serving.protocol import models_body

    d = tmp_path / "export"
    shutil.copytree(pixel.dir, d)
    m = json.loads((d / "manifest.json").read_text())
    assert m["sampling"] == {"steps": 25, "guidance_scale": 7.5}  # the fixture's model has no sampling.json
    m["sampling"] = {"steps": 3, "guidance_scale": 2.0}
    (d / "manifest.json").write_text(json.dumps(m))
    rt = Runtime.load(d, threads=1)
    prompts = [ANCHORS[0], ANCHORS[1]]
    got = rt.generate_with_info(prompts, seed=3)
    assert (got.steps, got.guidance_scale) == (3, 2.0)
    ref = rt.generate(prompts, steps=3, guidance_scale=2.0, seed=3)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(got.images, ref, strict=True))
    assert not np.array_equal(np.asarray(got.images[0]), np.asarray(rt.generate(prompts, seed=3, steps=4)[0]))
    cfg = Batcher(rt, ServeConfig(workers=1)).config
    assert (cfg.default_steps, cfg.default_guidance_scale) == (3, 2.0)
    cfg = Batcher(rt, ServeConfig(workers=1, default_steps=5, default_guidance_scale=0.0)).config
    assert (cfg.default_steps, cfg.default_guidance_scale) == (5, 0.0)  # what the operator set wins
    assert models_body(rt.manifest)["data"][0]["sampling"] == {"steps": 3, "guidance_scale": 2.0,
                                                                "scheduler": rt.manifest.scheduler.name}
    m["sampling"] = {"steps": 0, "guidance_scale": 2.0}
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="sampling.steps"):
        Runtime.load(d)
