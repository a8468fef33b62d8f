"""Run configuration: dataclasses that reject unknown keys and impossible values, loaded from YAML.

    cfg = load_config("training/configs/toy.yaml", overrides=["prune.budget=0.75"])
    cfg.prune.budget, cfg.router.num_experts, ...
    save_config(cfg, "runs/NAME/config.yaml")     # the resolved config, next to what it produced

Every section is a dataclass validated in `__post_init__`; a bad value raises `UserError` naming the key
(e.g. "prune.budget must be in (0, 1], got 1.5"). `packaged_config("toy")` is the path of a shipped config.
Defaults are the reference values of docs/method.md §2-§5 for the method's hyper-parameters; steps, batch and
learning rates are sized for CPU runs (the reference values are in training/configs/sd21_*.yaml).
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from engines.errors import UserError
from engines.fileio import write_text
from engines.validation import Checks

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


_check = Checks(UserError, sep=" ").require  # _check(cond, "prune.budget", "must be in (0, 1]", value)


@dataclass
class ModelConfig:
    """The base (dense) model. `path`: None = the built-in toy teacher; a directory in the toy layout
    (unet/, scheduler/, text_encoder.json) or in Stable Diffusion's layout (unet/, vae/, text_encoder/,
    tokenizer/, scheduler/)."""

    path: str | None = None
    depth_blocks: str = "last"          # which blocks are depth-prunable: "last" (reference), "all", "none"
    resolution: int | None = None       # image side in pixels; None = unet sample_size x VAE factor
    prediction_type: str | None = None  # None = from the scheduler config; else "epsilon" | "v_prediction"
    text_max_length: int | None = None  # None = the model's own (16 for the toy, 77 for CLIP)
    timestep_sampling: str = "uniform"  # how training draws t: "uniform" (the paper) | "logit_normal" (SD3's recipe)

    def validate(self, p: str) -> None:
        _check(self.depth_blocks in ("last", "all", "none"), f"{p}.depth_blocks", "must be last|all|none",
               self.depth_blocks)
        _check(self.resolution is None or self.resolution >= 8, f"{p}.resolution", "must be >= 8", self.resolution)
        _check(self.prediction_type in (None, "epsilon", "v_prediction"), f"{p}.prediction_type",
               "must be null, epsilon or v_prediction", self.prediction_type)
        _check(self.text_max_length is None or self.text_max_length >= 1, f"{p}.text_max_length", "must be >= 1",
               self.text_max_length)
        _check(self.timestep_sampling in ("uniform", "logit_normal"), f"{p}.timestep_sampling",
               "must be uniform or logit_normal", self.timestep_sampling)


@dataclass
class DataConfig:
    """Training images and captions.

    type: "toy" (the built-in world, `num_samples` samples of seed `toy_seed`), "imagefolder" (`path` with
    metadata.jsonl), "hf" (a `datasets` dataset: hub name or a local dir saved with save_to_disk, `split`).
    """

    type: str = "toy"
    path: str | None = None
    split: str = "train"
    image_column: str = "image"
    text_column: str = "text"
    num_samples: int | None = 4096     # toy: dataset size; others: cap (None = all)
    toy_seed: int = 0
    toy_world: str = "v1"              # toy: which world (training.toy.world.WORLDS; v2 has the capacity effect)
    random_flip: bool = False          # off by default: captions name positions ("on the left")
    embedding_cache: str | None = None  # dir for cached prompt embeddings; None = RUN_DIR/cache

    def validate(self, p: str) -> None:
        _check(self.type in ("toy", "imagefolder", "hf"), f"{p}.type", "must be toy|imagefolder|hf", self.type)
        if self.type in ("imagefolder", "hf"):
            _check(bool(self.path), f"{p}.path", f"is required for data.type={self.type}", self.path)
        _check(self.num_samples is None or self.num_samples >= 1, f"{p}.num_samples", "must be >= 1",
               self.num_samples)
        if self.type == "toy":
            _check(self.num_samples is not None, f"{p}.num_samples", "is required for the toy world", None)
        _check(self.toy_seed >= 0, f"{p}.toy_seed", "must be >= 0", self.toy_seed)
        _check(self.toy_world in ("v1", "v2"), f"{p}.toy_world", "must be v1|v2", self.toy_world)


@dataclass
class RouterConfig:
    """Prompt router (docs/method.md §2-§3)."""

    sentence_encoder: str | None = None  # a sentence-transformers dir; None = packaged all-MiniLM-L6-v2
    num_experts: int = 8
    gumbel_tau: float = 0.4
    gumbel_offset: float = 3.0
    optimal_transport: bool = True       # False = nearest code by cosine (the paper's ablation)
    sinkhorn_epsilon: float = 0.05
    sinkhorn_iterations: int = 3
    min_width_units: int = 1             # hard gates keep >= this many units per width group
    # "orthogonal" (reference): codes keep their orthogonal init, all gates open when routing starts;
    # "predictor": when routing starts, codes = k-means centres of the predictor's logits over training
    # prompts, so the experts start from the prompt-dependent architectures the warm-up learned;
    # "ladder" (beyond the paper, docs/method.md §3b): the pruning phase trains ONE code on every sample
    # (as the static baseline does), then the K codes are nested cuts of its unit ranking at MACs
    # fractions spread evenly over (1 -+ ladder_spread) x its MACs; needs refit: need to route.
    codes_init: str = "orthogonal"
    ladder_spread: float = 0.4
    # Gumbel noise scale at the last step; it decays linearly from 1 over the routing phase (1.0 = constant
    # noise, the reference). 0 makes the final codes exactly the noise-free experts that inference uses.
    noise_final_scale: float = 1.0
    # after pruning, per-expert score offsets make inference's argmax reproduce the balanced optimal
    # transport of the training prompts (false = plain cosine argmax, the reference)
    inference_balance: bool = False
    # after pruning, "need" measures every code's error on `refit_prompts` training prompts, labels them
    # by equipartitioned optimal transport and fits the predictor to those labels (training/need_routing.py);
    # "none" = the reference
    refit: str = "none"
    refit_prompts: int = 1024
    refit_steps: int = 300

    def validate(self, p: str) -> None:
        _check(self.num_experts >= 1, f"{p}.num_experts", "must be >= 1", self.num_experts)
        _check(self.refit in ("none", "need"), f"{p}.refit", "must be none|need", self.refit)
        _check(self.refit_prompts >= self.num_experts, f"{p}.refit_prompts", "must be >= num_experts",
               self.refit_prompts)
        _check(self.refit_steps >= 1, f"{p}.refit_steps", "must be >= 1", self.refit_steps)
        _check(self.codes_init in ("orthogonal", "predictor", "ladder"), f"{p}.codes_init",
               "must be orthogonal|predictor|ladder", self.codes_init)
        _check(0 <= self.ladder_spread < 1, f"{p}.ladder_spread", "must be in [0, 1)", self.ladder_spread)
        _check(self.codes_init != "ladder" or self.num_experts == 1 or self.refit == "need", f"{p}.codes_init",
               "ladder codes are routed by measured need: set router.refit: need", self.codes_init)
        _check(0 <= self.noise_final_scale <= 1, f"{p}.noise_final_scale", "must be in [0, 1]", self.noise_final_scale)
        _check(self.gumbel_tau > 0, f"{p}.gumbel_tau", "must be > 0", self.gumbel_tau)
        _check(self.sinkhorn_epsilon > 0, f"{p}.sinkhorn_epsilon", "must be > 0", self.sinkhorn_epsilon)
        _check(self.sinkhorn_iterations >= 1, f"{p}.sinkhorn_iterations", "must be >= 1", self.sinkhorn_iterations)
        _check(self.min_width_units >= 0, f"{p}.min_width_units", "must be >= 0", self.min_width_units)


@dataclass
class PruneLosses:
    """L = ddpm L_ddpm + distill_out L_out + distill_block L_block + resource L_res + contrastive L_con
    (+ spread_std (-std r) + spread_max (1 - max r), the reference code's budget-spreading terms)."""

    ddpm: float = 1.0
    snr_gamma: float | None = 5.0        # min-SNR weighting; None = plain MSE
    distill_out: float = 0.2
    distill_block: float = 0.2
    resource: float = 2.0
    resource_type: str = "log"           # "log" = |log(r/p)|, "abs" = |r - p|, "square" = (r - p)^2
    spread_std: float = 0.1
    spread_max: float = 0.1
    contrastive: float = 100.0
    contrastive_tau: float = 0.03
    # Not in the reference: cross-entropy of softmax(cosine(predictor vector, codes) / routing_tau) to the
    # optimal-transport assignment, so that inference's plain argmax reproduces the balanced routing.
    routing: float = 0.0
    routing_tau: float = 0.1

    def validate(self, p: str) -> None:
        for k in ("ddpm", "distill_out", "distill_block", "resource", "spread_std", "spread_max", "contrastive",
                  "routing"):
            _check(getattr(self, k) >= 0, f"{p}.{k}", "must be >= 0", getattr(self, k))
        _check(self.snr_gamma is None or self.snr_gamma > 0, f"{p}.snr_gamma", "must be null or > 0", self.snr_gamma)
        _check(self.resource_type in ("log", "abs", "square"), f"{p}.resource_type", "must be log|abs|square",
               self.resource_type)
        _check(self.contrastive_tau > 0, f"{p}.contrastive_tau", "must be > 0", self.contrastive_tau)
        _check(self.routing_tau > 0, f"{p}.routing_tau", "must be > 0", self.routing_tau)


@dataclass
class PruneConfig:
    """Pruning phase (docs/method.md §4). `batch_size` is the global batch (split over processes)."""

    budget: float = 0.5                  # target mean MACs as a fraction of the dense model's
    steps: int = 300
    warmup_steps: int = 60               # gated by the predictor's own vector (no codes, no OT)
    batch_size: int = 32
    lr: float = 2e-2
    codes_lr: float | None = None        # learning rate of the codes; None = lr
    scale_lr: bool = False               # multiply lr (and codes_lr) by sqrt(batch_size), as the reference
    lr_warmup_steps: int = 10
    weight_decay: float = 0.0
    train_unet: bool = False
    unet_lr: float = 5e-5
    checkpoint_every: int = 50
    log_every: int = 10
    losses: PruneLosses = field(default_factory=PruneLosses)

    def validate(self, p: str) -> None:
        _check(0 < self.budget <= 1, f"{p}.budget", "must be in (0, 1]", self.budget)
        _check(self.steps >= 1, f"{p}.steps", "must be >= 1", self.steps)
        _check(0 <= self.warmup_steps <= self.steps, f"{p}.warmup_steps", f"must be in [0, steps={self.steps}]",
               self.warmup_steps)
        _check(self.batch_size >= 1, f"{p}.batch_size", "must be >= 1", self.batch_size)
        _check(self.lr > 0, f"{p}.lr", "must be > 0", self.lr)
        _check(self.unet_lr > 0, f"{p}.unet_lr", "must be > 0", self.unet_lr)
        _check(self.codes_lr is None or self.codes_lr > 0, f"{p}.codes_lr", "must be null or > 0", self.codes_lr)
        _check(self.lr_warmup_steps >= 0, f"{p}.lr_warmup_steps", "must be >= 0", self.lr_warmup_steps)
        _check(self.weight_decay >= 0, f"{p}.weight_decay", "must be >= 0", self.weight_decay)
        _check(self.checkpoint_every >= 1, f"{p}.checkpoint_every", "must be >= 1", self.checkpoint_every)
        _check(self.log_every >= 1, f"{p}.log_every", "must be >= 1", self.log_every)


@dataclass
class FinetuneLosses:
    """L_ft = ddpm L_ddpm + distill_out L_out + distill_block L_block (teacher = dense model)."""

    ddpm: float = 1.0
    snr_gamma: float | None = 5.0
    distill_out: float = 0.2
    distill_block: float = 0.2

    def validate(self, p: str) -> None:
        for k in ("ddpm", "distill_out", "distill_block"):
            _check(getattr(self, k) >= 0, f"{p}.{k}", "must be >= 0", getattr(self, k))
        _check(self.ddpm + self.distill_out + self.distill_block > 0, p, "needs one positive loss weight",
               (self.ddpm, self.distill_out, self.distill_block))
        _check(self.snr_gamma is None or self.snr_gamma > 0, f"{p}.snr_gamma", "must be null or > 0", self.snr_gamma)


@dataclass
class FinetuneConfig:
    """Expert fine-tuning (docs/method.md §5). allocation: "per_expert" = `steps` for every expert (the paper);
    "split" = `steps` in total, shared in proportion to each expert's routed samples."""

    steps: int = 200
    allocation: str = "per_expert"
    # "separate": each expert is cut from the dense weights and fine-tuned alone on its routed prompts (the
    # paper); "shared": one set of weights, every sample gated by its routed expert, `steps` in total, then
    # every expert is cut from it (beyond the paper; training/finetune.py)
    weights: str = "separate"
    batch_size: int = 32
    lr: float = 1e-4
    scale_lr: bool = False               # multiply lr by sqrt(batch_size), as the reference
    lr_warmup_steps: int = 10
    # "constant" after the warm-up (the paper); "cosine" decays to 0 at the last step, so the end point does
    # not depend on where a noisy constant-lr run happens to stop (measured on the toy at lr 1e-3: one static
    # expert's held-out error 0.0077 after 128 steps, 0.0211 after 256)
    lr_schedule: str = "constant"
    weight_decay: float = 0.0
    caption_dropout: float = 0.1         # fraction of captions replaced by "" (keeps guidance working)
    losses: FinetuneLosses = field(default_factory=FinetuneLosses)

    def validate(self, p: str) -> None:
        _check(self.steps >= 0, f"{p}.steps", "must be >= 0", self.steps)
        _check(self.allocation in ("per_expert", "split"), f"{p}.allocation", "must be per_expert|split",
               self.allocation)
        _check(self.weights in ("separate", "shared"), f"{p}.weights", "must be separate|shared", self.weights)
        _check(self.batch_size >= 1, f"{p}.batch_size", "must be >= 1", self.batch_size)
        _check(self.lr > 0, f"{p}.lr", "must be > 0", self.lr)
        _check(self.lr_warmup_steps >= 0, f"{p}.lr_warmup_steps", "must be >= 0", self.lr_warmup_steps)
        _check(self.lr_schedule in ("constant", "cosine"), f"{p}.lr_schedule", "must be constant|cosine",
               self.lr_schedule)
        _check(self.weight_decay >= 0, f"{p}.weight_decay", "must be >= 0", self.weight_decay)
        _check(0 <= self.caption_dropout < 1, f"{p}.caption_dropout", "must be in [0, 1)", self.caption_dropout)


@dataclass
class RunConfig:
    """A whole run: `runs_dir/name/` receives config.yaml, prune/ and experts/."""

    name: str = "toy"
    seed: int = 0
    runs_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def validate(self, p: str = "") -> None:
        _check(bool(self.name) and "/" not in self.name and self.name not in (".", ".."), "name",
               "must be a plain directory name", self.name)
        _check(self.seed >= 0, "seed", "must be >= 0", self.seed)

    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------- parsing

def _type_ok(value, tp) -> tuple[bool, object]:
    """Check `value` against a simple annotation (int, float, bool, str, X | None); int is accepted for float."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return True, None
        for a in args:
            if a is type(None):
                continue
            ok, v = _type_ok(value, a)
            if ok:
                return True, v
        return False, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
            # YAML 1.1 (yaml.safe_load) reads `1e-3` (no dot) as a string; it means the number
            return True, float(value)
        return False, value
    if tp is str:
        return isinstance(value, str), value
    return False, value


_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _type_name(tp) -> str:
    args = typing.get_args(tp)
    if args:
        return " or ".join("null" if a is type(None) else a.__name__ for a in args)
    return tp.__name__


def _build(cls, data, prefix: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{prefix or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        raise UserError(f"unknown config key '{key}' (known in {prefix or 'top level'}: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, data[f.name], key)
            continue
        ok, v = _type_ok(data[f.name], tp)
        if not ok:
            raise UserError(f"{key} must be {_type_name(tp)}, got {data[f.name]!r}")
        kwargs[f.name] = v
    obj = cls(**kwargs)
    obj.validate(prefix)
    return obj


def config_from_dict(data: dict) -> RunConfig:
    """Build and validate a RunConfig from a nested dict (unknown keys and bad values raise UserError)."""
    return _build(RunConfig, data, "")


def _set_override(data: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise UserError(f"override {assignment!r} must look like section.key=value")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise UserError(f"override {key!r}: {part} is not a section")
        node = nxt
    try:
        node[parts[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise UserError(f"override {key!r}: cannot parse value {raw!r}: {e}") from None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (None = the packaged toy config), apply `section.key=value` overrides, validate."""

    path = Path(path) if path is not None else packaged_config("toy")
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    data = data or {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping")
    for ov in overrides or []:
        _set_override(data, ov)
    return config_from_dict(data)


def config_to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def save_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    """Write the resolved config (every key, defaults included) atomically."""

    write_text(path, config_to_yaml(cfg))


def packaged_config(name: str) -> Path:
    """Path of a config shipped in training/configs (name without .yaml)."""
    p = CONFIG_DIR / f"{name}.yaml"
    if not p.is_file():
        known = sorted(x.stem for x in CONFIG_DIR.glob("*.yaml"))
        raise UserError(f"no packaged config {name!r} (known: {', '.join(known)})")
    return p


def resolve_config_arg(arg: str) -> Path:
    """A --config argument: a file path, or the name of a packaged config ("toy", "sd21_coco_base")."""
    p = Path(arg)
    if p.is_file():
        return p
    if os.sep not in arg and not arg.endswith((".yaml", ".yml")):
        return packaged_config(arg)
    raise UserError(f"config file not found: {arg}")


def diff_configs(a: RunConfig, b: RunConfig) -> list[str]:
    """Dotted keys whose values differ between two configs."""
    out: list[str] = []

    def walk(x, y, prefix):
        for k in x:
            key = f"{prefix}.{k}" if prefix else k
            if isinstance(x[k], dict) and isinstance(y.get(k), dict):
                walk(x[k], y[k], key)
            elif x[k] != y.get(k):
                out.append(key)

    walk(a.to_dict(), b.to_dict(), "")
    return out
