"""Diagnostics (capacity probe, oracle bound, router health) and the matched static baseline, on a tiny
random UNet: the bookkeeping a broken implementation would get wrong (pairing, MACs and compute matching,
the oracle's constrained choice)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from prune_fixtures import tiny_config, write_toy_model

from training.config import config_from_dict

pytestmark = pytest.mark.usefixtures("one_thread")


def test_oracle_choice_is_the_constrained_optimum():
    """Against brute force over every assignment of 6 rows to 3 experts: the Lagrangian choice is optimal
    among assignments with no more mean MACs than it uses, and it respects the budget."""
    from benchmarks.diagnostics import oracle_choice

    rng = np.random.default_rng(0)
    macs = np.array([0.3, 0.5, 0.9])
    for trial in range(20):
        err = rng.random((6, 3)) * np.array([1.0, 0.6, 0.2])  # bigger experts tend to be better
        budget = float(rng.uniform(0.35, 0.85))
        choice, lam = oracle_choice(err, macs, budget)
        used = macs[choice].mean()
        assert used <= budget + 1e-9
        got = err[np.arange(6), choice].mean()
        best = min(err[np.arange(6), list(c)].mean() for c in itertools.product(range(3), repeat=6)
                   if macs[list(c)].mean() <= used + 1e-12)
        assert got <= best + 1e-12, (trial, got, best)
    # no constraint binding: the unconstrained best per row
    err = rng.random((5, 3))
    choice, lam = oracle_choice(err, macs, 1.0)
    assert lam == 0.0 and (choice == err.argmin(1)).all()


@pytest.fixture(scope="module")
def finetuned_run(tmp_path_factory):
    from training.finetune import run_finetune
    from training.prune import run_prune

    root = tmp_path_factory.mktemp("diag")
    model = write_toy_model(root / "model")
    cfg = config_from_dict(tiny_config(model, root / "runs", router={"num_experts": 2},
                                       prune={"steps": 8, "warmup_steps": 2, "lr": 0.3, "codes_lr": 1.0},
                                       finetune={"steps": 3, "batch_size": 4}))
    run = root / "run"
    run_prune(cfg, run, progress=False)
    run_finetune(run, progress=False)
    return run


def test_per_sample_errors_are_paired_with_distill_error(finetuned_run):
    """The routed per-sample MSE to the teacher averages to training.evaluation.distill_error's figure
    (same samples, noise and timesteps), and a model equal to the teacher has error 0."""
    from benchmarks.diagnostics import heldout, per_sample_errors
    from training.evaluation import RunEvaluator, distill_error

    ev = RunEvaluator(finetuned_run)
    data = heldout(12, ev.base.image_size)
    experts = ev.finetuned_experts()
    a = ev.router.route(ev.embeddings(data.captions)).cpu()
    models = {f"routed/{k}": m for k, m in experts.items()}
    models["teacher"] = ev.base.unet
    errs = per_sample_errors(models, ev.base, data, timesteps=(200, 800), batch_size=5,
                             assignment={"routed": a}, progress=False)
    ref = distill_error(experts, a, ev.base.unet, ev.base, data, timesteps=(200, 800), batch_size=5)
    assert errs["routed"]["to_teacher"].mean() == pytest.approx(ref["mse"], rel=1e-6)
    assert errs["teacher"]["to_teacher"].max() == 0.0
    assert np.allclose(errs["teacher"]["to_target"], errs["dense"]["to_target"])
    assert errs["routed"]["to_teacher"].min() > 0


def test_matched_static_and_compare(finetuned_run, tmp_path):
    from benchmarks.diagnostics import heldout, oracle_bound, router_health
    from benchmarks.static_baseline import compare, finetune_compute, matched_static, mixture_macs
    from training.rundir import RunDir

    caps = heldout(32, 16).captions
    res = matched_static(finetuned_run, tmp_path / "static", caps, export=False, progress=False)
    target = mixture_macs(finetuned_run, caps)
    assert res["target_macs"] == pytest.approx(target)
    assert abs(res["static_macs"] / target - 1) <= 0.01 and abs(res["pruned_macs"] / target - 1) > 0.005
    routed = finetune_compute(finetuned_run)
    assert res["routed"]["total"] == pytest.approx(routed["total"])
    # the static model's fine-tuning compute equals the mixture's up to one step's rounding
    one_step = res["static"]["macs_fraction"] * res["static"]["batch"]
    assert abs(res["static"]["compute"] - routed["total"]) <= one_step / 2 + 1e-9
    assert RunDir(res["run"]).config().router.num_experts == 1
    # reused when complete
    assert matched_static(finetuned_run, tmp_path / "static", caps, export=False) == json.loads(
        (tmp_path / "static" / "compute.json").read_text())

    cmp = compare(finetuned_run, res["run"], n=10, progress=False)
    assert set(cmp["models"]) == {"dense", "routed", "static"}
    assert cmp["models"]["routed"]["to_teacher"] > 0 and cmp["models"]["static"]["to_teacher"] > 0
    by = cmp["by_category"]["difficulty"]
    labels = np.asarray(cmp["labels"]["difficulty"])
    per = np.asarray(cmp["per_sample"]["routed"])
    for c, v in by["routed"].items():
        assert v == pytest.approx(per[labels == c].mean())

    orc = oracle_bound(finetuned_run, tmp_path / "oracle", static=res["run"], n=10, progress=False)
    assert orc["oracle"]["macs"] <= orc["router"]["macs"] + 1e-9
    assert orc["oracle"]["to_teacher"] <= orc["router"]["to_teacher"] + 1e-12  # the router's choice is feasible
    assert (tmp_path / "oracle" / "oracle.png").is_file() and (tmp_path / "oracle" / "oracle.md").is_file()
    health = router_health(finetuned_run, tmp_path / "health", n=10)
    assert abs(sum(health["shares"]) - 1) < 1e-9 and health["margin_median"] >= 0
    assert 0 <= health["entropy_median"] <= 1 + 1e-9


def test_shared_weight_finetuning_and_need_routing(tmp_path):
    """finetune.weights = shared: every expert is cut from one jointly trained copy (so two experts agree
    on the units both keep wherever the masks make them see the same inputs: here simply that the experts
    are the gated student, exactly), the compute counts each expert's drawn samples; router.refit = need
    labels prompts by OT over measured code errors and fits the predictor to them."""
    from aptp_export.expert_io import load_expert
    from benchmarks.static_baseline import finetune_compute
    from training.evaluation import RunEvaluator
    from training.finetune import run_finetune
    from training.need_routing import need_labels
    from training.prune import run_prune

    model = write_toy_model(tmp_path / "model")
    cfg = config_from_dict(tiny_config(model, tmp_path / "runs", router={"num_experts": 2, "refit": "need",
                                                                         "refit_prompts": 16, "refit_steps": 20},
                                       prune={"steps": 8, "warmup_steps": 2, "lr": 0.3, "codes_lr": 1.0},
                                       finetune={"steps": 4, "batch_size": 4, "weights": "shared"}))
    summary = run_prune(cfg, tmp_path / "run", progress=False)
    assert summary["need"]["prompts"] == 16 and abs(sum(summary["need"]["label_shares"]) - 1) < 1e-9
    assert summary["need"]["label_shares"] == [0.5, 0.5]  # equipartition
    run_finetune(tmp_path / "run", progress=False)
    comp = finetune_compute(tmp_path / "run")
    assert sum(r["sample_steps"] for r in comp["experts"]) == 4 * 4  # steps x batch samples, split by mask
    ev = RunEvaluator(tmp_path / "run")
    experts = {k: load_expert(ev.run.expert(k)) for k in range(2)}
    base_w = dict(ev.base.unet.named_parameters())["conv_in.weight"]
    # the experts moved away from the dense weights, and both share the same conv_in (never pruned)
    w0, w1 = (dict(e.named_parameters())["conv_in.weight"] for e in experts.values())
    assert torch.equal(w0, w1) and not torch.equal(w0, base_w)

    # need_labels: equipartitioned and optimal for a 4 x 2 example
    err = torch.tensor([[1.0, 0.1], [1.0, 0.9], [0.3, 0.1], [0.5, 0.45]], dtype=torch.float64)
    assert need_labels(err).tolist() == [1, 0, 1, 0]  # total 0.1 + 1.0 + 0.1 + 0.5 is the minimum


def test_report_shows_the_routed_vs_static_table():
    from benchmarks.report import static_section

    per = {"routed": {"easy": 0.01, "hard": 0.03}, "static": {"easy": 0.012, "hard": 0.02},
           "routed_macs": {"easy": 0.4, "hard": 0.6}}
    cmp = {"n": 100, "models": {"dense": {"macs": 1.0, "to_teacher": 0.0, "to_target": 0.05},
                                "routed": {"macs": 0.5, "to_teacher": 0.02, "to_target": 0.06},
                                "static": {"macs": 0.502, "to_teacher": 0.018, "to_target": 0.059}},
           "by_category": {"difficulty": per, "template": per}, "paired": {"routed_better_share": 0.42},
           "images": "images/routed_vs_static.png",
           "compute": {"target_macs": 0.5, "static_macs": 0.502, "routed": {"total": 4000.0},
                       "static": {"compute": 4016.0, "steps": 500}, "compute_ratio": 1.004}}
    text = "\n".join(static_section(cmp))
    assert "| routed | 0.5000 | 0.02000 |" in text and "| static | 0.5020 | 0.01800 |" in text
    assert "| hard | 0.600 | 0.03000 | 0.02000 | 1.500 |" in text and "42%" in text
    assert "ratio 1.004" in text and "routed_vs_static.png" in text


def test_aptp_eval_diagnose(finetuned_run, tmp_path, capsys):
    from aptp.cli import main

    assert main(["eval", "--diagnose", "health", "--run", str(finetuned_run), "-n", "8", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "diagnostics" / "health" / "health.json").read_text())
    assert res["n"] == 8 and (tmp_path / "diagnostics" / "health" / "health.png").is_file()
    assert main(["eval", "--diagnose", "probe,bogus"]) == 2
    assert "unknown bogus" in capsys.readouterr().err


def test_ladder_codes_are_nested_cuts_of_the_single_code(tmp_path):
    """router.codes_init = ladder: the pruning loop trains one code (as the static baseline's), then K nested
    codes are cut from its ranking at MACs fractions spread around its own; the predictor is fitted to the
    measured need. Nested: every unit a smaller expert keeps, each larger one keeps too."""
    from engines.errors import UserError
    from training.prune import run_prune
    from training.router import Router

    model = write_toy_model(tmp_path / "model")
    cfg = config_from_dict(tiny_config(model, tmp_path / "runs",
                                       router={"num_experts": 3, "refit": "need", "codes_init": "ladder",
                                               "ladder_spread": 0.3, "refit_prompts": 16, "refit_steps": 10},
                                       prune={"steps": 8, "warmup_steps": 2, "lr": 0.3, "codes_lr": 1.0}))
    summary = run_prune(cfg, tmp_path / "run", progress=False)
    lad = summary["ladder"]
    m0 = lad["single_code_macs"]
    assert lad["targets"] == pytest.approx([m0 * 0.7, m0, min(1.0, m0 * 1.3)])
    assert lad["macs"] == pytest.approx(summary["expert_macs"], abs=1e-6)
    assert lad["macs"][0] < lad["macs"][1] < lad["macs"][2]
    # the cut nearest each target: no other cut of the ranking lands nearer (tiny UNet: coarse steps)
    assert abs(lad["macs"][1] - m0) < 0.05
    gates = Router.load(tmp_path / "run" / "prune").expert_gates()
    assert bool((gates[0] <= gates[1]).all()) and bool((gates[1] <= gates[2]).all())
    shares = summary["need"]["label_shares"]
    assert abs(sum(shares) - 1) < 1e-9 and max(shares) <= 6 / 16 + 1e-9  # at most ceil(16 / 3) prompts each
    with pytest.raises(UserError, match="refit: need"):
        config_from_dict(tiny_config(model, tmp_path / "r2", router={"codes_init": "ladder"}))


def test_ladder_codes_hit_targets_on_a_known_ranking():
    """Router.ladder_codes on a hand-made ranking: each code keeps exactly the top units whose MACs (here:
    the kept fraction of units) are nearest its target, and its noise-free gates are that cut."""
    from training.router import ArchLayout, Router

    d = 10
    layout = ArchLayout(d, [(0, d)], torch.full((d,), d, dtype=torch.int64), torch.ones(d))
    r = Router(layout, 4, 3, min_width_units=1)
    logits = torch.arange(d, dtype=torch.float32) - 5.0  # unit 9 ranked first
    codes = r.ladder_codes(logits, [0.2, 0.5, 0.92], lambda g: g.sum() / d)
    with torch.no_grad():
        r.codes.copy_(codes)
    g = r.expert_gates()
    assert g.sum(1).tolist() == [2, 5, 9]
    for row in g:
        k = int(row.sum())
        assert row[d - k:].eq(1).all() and row[: d - k].eq(0).all()


def test_allocation_bound_finds_the_gain_of_routing_by_category():
    """Two templates through static networks at MACs 0.3/0.5/0.7: 'flat' loses nothing when pruned, 'steep'
    loses much. At 0.5 the bound sends flat to 0.3 and steep to 0.7 (mean 0.5) and gains 58 %; with both
    curves equal (no capacity effect) routing by category gains nothing at any budget."""
    import numpy as np

    from benchmarks.diagnostics import allocation_bound

    macs = np.array([0.3, 0.5, 0.7])
    flat, steep = np.array([0.011, 0.010, 0.010]), np.array([0.08, 0.04, 0.01])
    err = np.stack([flat] * 50 + [steep] * 50)
    lab = ["flat"] * 50 + ["steep"] * 50
    mid = allocation_bound(err, macs, lab)[1]
    assert mid["static_macs"] == 0.5 and mid["static"] == pytest.approx(0.025)
    assert mid["category"]["macs_by_template"] == {"flat": pytest.approx(0.3), "steep": pytest.approx(0.7)}
    assert mid["category"]["to_teacher"] == pytest.approx(0.0105) and mid["category"]["gain"] == pytest.approx(0.58)
    same = allocation_bound(np.stack([steep] * 100), macs, lab)
    assert all(abs(a["category"]["gain"]) < 1e-12 for a in same)
