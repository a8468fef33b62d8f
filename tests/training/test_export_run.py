"""`aptp export --run`: a finished training run becomes an export directory that routes and
generates exactly as the torch run does."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from prune_fixtures import tiny_config, write_toy_model

pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A tiny pruned + fine-tuned run on a random toy-layout model (2 experts)."""
    from training.config import config_from_dict
    from training.finetune import run_finetune
    from training.prune import run_prune

    root = tmp_path_factory.mktemp("exportrun")
    model = write_toy_model(root / "model", seed=3)
    cfg = tiny_config(model, root / "runs", router={"num_experts": 2}, prune={"steps": 8, "warmup_steps": 2, "budget": 0.5},
                      finetune={"steps": 1, "batch_size": 4})
    run_dir = root / "run"
    run_prune(config_from_dict(cfg), run_dir, progress=False)
    run_finetune(run_dir, progress=False)
    return run_dir


@pytest.fixture(scope="module")
def exported(finished_run, tmp_path_factory):
    from training.export_run import export_run

    out = tmp_path_factory.mktemp("export") / "engines"
    manifest, report = export_run(finished_run, out, with_dense=True, progress=False)
    return out, manifest, report


def test_manifest_accounts_every_expert_of_the_run(finished_run, exported):
    from aptp_export import ArchSpace
    from aptp_export.expert_io import read_expert_info
    from training.rundir import RunDir

    out, manifest, _ = exported
    meta = json.loads((finished_run / "prune" / "router.json").read_text())
    assert len(manifest.experts) == meta["num_experts"] == 2
    space, _, _ = read_expert_info(RunDir(finished_run).expert(0))
    space = ArchSpace.from_dict(space.to_dict())
    dense = space.dense_macs(manifest.sample_size[0], manifest.sample_size[1], manifest.text_len)
    assert manifest.dense_macs == pytest.approx(dense, rel=1e-9)
    assert manifest.dense is not None and manifest.dense.macs == pytest.approx(dense, rel=1e-9)
    for e in manifest.experts:
        _, arch, _ = read_expert_info(RunDir(finished_run).expert(e.id))
        macs = space.macs(arch.tolist(), manifest.sample_size[0], manifest.sample_size[1], manifest.text_len)
        assert e.macs == pytest.approx(macs, rel=1e-9)
        assert e.macs_fraction == pytest.approx(macs / dense, rel=1e-9)
        assert e.share == pytest.approx(meta["train_shares"][e.id])
    assert sum(e.share for e in manifest.experts) == pytest.approx(1.0, abs=1e-6)


def test_exported_router_routes_like_the_torch_router(finished_run, exported):
    from engines import Runtime
    from training.router import Router
    from training.text import SentenceEncoder
    from training.toy import EVAL_SEED, captions

    out, _, _ = exported
    prompts = [c for c, _ in captions(48, seed=EVAL_SEED + 3)]
    router = Router.load(finished_run / "prune")
    z = SentenceEncoder().encode(prompts)
    torch_scores = router.inference_scores(z).numpy()
    rt = Runtime.load(out)
    res = rt.route_scores(prompts)
    np.testing.assert_allclose(res.scores, torch_scores, atol=1e-4)
    # argmax may only differ where two codes tie to within the tolerance
    top2 = np.sort(torch_scores, axis=1)[:, -2:]
    decided = (top2[:, 1] - top2[:, 0]) > 1e-3
    assert (np.asarray(res.expert_ids)[decided] == torch_scores.argmax(1)[decided]).all()


def test_export_verb_rejects_an_unfinished_run(tmp_path):
    (tmp_path / "config.yaml").write_text("name: x\n")
    r = subprocess.run([sys.executable, "-m", "aptp", "export", "--run", str(tmp_path), "--out",
                        str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "pruning phase has not finished" in r.stderr.strip().splitlines()[-1]


def test_latent_run_exports_clip_text_encoder_vae_and_router_tokenizer(tmp_path):
    """SD layout: the UNet context comes from CLIP (its own tokenizer, no mask), routing from the
    sentence encoder; the runtime reproduces CLIP's states and decodes with the VAE."""
    from prune_fixtures import write_sd_model

    from engines import Runtime
    from training.base_model import load_base_model
    from training.config import config_from_dict
    from training.export_run import export_run
    from training.finetune import run_finetune
    from training.prune import run_prune

    model = write_sd_model(tmp_path / "sd")
    cfg = config_from_dict(tiny_config(model, tmp_path / "runs", router={"num_experts": 2},
                                       prune={"steps": 2, "warmup_steps": 1, "batch_size": 4},
                                       finetune={"steps": 1, "batch_size": 2}))
    run = tmp_path / "run"
    run_prune(cfg, run, progress=False)
    run_finetune(run, progress=False)
    out = tmp_path / "engines"
    manifest, _ = export_run(run, out, progress=False)
    assert manifest.latent and manifest.vae_decoder is not None
    rt = Runtime.load(out)
    prompts = ["a red circle", "the blue"]
    base = load_base_model(cfg.model)
    np.testing.assert_allclose(rt.encode_text(prompts), base.encode_text(prompts).numpy(), atol=1e-4)
    images = rt.generate(prompts, steps=2, seed=5)
    assert [im.size for im in images] == [(base.image_size, base.image_size)] * 2
