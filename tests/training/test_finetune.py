"""The fine-tuning phase on a tiny random UNet: experts inherit the dense weights, training moves them
towards the teacher, files load back, --resume keeps finished experts."""

import json

import pytest
import torch
from prune_fixtures import tiny_config, write_toy_model

from engines.errors import UserError
from training.config import config_from_dict
from training.finetune import steps_per_expert

pytestmark = pytest.mark.usefixtures("one_thread")



def test_steps_per_expert():
    assert steps_per_expert([5, 0, 3], 10, "per_expert") == [10, 0, 10]
    split = steps_per_expert([5, 0, 3, 2], 10, "split")
    assert split == [5, 0, 3, 2] and sum(split) == 10
    odd = steps_per_expert([1, 1, 1], 10, "split")
    assert sum(odd) == 10 and max(odd) - min(odd) <= 1
    assert steps_per_expert([0, 0], 10, "split") == [0, 0]


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory):
    from training.prune import run_prune

    root = tmp_path_factory.mktemp("ft")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    model = write_toy_model(root / "model")
    cfg = config_from_dict(tiny_config(model, root / "runs", router={"num_experts": 2},
                                       prune={"steps": 8, "warmup_steps": 2, "lr": 0.3, "codes_lr": 1.0},
                                       finetune={"steps": 12, "batch_size": 8, "lr": 2e-3, "caption_dropout": 0.0,
                                                 "losses": {"ddpm": 0.0, "distill_out": 1.0, "distill_block": 0.0}}))
    run = root / "run"
    run_prune(cfg, run, progress=False)
    torch.set_num_threads(n)
    return run


def test_finetune_inherits_weights_and_approaches_the_teacher(pruned_run):
    from aptp_export.expert_io import load_expert
    from training.evaluation import RunEvaluator, distill_error
    from training.finetune import run_finetune

    ev = RunEvaluator(pruned_run)
    before = ev.materialized_experts()
    gates = ev.router.expert_gates()
    # inherited weights: the materialised expert computes exactly the gated dense model
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([50, 700])
    ctx = ev.base.encode_text(["a red circle", "the letter K in blue"])
    for k, e in before.items():
        with torch.no_grad(), ev.space.gated(ev.base.unet, gates[k].expand(2, -1)):
            ref = ev.base.unet(x, t, ctx).sample
        assert torch.allclose(e(x, t, ctx).sample, ref, atol=1e-5)
    assert gates.sum(1).min() < gates.shape[1]  # the experts are really pruned

    summary = run_finetune(pruned_run, progress=False)
    assert len(summary["experts"]) == 2 and sum(e["train_samples"] for e in summary["experts"]) == 64
    after = ev.finetuned_experts()
    data = ev.cfg.data
    from training.data import build_dataset

    train = build_dataset(data, ev.base.image_size)
    a = ev.router.route(ev.embeddings(train.captions))
    e0 = distill_error(before, a, ev.base.unet, ev.base, train, timesteps=(200, 600))["mse"]
    e1 = distill_error(after, a, ev.base.unet, ev.base, train, timesteps=(200, 600))["mse"]
    assert e1 < 0.9 * e0, (e0, e1)
    for k in range(2):
        meta = json.loads((pruned_run / "experts" / f"expert_{k:02d}" / "finetune.json").read_text())
        assert meta["steps"] == (12 if summary["experts"][k]["train_samples"] else 0)
        loaded = load_expert(pruned_run / "experts" / f"expert_{k:02d}")
        for (n1, p1), (n2, p2) in zip(loaded.state_dict().items(), after[k].state_dict().items(), strict=True):
            assert n1 == n2 and torch.equal(p1, p2)

    with pytest.raises(UserError, match="already exists; pass --resume"):
        run_finetune(pruned_run, progress=False)
    stamp = (pruned_run / "experts" / "expert_00" / "model.safetensors").stat().st_mtime_ns
    run_finetune(pruned_run, resume=True, progress=False)
    assert (pruned_run / "experts" / "expert_00" / "model.safetensors").stat().st_mtime_ns == stamp


def test_finetune_needs_a_pruned_run(tmp_path):
    from training.finetune import run_finetune

    with pytest.raises(UserError, match="not a training run"):
        run_finetune(tmp_path)
    (tmp_path / "config.yaml").write_text("name: x\n")
    with pytest.raises(UserError, match="has not finished"):
        run_finetune(tmp_path)
