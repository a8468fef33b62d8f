"""The pruning phase on a tiny random UNet in the toy layout: artefacts, exact resume, gradient paths, CLI."""

import json

import pytest
import torch
import yaml
from prune_fixtures import tiny_config, write_toy_model

from training.config import config_from_dict

pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_toy_model(tmp_path_factory.mktemp("tiny_toy_model"))


@pytest.fixture(scope="module")
def emb_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("emb_cache"))


def _cfg(model_dir, tmp_path, emb_cache, **kw):
    c = tiny_config(model_dir, tmp_path / "runs", **kw)
    c["data"]["embedding_cache"] = emb_cache
    return config_from_dict(c)


def _tensors(run_dir):
    from safetensors.torch import load_file

    return {**load_file(str(run_dir / "prune" / "router.safetensors")),
            **{f"codes.{k}": v for k, v in load_file(str(run_dir / "prune" / "codes.safetensors")).items()}}


def test_prune_writes_router_codes_config_and_resumes_bit_exactly(model_dir, tmp_path, emb_cache):
    from training.prune import run_prune
    from training.router import Router

    cfg = _cfg(model_dir, tmp_path, emb_cache, prune={"checkpoint_every": 3})
    full = tmp_path / "full"
    summary = run_prune(cfg, full, progress=False)
    for f in ("router.safetensors", "codes.safetensors", "router.json", "summary.json", "log.jsonl"):
        assert (full / "prune" / f).is_file(), f
    saved = yaml.safe_load((full / "config.yaml").read_text())
    assert saved == cfg.to_dict()  # the resolved config, every key
    meta = json.loads((full / "prune" / "router.json").read_text())
    assert meta["num_experts"] == 4 and meta["budget"] == 0.6 and "arch_space" in meta
    assert len(summary["shares"]) == 4 and abs(sum(summary["shares"]) - 1) < 1e-6
    router = Router.load(full / "prune")
    assert router.num_experts == 4
    log = [json.loads(x) for x in (full / "prune" / "log.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in log] == ["warmup"] * 2 + ["route"] * 4
    assert all(sum(r["counts"]) == 8 for r in log if r["phase"] == "route")

    # interrupted after step 3 (a checkpoint), then resumed by a fresh trainer
    part = tmp_path / "part"
    assert run_prune(cfg, part, progress=False, stop_after=3) == {"stopped_at": 3}
    assert not (part / "prune" / "router.json").exists()
    with pytest.raises(Exception, match="already holds a pruning run"):
        run_prune(cfg, part, progress=False)
    run_prune(cfg, part, resume=True, progress=False)
    a, b = _tensors(full), _tensors(part)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log_b = [json.loads(x) for x in (part / "prune" / "log.jsonl").read_text().splitlines()]
    assert log_b == log

    # resuming with a different budget is refused, naming the key
    other = _cfg(model_dir, tmp_path, emb_cache, prune={"checkpoint_every": 3, "budget": 0.5})
    with pytest.raises(Exception, match="prune.budget"):
        run_prune(other, part, resume=True, progress=False)


def _one_step(model_dir, tmp_path, emb_cache, losses, warmup):
    from training.distributed import Dist
    from training.prune import PruneTrainer, build_setup

    zero = {k: 0.0 for k in ("ddpm", "distill_out", "distill_block", "resource", "spread_std", "spread_max",
                             "contrastive", "routing")}
    cfg = _cfg(model_dir, tmp_path, emb_cache, prune={"warmup_steps": 1 if warmup else 0, "losses": {**zero, **losses}})
    setup = build_setup(cfg, tmp_path / "run", Dist(), progress=False)
    tr = PruneTrainer(setup, tmp_path / "run", progress=False)
    with torch.no_grad():  # open some units so gradients of every kind are non-trivial
        tr.router.codes.add_(torch.randn(tr.router.codes.shape, generator=torch.Generator().manual_seed(0)) * 3)
        tr.router.predictor.bias.add_(torch.randn(tr.router.predictor.bias.shape) * 3)
    tr.train_step()
    return tr.router.predictor.weight.grad, tr.router.codes.grad


@pytest.mark.parametrize("losses,warmup,predictor_grad,codes_grad", [
    ({"distill_out": 1.0}, False, False, True),     # gated forward -> codes (straight-through)
    ({"resource": 1.0}, False, False, True),        # analytic MACs -> codes
    ({"contrastive": 1.0}, False, True, False),     # contrastive -> predictor only
    ({"routing": 1.0}, False, True, False),         # routing consistency -> predictor only (codes detached)
    ({"distill_block": 1.0}, True, True, False),    # warm-up: the predictor's own gates
    ({"ddpm": 1.0}, True, True, False),
])
def test_gradient_paths(model_dir, tmp_path, emb_cache, losses, warmup, predictor_grad, codes_grad):
    gp, gc = _one_step(model_dir, tmp_path, emb_cache, losses, warmup)
    assert (gp is not None and gp.abs().sum() > 0) == predictor_grad
    assert (gc is not None and gc.abs().sum() > 0) == codes_grad


def test_cli_rejects_bad_config_with_one_line(model_dir, tmp_path, capsys):
    from aptp.cli import main

    bad = tmp_path / "bad.yaml"
    for text, key in (("prune: {budget: 1.5}", "prune.budget"), ("prune: {budget: 0}", "prune.budget"),
                      ("router: {num_experts: 0}", "router.num_experts"), ("prune: {budjet: 0.5}", "prune.budjet"),
                      ("data: {type: imagefolder, path: /nonexistent/x}", "data directory not found"),
                      ("model: {path: /nonexistent/m}", "model directory not found")):
        bad.write_text(f"model: {{path: {model_dir}}}\n{text}\n")
        code = main(["prune", "--config", str(bad), "--run-dir", str(tmp_path / "r"), "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and key in err and len(err.splitlines()) == 1, err
