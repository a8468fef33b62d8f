"""The toy CLIP: a small `transformers.CLIPModel` trained contrastively on the toy world, so that CLIP score,
CMMD and FD-CLIP run offline on the toy through the same code path as a user's real CLIP directory.

    python -m training.toy.clip --out training/toy/clip --threads 1      # the shipped one (defaults below)

Shipped: 800 steps of batch 96, width 64, a pool of 20k samples; 224k parameters, 0.9 MB; 30 min on the
shared 2-core CPU under heavy load (about 2.2 s a step; far less on a quiet machine); held-out caption ->
image top-1 among 32 candidates 0.848 (0.940 counting an image with the identical caption; chance 0.031).

World v2 (`--world v2`, shipped as training/toy/clip_v2, what `clip_dir("v2")` and `aptp eval --data toy-v2`
use): the same recipe on world v2's captions and vocabulary (`V2_WORDS` added); 95 s on one thread of a quiet
2-core AMD EPYC; held-out top-1 0.925 (0.952 same caption). It scores a 3x3 grid's true caption only
~1.4 points above the same colours shuffled among the cells: it knows which colours a grid has far better
than where they are.

Model: a ViT image tower for 32x32 images (4x4 patches) and a CLIP text transformer over a word-level
vocabulary of the toy world (tokenizer.json written next to the weights, loaded by
`AutoTokenizer.from_pretrained`), 64-d joint space. Recipe: symmetric InfoNCE with a learned temperature
(CLIP's), AdamW, linear warm-up then cosine decay, gradient clipping. Data: a pool of toy-world training
samples (seeds < EVAL_SEED, so no held-out caption is ever seen), a fresh random batch of the pool per step.
Held-out check: caption -> image top-1 retrieval among 32 candidates drawn from the evaluation seed
(`retrieval_accuracy`); chance is 1/32.

Output directory (what `benchmarks.metrics.ClipEmbedder` reads): config.json + model.safetensors
(`CLIPModel.save_pretrained`), tokenizer.json + tokenizer_config.json + special_tokens_map.json,
preprocessor_config.json (CLIP's normalisation, no resize at 32 px), train.json (the recipe and its
held-out figures).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

from engines.fileio import write_json

from .font import DIGITS, LETTERS
from .world import (
    EVAL_SEED,
    NUMBER_WORDS,
    OBJECT_COLOURS,
    PALETTE,
    PLURAL,
    POSITION_PHRASE,
    SHAPES,
    SIZE,
    check_world,
    sample_at,
)

SPECIAL = ("<pad>", "<unk>", "<bos>", "<eos>")  # ids 0..3; eos != 2 so CLIP pools at the first eos token
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_TOKENS = 32  # toy captions have at most 11 words


def clip_dir(world: str = "v1") -> Path:
    """Directory of the shipped toy CLIP of a toy world (a CLIPModel directory: weights, config, tokenizer,
    preprocessor): training/toy/clip for world v1, training/toy/clip_v2 for world v2."""
    check_world(world)
    return Path(__file__).resolve().parent / ("clip" if world == "v1" else f"clip_{world}")


# words only world v2's captions use (grids, three-glyph texts, the flat-field phrasings); ":" is a token
V2_WORDS = ("grid", "four", "nine", "text", "plain", "solid", "image", "empty", "canvas", "flat", "field",
            "nothing", "but", ":")


def toy_vocabulary(world: str = "v1") -> list[str]:
    """Every word the toy world's captions use (lower case), after the special tokens."""
    words = {"a", "an", "the", "background", "small", "large", "above", "left", "of", "in", "on", "letter",
             "digit", *NUMBER_WORDS.values(), *PALETTE, *OBJECT_COLOURS, *SHAPES, *PLURAL.values()}
    for phrase in POSITION_PHRASE.values():
        words.update(phrase.split())
    words.update(c.lower() for c in (*LETTERS, *DIGITS))
    if check_world(world) == "v2":
        words.update(V2_WORDS)
    return [*SPECIAL, *sorted(words)]


def word_tokenizer(vocab: list[str], max_length: int = MAX_TOKENS) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer: <bos> words <eos>, unknown words -> <unk>, padded with <pad>.

    Truncation (transformers' `truncation=True`) keeps <bos> and <eos>: the post-processor's special tokens
    are accounted for before the words are cut."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab.index("<bos>")), ("<eos>", vocab.index("<eos>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                   pad_token="<pad>", model_max_length=max_length)


def make_model(vocab_size: int, seed: int = 0, width: int = 128, layers: int = 4, projection_dim: int = 64,
               image_size: int = SIZE, patch_size: int = 4, max_tokens: int = MAX_TOKENS) -> CLIPModel:
    """A small CLIPModel: ViT over `patch_size` patches of `image_size` images, CLIP text transformer."""
    torch.manual_seed(seed)
    heads = max(1, width // 32)
    cfg = CLIPConfig(
        text_config={"vocab_size": vocab_size, "hidden_size": width, "intermediate_size": 2 * width,
                     "num_hidden_layers": layers // 2, "num_attention_heads": heads,
                     "max_position_embeddings": max_tokens, "pad_token_id": SPECIAL.index("<pad>"),
                     "bos_token_id": SPECIAL.index("<bos>"), "eos_token_id": SPECIAL.index("<eos>")},
        vision_config={"image_size": image_size, "patch_size": patch_size, "hidden_size": width,
                       "intermediate_size": 2 * width, "num_hidden_layers": layers, "num_attention_heads": heads,
                       "num_channels": 3},
        projection_dim=projection_dim,
    )
    return CLIPModel(cfg)


def preprocessor_config(image_size: int = SIZE) -> dict:
    """CLIPImageProcessor settings: resize the short side to `image_size` (bicubic) and centre-crop, CLIP's
    mean/std (a no-op resize for the toy's 32 px images)."""
    return {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": image_size},
            "resample": 3, "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(CLIP_MEAN),
            "image_std": list(CLIP_STD), "do_convert_rgb": True}


def save_clip_dir(out, model: CLIPModel, tokenizer: PreTrainedTokenizerFast, image_size: int = SIZE,
                  info: dict | None = None) -> Path:
    """Write a CLIP directory (weights, config, tokenizer, preprocessor, optional train.json) atomically."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    write_json(tmp / "preprocessor_config.json", preprocessor_config(image_size))
    if info is not None:
        write_json(tmp / "train.json", info)
    tmp.chmod(0o755)  # mkdtemp makes 0700; the toy CLIP ships as package data
    for f in tmp.rglob("*"):
        f.chmod(0o755 if f.is_dir() else 0o644)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, 32, 32, 3] -> CLIP-normalised float [N, 3, 32, 32] (what the preprocessor produces)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def _embed(model: CLIPModel, tokenizer, images: np.ndarray, captions: list[str]):
    tok = tokenizer(captions, padding=True, truncation=True, return_tensors="pt")
    img = model.visual_projection(model.vision_model(pixel_values=_pixels(images)).pooler_output)
    txt = model.text_projection(model.text_model(input_ids=tok["input_ids"],
                                                 attention_mask=tok["attention_mask"]).pooler_output)
    return torch.nn.functional.normalize(img, dim=-1), torch.nn.functional.normalize(txt, dim=-1)


@torch.no_grad()
def retrieval_accuracy(model: CLIPModel, tokenizer, n: int = 1024, candidates: int = 32,
                       seed: int = EVAL_SEED, world: str = "v1") -> dict:
    """Held-out caption -> image top-1 retrieval: the first `n` samples of `seed`, in groups of `candidates`;
    each caption picks the most similar image of its group. Returns {"top1": strict (its own image),
    "top1_same_caption": an image with the identical caption also counts, "chance": 1/candidates, "n"}."""
    model.eval()
    n = n - n % candidates
    data = [sample_at(seed, i, world=world) for i in range(n)]
    hits = same = 0
    for g in range(0, n, candidates):
        grp = data[g:g + candidates]
        img, txt = _embed(model, tokenizer, np.stack([s.image for s in grp]), [s.caption for s in grp])
        pick = (txt @ img.T).argmax(dim=1).tolist()
        hits += sum(p == i for i, p in enumerate(pick))
        same += sum(grp[p].caption == grp[i].caption for i, p in enumerate(pick))
    return {"top1": hits / n, "top1_same_caption": same / n, "chance": 1 / candidates, "n": n,
            "candidates": candidates, "seed": seed}


def lr_factor(step: int, warmup: int, total: int, min_ratio: float = 0.05) -> float:
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


@dataclass(frozen=True)
class ClipRecipe:
    """How the toy CLIP is trained: AdamW with warm-up and cosine decay on `pool` toy-world samples."""

    steps: int = 800
    batch: int = 96
    lr: float = 1e-3
    warmup: int = 100
    pool: int = 20000
    seed: int = 0
    data_seed: int = 0
    width: int = 64
    layers: int = 4
    weight_decay: float = 0.05
    world: str = "v1"


def train(recipe: ClipRecipe | None = None, log_every: int = 100, progress: bool = True,
          eval_n: int = 1024) -> tuple[CLIPModel, PreTrainedTokenizerFast, dict]:
    """Train the toy CLIP; returns (model, tokenizer, info with the recipe, time and held-out retrieval)."""
    recipe = recipe or ClipRecipe()
    steps, batch, lr, warmup, pool = recipe.steps, recipe.batch, recipe.lr, recipe.warmup, recipe.pool
    seed, data_seed, width, layers, weight_decay = (recipe.seed, recipe.data_seed, recipe.width, recipe.layers,
                                                    recipe.weight_decay)
    if data_seed >= EVAL_SEED:
        raise ValueError(f"data_seed must be < {EVAL_SEED} (seeds >= {EVAL_SEED} are held out)")
    t0 = time.time()
    vocab = toy_vocabulary(recipe.world)
    tokenizer = word_tokenizer(vocab)
    model = make_model(len(vocab), seed=seed, width=width, layers=layers).train()
    data = [sample_at(data_seed, i, world=recipe.world) for i in range(pool)]
    images = np.stack([s.image for s in data])
    captions = [s.caption for s in data]
    t_data = time.time() - t0
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-6)
    g = torch.Generator().manual_seed(seed)
    ema_loss = None
    for step in range(steps):
        idx = torch.randint(0, pool, (batch,), generator=g).numpy()
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(step, warmup, steps)
        img, txt = _embed(model, tokenizer, images[idx], [captions[i] for i in idx])
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
        # identical captions in one batch are not negatives of each other: their targets are shared
        same = torch.tensor([[captions[i] == captions[j] for j in idx] for i in idx], dtype=torch.float32)
        target = same / same.sum(dim=1, keepdim=True)
        loss = 0.5 * (torch.nn.functional.cross_entropy(logits, target)
                      + torch.nn.functional.cross_entropy(logits.T, target))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_loss = loss.item() if ema_loss is None else 0.95 * ema_loss + 0.05 * loss.item()
        if progress and ((step + 1) % log_every == 0 or step + 1 == steps):
            print(f"step {step + 1}/{steps} loss {ema_loss:.4f} scale {model.logit_scale.exp().item():.1f} "
                  f"{(time.time() - t0 - t_data) / (step + 1):.2f}s/step", flush=True)
    train_seconds = time.time() - t0
    acc = retrieval_accuracy(model, tokenizer, n=eval_n, world=recipe.world)
    model.eval()
    info = {"recipe": asdict(recipe),
            "train_seconds": round(train_seconds, 1), "torch_threads": torch.get_num_threads(),
            "final_loss": ema_loss, "heldout_retrieval": acc,
            "params": sum(p.numel() for p in model.parameters())}
    return model, tokenizer, info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output CLIP directory")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch", type=int, default=96)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--pool", type=int, default=20000, help="training samples drawn once (seed --data-seed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--layers", type=int, default=4, help="vision layers (the text tower has half)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--world", default="v1", choices=("v1", "v2"), help="the toy world to train on")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok, info = train(ClipRecipe(args.steps, args.batch, args.lr, args.warmup, args.pool, args.seed,
                                        args.data_seed, args.width, args.layers, world=args.world))
    out = save_clip_dir(args.out, model, tok, info=info)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(json.dumps({"out": str(out), "bytes": size, **{k: info[k] for k in ("train_seconds", "heldout_retrieval")}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
