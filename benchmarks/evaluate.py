"""`aptp eval`: quality against compute of exported experts, with the metrics of benchmarks/metrics.py.

    result = evaluate(EvalConfig(engines="export/toy", data="toy", n=1000, out="eval/toy"))

1. Data: captions (and real images) paired by an explicit index: row i of the toy world's evaluation
   stream, or line i of an imagefolder's metadata.jsonl. Caption i is generated with seed `seed + i`
   (recorded per image), for every model, so every model sees the same captions and the same noise.
2. Models: "dense" (the exported dense UNet), "routed" (the router picks the expert per caption),
   "expert-K" (expert K forced on every caption), "static" (the single expert of a K = 1 export given
   with `static`, e.g. pruned to the mixture's mean MACs). Images are cached per model in
   OUT/images/MODEL.npz (keyed by engines, captions, seeds and sampler), so a rerun only adds models.
3. Metrics, for every model and for every expert on its own prompts (the routed images of the
   captions routed to it; small N, flagged): CLIP score (`clip`), CMMD to the real images (`cmmd_clip`,
   default `clip`), FD-CLIP (Fréchet distance of `clip` image embeddings; never called FID), FID (only
   with `inception`), CMMD to the dense model's images, MACs fraction, mean latency per image.
   Real and generated images go through one antialiased resize (`resize`, default 256 px except native
   size on the toy) before every metric.
4. Routing: per expert its share, MACs and the caption words with the highest lift (share of the word's
   captions routed to the expert / the expert's share), as in the paper's Table 2.
Writes OUT/eval.json, OUT/eval.md and OUT/quality_vs_macs.png.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from engines import EngineError, Runtime
from engines.errors import UserError
from engines.validation import Checks, is_int
from engines.fileio import atomic_path, write_json, write_text
from training.toy import EVAL_SEED, read_imagefolder, sample_at
from training.toy.clip import clip_dir as toy_clip_dir

from .metrics import (
    ClipEmbedder,
    check_inception_weights,
    clip_score_from_embeddings,
    cmmd,
    frechet_distance,
    inception_fid,
)
from .plots import save_figure
from .timing import machine

TOY_DATA_SEED = EVAL_SEED + 11  # held-out toy captions, disjoint from the demo's routing prompts (EVAL_SEED + 7)
STOPWORDS = {"a", "an", "the", "in", "of", "on", "with", "and", "at", "is", "to", "one"}
SMALL_N = 2048  # below this FD/FID are biased upward and CMMD's bias is visible: compare only at equal N


@dataclass
class EvalConfig:
    """What `evaluate` runs; validated in __post_init__ (UserError naming the option)."""

    engines: str
    data: str = "toy"
    n: int = 1000
    models: tuple[str, ...] = ("dense", "routed")
    static: str | None = None          # export dir of a K = 1 model (adds the "static" model)
    clip: str | None = None            # CLIP directory (default: the toy CLIP on toy data)
    cmmd_clip: str | None = None       # CLIP for CMMD (default: clip)
    inception: str | None = None       # FID Inception weights file
    out: str = "eval"
    steps: int | None = None           # None: the export's recommended steps (manifest `sampling`)
    guidance: float | None = None      # None: the export's recommended guidance scale
    scheduler: str | None = None
    seed: int = 0
    batch_size: int = 8
    resize: int | None = -1            # -1: 256 px, or native size on the toy data; None/0: no resize
    threads: int = 0
    lift_min_count: int = 5
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.models, str):
            self.models = tuple(m.strip() for m in self.models.split(",") if m.strip())
        self.models = tuple(self.models)
        c = Checks(UserError, sep=" ")
        c.require(self.n >= 2, "-n", "must be >= 2", self.n)
        c.require(self.steps is None or (is_int(self.steps) and self.steps >= 1), "--steps",
                  "must be an integer >= 1", self.steps)
        for opt, v, lo in (("--batch-size", self.batch_size, 1),
                           ("--threads", self.threads, 0), ("--seed", self.seed, 0)):
            c.require(is_int(v) and v >= lo, opt, f"must be an integer >= {lo}", v)
        for m in self.models:
            if m not in ("dense", "routed", "static") and _expert_id(m) is None:
                raise UserError(f"--models: unknown model {m!r} (dense, routed, static, expert-K)")
        if "static" in self.models and not self.static:
            raise UserError("--models static needs --static DIR (an export of a K = 1 run)")
        if self.static and "static" not in self.models:
            self.models = (*self.models, "static")
        if not self.models:
            raise UserError("--models: give at least one model")
        if toy_world_of(self.data) is None and not (Path(self.data) / "metadata.jsonl").is_file():
            raise UserError(f"--data {self.data}: not 'toy', 'toy-v2' nor an imagefolder directory with metadata.jsonl")
        if self.inception is not None:
            check_inception_weights(self.inception)
        if self.clip is None and toy_world_of(self.data):
            self.clip = str(toy_clip_dir(toy_world_of(self.data)))
        if self.cmmd_clip is None:
            self.cmmd_clip = self.clip
        for opt, d in (("--clip", self.clip), ("--cmmd-clip", self.cmmd_clip)):
            if d is not None and not (Path(d) / "config.json").is_file():
                raise UserError(f"{opt} {d}: not a CLIP model directory (no config.json)")
        if self.resize == -1:
            self.resize = None if toy_world_of(self.data) else 256
        c.require(self.resize is None or self.resize >= 0, "--resize", "must be >= 0", self.resize)
        self.resize = self.resize or None


def _expert_id(model: str) -> int | None:
    if model.startswith("expert-") and model[7:].isdigit():
        return int(model[7:])
    return None


# -- data -----------------------------------------------------------------------------------------------
@dataclass
class EvalData:
    """Captions [N] and real images uint8 [N, H, W, 3] paired by index, with where row i came from."""

    captions: list[str]
    images: np.ndarray
    source: list[str]  # "toy:SEED:INDEX" or the imagefolder file name of row i


def toy_world_of(data: str) -> str | None:
    """"toy" -> "v1", "toy-v2" -> "v2" (the built-in worlds, training.toy.world); None for a directory."""
    return {"toy": "v1", "toy-v2": "v2"}.get(data)


def load_data(data: str, n: int) -> EvalData:
    """The first `n` rows of the toy world's held-out stream ("toy", "toy-v2") or of an imagefolder's
    metadata.jsonl."""
    if toy_world_of(data):
        rows = [sample_at(TOY_DATA_SEED, i, world=toy_world_of(data)) for i in range(n)]
        return EvalData([s.caption for s in rows], np.stack([s.image for s in rows]),
                        [f"{data}:{TOY_DATA_SEED}:{i}" for i in range(n)])
    caps, imgs, src = [], [], []
    try:
        for image, text, row in read_imagefolder(data):
            caps.append(text)
            imgs.append(image)
            src.append(row["file_name"])
            if len(caps) == n:
                break
    except (OSError, KeyError, ValueError) as e:
        raise UserError(f"--data {data}: cannot read row {len(caps)} ({e})") from None
    if len(caps) < n:
        raise UserError(f"--data {data}: {len(caps)} rows, fewer than -n {n}")
    sizes = {im.shape for im in imgs}
    if len(sizes) > 1:  # real images of different sizes: one shared resize makes them stackable
        imgs = [np.asarray(Image.fromarray(im).resize((256, 256), Image.Resampling.LANCZOS)) for im in imgs]
    return EvalData(caps, np.stack(imgs), src)


def prepare_images(images: np.ndarray, size: int | None) -> np.ndarray:
    """One antialiased (Lanczos) resize to size x size of uint8 [N, H, W, 3] images, shared by real and
    generated images; rounding to uint8 happens inside PIL (never truncation)."""
    if size is None or images.shape[1:3] == (size, size):
        return images
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.LANCZOS)) for im in images])


# -- generation -----------------------------------------------------------------------------------------
def _cache_key(rt: Runtime, model: str, captions, seeds, cfg: EvalConfig) -> str:
    h = hashlib.sha256()
    manifest = (Path(rt.export_dir) / "manifest.json").read_bytes()
    h.update(json.dumps([hashlib.sha256(manifest).hexdigest(), model, captions, seeds, cfg.steps, cfg.guidance,
                         cfg.scheduler]).encode())
    return h.hexdigest()


def generate(rt: Runtime, model: str, captions: list[str], seeds: list[int], cfg: EvalConfig,
             cache_dir: Path | None = None) -> dict:
    """Images uint8 [N, H, W, 3] of one model for captions with their seeds, the expert per image and the
    seconds per image; cached in cache_dir/MODEL.npz."""
    key = _cache_key(rt, model, captions, seeds, cfg)
    path = cache_dir / f"{model}.npz" if cache_dir else None
    if path is not None and path.is_file():
        z = np.load(path, allow_pickle=False)
        if str(z["key"]) == key:
            print(f"[{model}] reusing {path}", flush=True)
            return {"images": z["images"], "experts": z["experts"].tolist(), "seconds_per_image": float(z["spi"])}
    expert = None if model in ("routed", "static") else ("dense" if model == "dense" else _expert_id(model))
    images, experts, spent = [], [], 0.0
    partial = path.with_suffix(".partial.npz") if path is not None else None
    if partial is not None and partial.is_file():  # an interrupted run of the same key: continue it
        z = np.load(partial, allow_pickle=False)
        if str(z["key"]) == key:
            images, experts, spent = list(z["images"]), z["experts"].tolist(), float(z["seconds"])
            print(f"[{model}] resuming at {len(images)} images from {partial}", flush=True)
    print(f"[{model}] generating {len(captions) - len(images)} images ({cfg.steps} steps)", flush=True)
    t0 = time.perf_counter() - spent
    chunk = max(cfg.batch_size * 8, 64)  # progress lines and bounded memory; batching per expert inside
    try:
        for i in range(len(images), len(captions), chunk):
            res = rt.generate_with_info(captions[i:i + chunk], steps=cfg.steps, guidance_scale=cfg.guidance,
                                        seed=seeds[i:i + chunk], scheduler=cfg.scheduler,
                                        batch_size=cfg.batch_size, expert=expert)
            images += [np.asarray(im.convert("RGB")) for im in res.images]
            experts += [-1 if e == "dense" else int(e) for e in res.expert_ids]
            done = i + len(res.images)
            print(f"[{model}] {done}/{len(captions)}  {(time.perf_counter() - t0) / done:.3f} s/image", flush=True)
            if partial is not None and done < len(captions):
                _save_npz(partial, images=np.stack(images), experts=np.asarray(experts),
                          seconds=time.perf_counter() - t0, key=np.asarray(key))
    except EngineError as e:
        raise UserError(str(e)) from None
    out = {"images": np.stack(images), "experts": experts,
           "seconds_per_image": (time.perf_counter() - t0) / len(captions)}
    if path is not None:
        _save_npz(path, images=out["images"], experts=np.asarray(experts), spi=out["seconds_per_image"],
                  key=np.asarray(key))
        partial.unlink(missing_ok=True)
    return out


def _save_npz(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


# -- metrics --------------------------------------------------------------------------------------------
class Scorer:
    """Every metric for which weights were given, against one set of real images and captions."""

    def __init__(self, cfg: EvalConfig, data: EvalData):
        self.cfg = cfg
        self.clip = ClipEmbedder(cfg.clip) if cfg.clip else None
        self.cmmd_clip = (self.clip if cfg.cmmd_clip == cfg.clip else ClipEmbedder(cfg.cmmd_clip)) \
            if cfg.cmmd_clip else None
        self.real = prepare_images(data.images, cfg.resize)
        self.text = self.clip.text_embeddings(data.captions) if self.clip else None
        self.real_clip = self.clip.image_embeddings(self.real) if self.clip else None
        self.real_cmmd = (self.real_clip if self.cmmd_clip is self.clip else self.cmmd_clip.image_embeddings(self.real)) \
            if self.cmmd_clip else None

    def embed(self, images: np.ndarray) -> dict:
        imgs = prepare_images(images, self.cfg.resize)
        e = {"images": imgs}
        if self.clip:
            e["clip"] = self.clip.image_embeddings(imgs)
        if self.cmmd_clip:
            e["cmmd"] = e["clip"] if self.cmmd_clip is self.clip else self.cmmd_clip.image_embeddings(imgs)
        return e

    def metrics(self, emb: dict, idx: np.ndarray, dense: dict | None = None) -> dict:
        """Metrics of generated rows `idx` (their embeddings in `emb`) against real rows `idx`."""
        m: dict = {"n": int(len(idx)), "small_n": bool(len(idx) < SMALL_N)}
        if self.clip:
            m["clip_score"] = clip_score_from_embeddings(emb["clip"][idx], self.text[idx])
            if len(idx) >= 2:
                m["fd_clip"] = frechet_distance(self.real_clip[idx], emb["clip"][idx])
        if self.cmmd_clip:
            m["cmmd"] = cmmd(self.real_cmmd[idx], emb["cmmd"][idx])
            if dense is not None:
                m["cmmd_vs_dense"] = cmmd(dense["cmmd"][idx], emb["cmmd"][idx])
        if self.cfg.inception and len(idx) >= 2:
            m["fid"] = inception_fid(self.real[idx], emb["images"][idx], self.cfg.inception)
        return m

    def real_metrics(self) -> dict:
        """The real images' own CLIP score: the ceiling a generator is measured against."""
        return {"n": len(self.real), "clip_score": clip_score_from_embeddings(self.real_clip, self.text)} \
            if self.clip else {"n": len(self.real)}


# -- routing table --------------------------------------------------------------------------------------
def words(caption: str) -> set[str]:
    return {w for w in caption.lower().replace(",", " ").split() if w not in STOPWORDS}


def top_words_by_lift(captions: list[str], expert_ids: list[int], expert: int, k: int = 5,
                      min_count: int = 5) -> list[dict]:
    """Words of `expert`'s captions ranked by lift = P(expert | word) / P(expert), among words in at least
    `min_count` captions overall and 2 of the expert's, with lift > 1 (the paper's Table 2 ranks words the same way)."""
    n = len(captions)
    mine = [i for i, e in enumerate(expert_ids) if e == expert]
    if not mine:
        return []
    share = len(mine) / n
    total = Counter(w for c in captions for w in words(c))
    here = Counter(w for i in mine for w in words(captions[i]))
    rows = [{"word": w, "lift": (here[w] / total[w]) / share, "count": here[w], "of": total[w]}
            for w in here if total[w] >= min_count and here[w] >= 2]
    rows = [r for r in rows if r["lift"] > 1.0]  # only words over-represented among the expert's captions
    rows.sort(key=lambda r: (-r["lift"], -r["count"], r["word"]))
    return rows[:k]


# -- driver ---------------------------------------------------------------------------------------------
def evaluate(cfg: EvalConfig, progress: bool = True) -> dict:
    """Generate, score and write OUT/eval.json, OUT/eval.md, OUT/quality_vs_macs.png (see module doc)."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    try:
        rt = Runtime.load(cfg.engines, threads=cfg.threads)
        static_rt = Runtime.load(cfg.static, threads=cfg.threads) if cfg.static else None
    except EngineError as e:
        raise UserError(str(e)) from None
    m = rt.manifest
    d = m.sampling_defaults  # what a caller who names no steps / guidance gets, as generate and serve do
    cfg.steps = d.steps if cfg.steps is None else cfg.steps
    cfg.guidance = d.guidance_scale if cfg.guidance is None else cfg.guidance
    if "dense" in cfg.models and m.dense is None:
        raise UserError(f"--engines {cfg.engines}: no dense model was exported (export with --with-dense)")
    for model in cfg.models:
        k = _expert_id(model)
        if k is not None and not 0 <= k < len(m.experts):
            raise UserError(f"--models {model}: the export has experts 0..{len(m.experts) - 1}")
    if static_rt is not None and len(static_rt.manifest.experts) != 1:
        raise UserError(f"--static {cfg.static}: expected a K = 1 export, it has {len(static_rt.manifest.experts)} experts")
    t0 = time.perf_counter()
    data = load_data(cfg.data, cfg.n)
    seeds = [cfg.seed + i for i in range(cfg.n)]
    scorer = Scorer(cfg, data)
    frac = {e.id: e.macs_fraction for e in m.experts}
    route = rt.route(data.captions)

    gens, embs, rows = {}, {}, []
    order = sorted(cfg.models, key=lambda s: s != "dense")  # dense first: the others are compared with it
    for model in order:
        runtime = static_rt if model == "static" else rt
        gens[model] = generate(runtime, model, data.captions, seeds, cfg, out / "images")
        embs[model] = scorer.embed(gens[model]["images"])
        ex = gens[model]["experts"]
        if model == "dense":
            macs = 1.0
        elif model == "static":
            macs = static_rt.manifest.experts[0].macs / m.dense_macs
        else:
            macs = float(np.mean([frac[e] for e in ex]))
        row = {"model": model, "macs_fraction": macs, "seconds_per_image": gens[model]["seconds_per_image"],
               **scorer.metrics(embs[model], np.arange(cfg.n), embs.get("dense") if model != "dense" else None)}
        rows.append(row)
        print(f"[{model}] " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                        for k, v in row.items() if k != "model"), flush=True)

    experts = []
    routed_ex = np.asarray(gens["routed"]["experts"]) if "routed" in gens else None
    for e in m.experts:
        idx = np.flatnonzero(np.asarray(route) == e.id)
        rec = {"id": e.id, "macs_fraction": e.macs_fraction, "params": e.params, "share": len(idx) / cfg.n,
               "train_share": e.share, "top_words": top_words_by_lift(data.captions, route, e.id,
                                                                     min_count=cfg.lift_min_count)}
        if routed_ex is not None and len(idx) >= 2:
            assert (routed_ex[idx] == e.id).all()  # the routed images of its own prompts
            rec["own_prompts"] = scorer.metrics(embs["routed"], idx, embs.get("dense"))
            if "dense" in embs:
                rec["own_prompts_dense"] = scorer.metrics(embs["dense"], idx)
        experts.append(rec)

    result = {
        "engines": shown_path(cfg.engines), "config": asdict(cfg), "n": cfg.n,
        "data": {"source": cfg.data, "seed_rule": f"caption i uses seed {cfg.seed} + i",
                 **({"toy_seed": TOY_DATA_SEED, "toy_world": toy_world_of(cfg.data)} if toy_world_of(cfg.data)
                    else {})},
        "metric_models": {"clip": _clip_name(scorer.clip), "cmmd_clip": _clip_name(scorer.cmmd_clip),
                          "fd": "FD-CLIP (Fréchet distance of the --clip image embeddings; not FID)",
                          "fid": "InceptionV3 (torchmetrics)" if cfg.inception else None},
        "real": scorer.real_metrics(), "models": rows, "experts": experts,
        "pairs": [{"index": i, "caption": c, "seed": s, "source": src,
                   **{mod: gens[mod]["experts"][i] for mod in gens}}
                  for i, (c, s, src) in enumerate(zip(data.captions, seeds, data.source, strict=True))],
        "seconds": time.perf_counter() - t0, "machine": machine(),
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "eval.json", result)
    plot_quality_vs_macs(result, out / "quality_vs_macs.png")
    write_text(out / "eval.md", markdown(result))
    return result


def _clip_name(clip) -> str | None:
    return None if clip is None else shown_path(clip.dir)


def shown_path(path) -> str:
    """A path as results record it: relative to the source root (the repository, or site-packages) when it
    lies inside, so a result read on another machine names the packaged toy CLIP, not this machine's /tmp."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(Path(__file__).resolve().parents[1]))
    except ValueError:
        return str(path)


# -- report ---------------------------------------------------------------------------------------------
METRICS = (("clip_score", "CLIP score ↑"), ("cmmd", "CMMD ↓"), ("fd_clip", "FD-CLIP ↓"), ("fid", "FID ↓"),
           ("cmmd_vs_dense", "CMMD vs dense ↓"))


def _fmt(v) -> str:
    return "–" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))


def markdown(result: dict) -> str:
    """eval.md: the per-model table, the per-expert table, the plot."""
    cols = [k for k, _ in METRICS if any(k in r for r in result["models"])]
    names = dict(METRICS)
    lines = [f"# Quality against MACs ({result['data']['source']}, N = {result['n']})", "",
             f"CLIP: `{result['metric_models']['clip']}`; CMMD CLIP: `{result['metric_models']['cmmd_clip']}`. "
             f"FD-CLIP is a Fréchet distance of CLIP image embeddings, not FID. "
             f"Below N = {SMALL_N} Fréchet distances are biased upward and CMMD's bias shows: compare rows of equal N. "
             f"Real images' own CLIP score: {_fmt(result['real'].get('clip_score'))}.", "",
             "| model | N | MACs fraction | s / image | " + " | ".join(names[c] for c in cols) + " |",
             "|---|---|---|---|" + "---|" * len(cols)]
    for r in result["models"]:
        lines.append(f"| {r['model']} | {r['n']} | {r['macs_fraction']:.3f} | {r['seconds_per_image']:.3f} | "
                     + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    lines += ["", "Experts (routed images of each expert's own prompts; small N, not comparable with the rows "
              "above; `dense` = the dense model on the same prompts):", "",
              "| expert | MACs fraction | share | N | CLIP score | dense CLIP score | CMMD | FD-CLIP | top words (lift) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for e in result["experts"]:
        own, dense = e.get("own_prompts", {}), e.get("own_prompts_dense", {})
        tw = ", ".join(f"{w['word']} ({w['lift']:.2f})" for w in e["top_words"])
        lines.append(f"| {e['id']} | {e['macs_fraction']:.3f} | {e['share']:.3f} | {own.get('n', 0)} | "
                     f"{_fmt(own.get('clip_score'))} | {_fmt(dense.get('clip_score'))} | {_fmt(own.get('cmmd'))} | "
                     f"{_fmt(own.get('fd_clip'))} | {tw} |")
    lines += ["", "![quality against MACs](quality_vs_macs.png)", ""]
    return "\n".join(lines)


def plot_quality_vs_macs(result: dict, path) -> Path:
    """One panel per metric: dense, routed mixture, static K = 1, forced experts, and each expert on its own
    prompts (hollow markers, labelled with N) against the MACs fraction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [(k, t) for k, t in METRICS[:4] if any(k in r for r in result["models"])]
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(4.2 * max(1, len(keys)), 3.8), dpi=120, squeeze=False)
    style = {"dense": ("k", "s"), "routed": ("tab:red", "*"), "static": ("tab:blue", "D")}
    for ax, (k, title) in zip(axes[0], keys, strict=False):
        for r in result["models"]:
            if k in r:
                c, mk = style.get(r["model"], ("tab:gray", "^"))
                ax.scatter([r["macs_fraction"]], [r[k]], color=c, marker=mk, s=90 if mk == "*" else 45,
                           label=f"{r['model']} (N={r['n']})", zorder=3)
        pts = [(e["macs_fraction"], e["own_prompts"][k], e["id"], e["own_prompts"]["n"])
               for e in result["experts"] if k in e.get("own_prompts", {})]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], facecolors="none", edgecolors="tab:green",
                       label="expert on its prompts", zorder=2)
            for x, y, i, n in pts:
                ax.annotate(f"e{i} ({n})", (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.set_xlabel("MACs / dense MACs")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.suptitle(f"quality against MACs ({result['data']['source']}, N = {result['n']})", fontsize=9)
    return save_figure(fig, path)


# -- the demo's lines -----------------------------------------------------------------------------------
def demo_quality(routed, dense, captions: list[str], clip: str | None = None) -> dict:
    """Toy CLIP score of routed and dense images of the same captions (pair i = image i, caption i) and
    the CMMD between the two image sets (N small: the estimator's bias is part of the figure, N is given).

    routed, dense: uint8 [N, H, W, 3] (or PIL images) generated with the same seeds."""
    emb = ClipEmbedder(clip or toy_clip_dir())
    r = emb.image_embeddings(routed)
    d = emb.image_embeddings(dense)
    t = emb.text_embeddings(list(captions))
    return {"n": len(captions), "clip": shown_path(emb.dir), "clip_score_routed": clip_score_from_embeddings(r, t),
            "clip_score_dense": clip_score_from_embeddings(d, t), "cmmd_routed_vs_dense": cmmd(d, r)}


def demo_quality_markdown(q: dict) -> str:
    """The demo report's line for `demo_quality`'s result."""
    return (f"Toy CLIP score (`{Path(q['clip']).name}`): routed mixture {q['clip_score_routed']:.2f}, dense teacher "
            f"{q['clip_score_dense']:.2f}; CMMD routed vs dense {q['cmmd_routed_vs_dense']:.3f} "
            f"(N = {q['n']} image pairs, same captions and seeds; at this N CMMD's bias is part of the figure).")
