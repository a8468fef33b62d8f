"""PixArt (issue 25) training path on a tiny random PixArt-Sigma pipeline: T5 conditioning with its padding mask
equal to the pipeline's, the transformer's caption mask honoured, `aptp prune` -> `finetune` on the
transformer (gated dense model, block distillation over its DiT blocks, physically pruned experts that load
bit-exact), and the export refusing the family it cannot serve yet."""

from __future__ import annotations

import pytest
import torch
from prune_fixtures import tiny_config, write_pixart_model

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore")]

PROMPTS = ["a red circle", "the small blue square above a big green circle"]


@pytest.fixture(scope="module")
def pixart_run(tmp_path_factory):
    from training.config import config_from_dict
    from training.finetune import run_finetune
    from training.prune import run_prune

    root = tmp_path_factory.mktemp("pixart")
    model = write_pixart_model(root / "pixart", seed=3)
    cfg = config_from_dict(tiny_config(model, root / "runs", router={"num_experts": 2},
                                       prune={"steps": 3, "warmup_steps": 1, "batch_size": 4},
                                       finetune={"steps": 2, "batch_size": 2}))
    run = root / "run"
    summary = run_prune(cfg, run, progress=False)
    run_finetune(run, progress=False)
    return cfg, run, summary


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

    from aptp_export import ArchSpace
    from aptp_export.expert_io import load_expert, read_expert_info
    from training.base_model import load_base_model
    from training.rundir import RunDir

    cfg, run, summary = pixart_run
    assert len(summary["expert_macs"]) == 2 and all(0.0 < m <= 1.0 for m in summary["expert_macs"])
    base = load_base_model(cfg.model)
    space = ArchSpace.from_unet(base.unet)
    cond = base.conditioning(PROMPTS)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([30, 700])
    for k in range(2):
        expert = load_expert(RunDir(run).expert(k))
        assert isinstance(expert, PixArtTransformer2DModel)
        _, arch, _ = read_expert_info(RunDir(run).expert(k))
        n_params = sum(p.numel() for p in expert.parameters())
        assert n_params <= sum(p.numel() for p in base.unet.parameters())
        assert n_params == sum(p.numel() for p in space.materialize(base.unet, arch).parameters())
        with torch.no_grad():
            out = cond.predict(expert, x, t)
        assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
        assert space.macs(arch.tolist(), 8, 8, base.text_len) <= space.dense_macs(8, 8, base.text_len)


def test_pixart_export_is_refused_with_the_reason(pixart_run, tmp_path):
    from engines.errors import UserError
    from training.export_run import export_run

    _, run, _ = pixart_run
    with pytest.raises(UserError, match="pixart model is not implemented yet.*experts"):
        export_run(run, tmp_path / "export", progress=False)
