"""PixArt (issue 25) end to end on a tiny random PixArt-Sigma pipeline: T5 conditioning with its padding mask
equal to the pipeline's, the transformer's caption mask honoured, `aptp prune` -> `finetune` on the
transformer (gated dense model, block distillation over its DiT blocks, physically pruned experts) ->
`export` -> `Runtime.generate`, whose images match diffusers' PixArtSigmaPipeline with the same expert,
scheduler and noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from prune_fixtures import (
    assert_experts_match_pipeline,
    assert_run_experts,
    prune_finetune_export,
    tiny_config,
    write_pixart_model,
)

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore")]

PROMPTS = ["a red circle", "the small blue square above a big green circle"]


@pytest.fixture(scope="module")
def pixart_run(tmp_path_factory):
    """(cfg, run dir, export dir, manifest, export report, prune summary) of the whole path, DDIM export."""
    root = tmp_path_factory.mktemp("pixart")
    return prune_finetune_export(write_pixart_model(root / "pixart", seed=3), root, "ddim")


def test_pixart_conditioning_equals_the_pipeline(tmp_path):
    from diffusers import PixArtSigmaPipeline

    from training.base_model import load_base_model
    from training.config import config_from_dict

    model = write_pixart_model(tmp_path / "pixart")
    base = load_base_model(config_from_dict(tiny_config(model, tmp_path / "runs")).model)
    assert base.family == "pixart" and base.kind == "latent" and base.text_len == 12 and base.sample_size == 8
    cond = base.conditioning(PROMPTS)
    assert cond.context.shape == (2, 12, 16) and cond.mask.tolist()[0] == [1] * 4 + [0] * 8  # 3 words + </s>
    pipe = PixArtSigmaPipeline.from_pretrained(str(model), local_files_only=True)
    pe, pm, ne, nm = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=True, clean_caption=False,
                                        max_sequence_length=12)
    torch.testing.assert_close(pe, cond.context, rtol=1e-5, atol=1e-6)
    assert torch.equal(pm, cond.mask)
    empty = base.conditioning([""])
    torch.testing.assert_close(ne[:1], empty.context, rtol=1e-5, atol=1e-6)
    assert torch.equal(nm[:1], empty.mask)
    # the transformer reads the mask (padded tokens are masked out) and only the noise half is predicted
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    eps = cond.predict(base.unet, x, t)
    assert eps.shape == (2, 4, 8, 8)
    unmasked = type(cond)(cond.context, mask=torch.ones_like(cond.mask))
    assert not torch.allclose(eps, unmasked.predict(base.unet, x, t))
    full = base.unet(x, encoder_hidden_states=cond.context, timestep=t, encoder_attention_mask=cond.mask).sample
    assert full.shape[1] == 8 and torch.equal(full[:, :4], eps)


def test_pixart_prune_and_finetune(pixart_run):
    from diffusers import PixArtTransformer2DModel

    cfg, run, _, _, _, summary = pixart_run
    assert_run_experts(cfg, run, summary, PixArtTransformer2DModel, PROMPTS)


def test_pixart_export_manifest(pixart_run):
    from engines.manifest import read_manifest

    out, report = pixart_run[2], pixart_run[4]
    m = read_manifest(out)
    assert m.family == "pixart" and m.added_cond is None and m.text_encoder.hidden_size == 16
    assert m.text_len == 12 and m.in_channels == 4 and tuple(m.sample_size) == (8, 8)
    assert (m.sampling.steps, m.sampling.guidance_scale) == (25, 4.5)  # PixArtSigmaPipeline's guidance
    for key, g in report["graphs"].items():
        assert g["verified"] and max(g["max_rel_error"].values()) <= 1e-4, key


def test_pixart_runtime_matches_the_diffusers_pipeline(pixart_run):
    """Acceptance (issue 25): Runtime.generate (onnxruntime T5, transformer graphs with the caption mask, numpy
    DDIM) vs PixArtSigmaPipeline with the same expert, diffusers' DDIMScheduler and the same initial noise:
    >= 40 dB for every expert."""
    from diffusers import DDIMScheduler, PixArtSigmaPipeline

    from engines import Runtime
    from training.base_model import load_base_model

    cfg, run, out, manifest, _, _ = pixart_run
    rt = Runtime.load(out)
    base = load_base_model(cfg.model)
    cond, ref = rt.condition(PROMPTS), base.conditioning(PROMPTS)
    np.testing.assert_allclose(cond.context, ref.context.numpy(), atol=1e-4)
    np.testing.assert_array_equal(cond.added["encoder_attention_mask"], ref.mask.numpy())
    assert rt.uncond().added["encoder_attention_mask"].tolist() == [[1] + [0] * 11]  # "" is </s> alone

    pipe = PixArtSigmaPipeline.from_pretrained(str(cfg.model.path), local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(manifest.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    assert_experts_match_pipeline(rt, pipe, "transformer", run, manifest, PROMPTS, "ddim", steps=4, guidance=4.5,
                                  clean_caption=False, max_sequence_length=12, use_resolution_binning=False)


def test_pixart_export_serves_bitwise_through_the_step_batcher(pixart_run):
    """The server's step-level batching carries the caption mask (an int64 input) too: its images are
    Runtime.generate's."""
    from engines import Runtime
    from engines.serving.batching import Batcher
    from engines.serving.config import ServeConfig

    rt = Runtime.load(pixart_run[2], threads=1)
    ref = rt.generate([PROMPTS[1]] * 2, steps=3, seed=4, scheduler="ddim")
    with Batcher(rt, ServeConfig(batching="step", workers=1, max_batch=4)) as b:
        b.warm_up()
        first = b.submit(PROMPTS[0], n=1, steps=2, seed=1, scheduler="ddim")  # shares UNet calls with the next
        got = [r.image for r in b.submit(PROMPTS[1], n=2, steps=3, seed=4, scheduler="ddim").result(60)]
        first.result(60)
    for a, c in zip(ref, got, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(c))


def test_pixart_expert_without_cross_attention_is_served(pixart_run, tmp_path):
    """An expert whose every cross-attention head was pruned reads neither the text nor the caption mask, so
    its graph has neither input; the runtime feeds only what a graph has and still matches the pipeline."""
    import json
    import shutil

    from diffusers import DDIMScheduler, PixArtSigmaPipeline
    from engines_export_fixture import psnr

    from aptp_export import ArchSpace
    from aptp_export.export_spec import dit_unet_spec
    from aptp_export.onnx_export import UNetGraph, export_onnx
    from engines import Runtime
    from engines.denoise import initial_noise
    from engines.manifest import FileRef
    from training.base_model import load_base_model

    cfg, _, out, manifest, _, _ = pixart_run
    base = load_base_model(cfg.model)
    space = ArchSpace.from_unet(base.unet)
    a = space.ones().numpy()
    for g in space.width_groups:
        if g.name.endswith(".attn2"):
            a[g.start:g.stop] = 0
    expert = space.materialize(base.unet, a)
    exp = tmp_path / "export"
    shutil.copytree(out, exp)
    rel = manifest.experts[0].files["onnx"].path
    (exp / rel).unlink()
    res = export_onnx(UNetGraph(expert), dit_unet_spec(expert.config, (8, 8), 12), exp / rel)
    names = [i.name for i in __import__("onnx").load(str(exp / rel)).graph.input]
    assert names == ["sample", "timestep"], names  # no text, no mask
    assert res.max_rel_error["out_sample"] <= 1e-5
    m = json.loads((exp / "manifest.json").read_text())
    m["experts"][0]["files"]["onnx"] = vars(FileRef.of(exp, rel))
    (exp / "manifest.json").write_text(json.dumps(m))
    rt = Runtime.load(exp)
    got = rt.generate(PROMPTS[:1], steps=3, guidance_scale=4.5, seed=[5], scheduler="ddim", expert=0)[0]
    pipe = PixArtSigmaPipeline.from_pretrained(str(cfg.model.path), local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(manifest.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer = expert
    with torch.no_grad():
        want = pipe(PROMPTS[:1], num_inference_steps=3, guidance_scale=4.5, height=16, width=16,
                    latents=torch.from_numpy(initial_noise([5], (4, 8, 8))), output_type="np", clean_caption=False,
                    max_sequence_length=12, use_resolution_binning=False).images[0]
    assert psnr(np.asarray(got, np.float64) / 255.0, want) >= 40


def test_legacy_class_name_and_spiece_only_tokenizer(tmp_path):
    """The official PixArt repositories name the transformer `Transformer2DModel` (norm_type ada_norm_single),
    which diffusers remaps: it loads as PixArt. A tokenizer/ with only spiece.model needs sentencepiece:
    without it the error says so instead of a traceback; with it (the train extra installs it) a corrupt
    spiece.model is one clear error too, and a real one (trained here with sentencepiece, offline) becomes the
    fast tokenizer and the export's tokenizer.json, both giving sentencepiece's own ids + </s>."""
    import importlib.util
    import json
    import shutil

    from engines.errors import UserError
    from training.base_model import load_base_model, t5_fast_tokenizer
    from training.config import config_from_dict

    model = write_pixart_model(tmp_path / "pixart")
    cf = model / "transformer" / "config.json"
    cf.write_text(json.dumps({**json.loads(cf.read_text()), "_class_name": "Transformer2DModel"}))
    base = load_base_model(config_from_dict(tiny_config(model, tmp_path / "runs")).model)
    assert type(base.unet).__name__ == "PixArtTransformer2DModel" and base.family == "pixart"
    spiece = tmp_path / "spiece_only"
    spiece.mkdir()
    shutil.copy(model / "tokenizer" / "tokenizer_config.json", spiece)
    (spiece / "spiece.model").write_bytes(b"not a sentencepiece model")
    if importlib.util.find_spec("sentencepiece") is None:
        with pytest.raises(UserError, match="pip install sentencepiece"):
            t5_fast_tokenizer(spiece)
        return
    from tokenizers import Tokenizer

    from training.export_run import _fast_tokenizer_json

    with pytest.raises(UserError, match="cannot load the T5 tokenizer"):
        t5_fast_tokenizer(spiece)
    import sentencepiece as spm

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(PROMPTS + ["three yellow triangles on the left", "the letter K on white"]) * 20)
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=40,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>",
                                   eos_piece="</s>", unk_piece="<unk>", minloglevel=2, hard_vocab_limit=False)
    shutil.copy(tmp_path / "sp.model", spiece / "spiece.model")
    (spiece / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "T5Tokenizer", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
        "extra_ids": 0}))
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    exported = Tokenizer.from_file(str(_fast_tokenizer_json(spiece, tmp_path / "scratch")))
    for prompt in PROMPTS + ["zebra quux"]:  # the last: pieces the model never saw
        want = sp.encode(prompt) + [sp.eos_id()]
        assert t5_fast_tokenizer(spiece)(prompt).input_ids == want
        assert exported.encode(prompt).ids == want
