"""Router cost against a Stable Diffusion generation: router ms per prompt / (steps x UNet ms at batch 2).

    python -m benchmarks.sd21_router_cost --engines EXPORT_DIR --sd-bench OUT/sd21_bench.json [--steps 25]

The router (the exported MiniLM encoder + scoring head, `router.onnx` of any export directory: the SD
configs route with the same packaged all-MiniLM-L6-v2 by default) is timed through the torch-free
runtime (`benchmarks.engines_bench.bench_router`) on caption-length prompts (COCO-style sentences,
not the toy's short captions), batched and one at a time. The UNet figure is the onnxruntime median of
one CFG-doubled UNet call (batch 2) from `benchmarks.sd21_latency`; a 25-step generation of one prompt
makes 25 such calls. The text encoder, scheduler and VAE are left out, which only makes the fraction
larger than in a real pipeline.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from transformers import MPNetConfig, MPNetModel

from aptp_export.export_spec import router_spec
from aptp_export.onnx_export import RouterGraph, export_onnx
from engines import Runtime
from engines.fileio import write_json
from engines.backends.ort import OrtSession

from .engines_bench import bench_router
from .timing import measure

PROMPTS = [
    "A man riding a wave on top of a surfboard in the ocean on a sunny day.",
    "Two giraffes standing next to each other near a wooden fence at the zoo.",
    "A plate of food with broccoli, rice and grilled chicken on a wooden table.",
    "A red double decker bus driving down a busy city street past tall buildings.",
    "A cat sleeping on the keyboard of an open laptop computer on a desk.",
    "A group of people flying colorful kites in a large grassy park.",
    "A kitchen with white cabinets, a stainless steel refrigerator and a window.",
    "An oil painting of a lighthouse on a rocky coast during a violent storm.",
    "A young boy swinging a baseball bat at a ball during a little league game.",
    "A bowl of fresh oranges and bananas sitting on a marble kitchen counter.",
    "A train traveling over a bridge across a river surrounded by autumn trees.",
    "A teddy bear sitting alone on a park bench covered in snow.",
    "A watercolor illustration of a fox in a forest at dawn, soft light.",
    "An airplane taking off from an airport runway with mountains behind it.",
    "A woman holding an umbrella while walking her dog in the rain.",
    "A close-up photo of a pizza with mushrooms, olives and melted cheese.",
]


def time_mpnet_base_router(workdir: Path, batch: int, tokens: int, num_experts: int = 16,
                           repeats: int = 20) -> dict:
    """The paper's router size: an all-mpnet-base-v2-shaped encoder (random weights, 768-d, 12 layers)
    with a linear scoring head, exported like aptp's router graph and timed with onnxruntime."""

    cfg = MPNetConfig(vocab_size=30527, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072, max_position_embeddings=514)
    torch.manual_seed(0)
    graph = RouterGraph(MPNetModel(cfg, add_pooling_layer=False).eval(), torch.nn.Linear(768, num_experts))
    path = workdir / "mpnet_base_router.onnx"
    if not path.exists():
        export_onnx(graph, router_spec(128, cfg.vocab_size, num_experts, 768, batch=(1, batch, 64),
                                       opt_length=tokens), path)
    sess = OrtSession(path, "cpu")
    rng = np.random.default_rng(0)

    def feeds(b):
        return {"input_ids": rng.integers(5, cfg.vocab_size, (b, tokens), dtype=np.int64),
                "attention_mask": np.ones((b, tokens), dtype=np.int64)}

    fb, f1 = feeds(batch), feeds(1)
    batched = measure(lambda: sess.run(fb), warmup=2, repeats=repeats)
    single = measure(lambda: sess.run(f1), warmup=2, repeats=repeats)
    return {"params_m": sum(p.numel() for p in graph.parameters()) / 1e6, "prompts": batch, "tokens": tokens,
            "batched_ms_per_prompt": batched.median_ms / batch, "single_prompt_ms": single.median_ms}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--engines", required=True, help="an export directory (its router.onnx is timed)")
    ap.add_argument("--sd-bench", required=True, help="sd21_bench.json written by benchmarks.sd21_latency")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--mpnet-base", metavar="DIR",
                    help="also time an all-mpnet-base-v2-sized router (random weights; ONNX cached in DIR)")
    ap.add_argument("--out", help="write the figures as JSON")
    args = ap.parse_args(argv)

    sd = json.loads(Path(args.sd_bench).read_text())
    rt = Runtime.load(args.engines, provider="cpu")
    ids, _ = rt.tokenizer.router_tokens(PROMPTS)
    routers = {"minilm": {**bench_router(rt, PROMPTS, repeats=args.repeats), "tokens": int(ids.shape[1])}}
    if args.mpnet_base:
        Path(args.mpnet_base).mkdir(parents=True, exist_ok=True)
        routers["mpnet_base"] = time_mpnet_base_router(Path(args.mpnet_base), len(PROMPTS), int(ids.shape[1]),
                                                       repeats=args.repeats)
    res = {"engines": args.engines, "steps": args.steps, "routers": routers, "sizes": {}}
    for name, r in routers.items():
        print(f"router {name}: {r['batched_ms_per_prompt']:.2f} ms per prompt batched ({len(PROMPTS)} prompts, "
              f"{r['tokens']} tokens), {r['single_prompt_ms']:.2f} ms for one prompt")
    for size, info in sd["sizes"].items():
        rows = []
        for d in info["summary"]:
            if "onnxruntime_ms" not in d:
                continue
            gen_ms = args.steps * d["onnxruntime_ms"]
            row = {"model": d["model"], "unet_ms": d["onnxruntime_ms"], "generation_ms": gen_ms}
            for name, r in routers.items():
                row[f"{name}_batched_fraction"] = r["batched_ms_per_prompt"] / gen_ms
                row[f"{name}_single_fraction"] = r["single_prompt_ms"] / gen_ms
            rows.append(row)
        res["sizes"][size] = rows
        print(f"[{size}x{size}] {args.steps}-step generation (UNet only, ORT): "
              f"{min(r['generation_ms'] for r in rows) / 1e3:.1f}-{max(r['generation_ms'] for r in rows) / 1e3:.1f} s")
        for name in routers:
            worst = max(rows, key=lambda r, n=name: r[f"{n}_single_fraction"])
            print(f"  router {name}: at most {100 * max(r[f'{name}_batched_fraction'] for r in rows):.3f} % "
                  f"batched, {100 * worst[f'{name}_single_fraction']:.3f} % one prompt at a time "
                  f"(worst: {worst['model']})")
    if args.out:

        write_json(args.out, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
