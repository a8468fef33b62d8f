"""Latent models in Stable Diffusion's on-disk layout: VAE latents, the pipeline's CLIP text encoder for
the UNet, the sentence encoder for the router; both phases run end to end on tiny random parts."""

import json

import pytest
import torch
from prune_fixtures import tiny_config, write_sd_model

from training.config import config_from_dict

pytestmark = pytest.mark.usefixtures("one_thread")



def test_sd_layout_prune_and_finetune(tmp_path):
    from aptp_export.expert_io import load_expert
    from training.base_model import load_base_model
    from training.finetune import run_finetune
    from training.prune import run_prune

    model = write_sd_model(tmp_path / "sd")
    cfg = config_from_dict(tiny_config(model, tmp_path / "runs", router={"num_experts": 2},
                                       prune={"steps": 3, "warmup_steps": 1, "batch_size": 4},
                                       finetune={"steps": 2, "batch_size": 2}))
    base = load_base_model(cfg.model)
    assert base.kind == "latent" and base.prediction_type == "v_prediction"
    assert base.image_size == 16 and base.sample_size == 8 and base.text_len == 12
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    lat = base.encode_images(pixels, torch.randn(2, 4, 8, 8))
    assert lat.shape == (2, 4, 8, 8)
    mean = base.vae.encode(pixels).latent_dist.mean * base.vae.config.scaling_factor
    assert torch.allclose(base.encode_images(pixels), mean, atol=1e-6)
    ctx = base.encode_text(["a red circle", "the blue"])
    assert ctx.shape == (2, 12, 32)  # CLIP states, not the sentence encoder's

    run = tmp_path / "run"
    summary = run_prune(cfg, run, progress=False)
    meta = json.loads((run / "prune" / "router.json").read_text())
    assert meta["embedding_dim"] == 384  # routing always uses the sentence encoder
    assert meta["base_model"] == str(model) and len(summary["expert_macs"]) == 2
    ft = run_finetune(run, progress=False)
    assert [e["id"] for e in ft["experts"]] == [0, 1]
    for e in ft["experts"]:
        expert = load_expert(run / e["dir"])
        out = expert(lat, torch.tensor([10, 900]), ctx).sample
        assert out.shape == lat.shape and torch.isfinite(out).all()
