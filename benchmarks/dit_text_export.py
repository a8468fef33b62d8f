"""Real-size text-encoder graphs of the DiT families (issue 25, scale figures): parameters, fp32 bytes, export time
and peak memory per phase, with random weights.

    python -m benchmarks.dit_text_export --out runs/sd3_text            # SD3: CLIP-L + CLIP-G, no T5
    python -m benchmarks.dit_text_export --out runs/sd3_text --t5       # + T5-XXL (19 GB of fp32 weights)

The graph is the export's own: `Sd3TextEncoderGraph` with SD3-medium's encoders (CLIP-L: 12 layers, 768 wide;
CLIP-G: 32 layers, 1280 wide; T5 v1.1 XXL: 24 layers, 4096 wide, d_ff 10240), 77 CLIP tokens and 256 T5 tokens
(zeros without T5), `export_spec.sd3_text_encoder_spec`. Phases as benchmarks.sdxl_latency's `export_one`:
build, torch_reference (one batch-1 call), export (TorchScript, external data), then with torch freed,
ort_session and ort_check (fp32 relative error against the torch call). Every encoder's parameter count is
also taken on the meta device, so the T5 figure is printed even when T5 is not built: PixArt's text graph is the
same T5-XXL. Before building, the script refuses (exit 2) when the fp32 weights times 2.5 exceed the memory
available: the export's peak was 1.8x the weights for the CLIPs (docs/perf/dit_latency.md), and the
torch reference and the onnxruntime check need room besides.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from aptp_export.export_spec import sd3_text_encoder_spec
from aptp_export.onnx_export import FP32_RTOL, Sd3TextEncoderGraph
from engines.machine import memory_available

from .memwatch import Phases
from .sdxl_latency import export_and_check

CLIP_LEN, T5_LEN, JOINT = 77, 256, 4096
CLIP_VOCAB, T5_VOCAB = 49408, 32128


def encoder_configs() -> dict:
    """SD3-medium's three text encoders (transformers configs, as in its text_encoder*/config.json)."""
    from transformers import CLIPTextConfig, T5Config

    clip = dict(vocab_size=CLIP_VOCAB, max_position_embeddings=CLIP_LEN, bos_token_id=49406, eos_token_id=49407,
                pad_token_id=1)
    return {
        "clip_l": CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                 projection_dim=768, hidden_act="quick_gelu", **clip),
        "clip_g": CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                 num_attention_heads=20, projection_dim=1280, hidden_act="gelu", **clip),
        "t5_xxl": T5Config(vocab_size=T5_VOCAB, d_model=JOINT, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                           relative_attention_num_buckets=32, relative_attention_max_distance=128,
                           feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    }


def build(name: str, config, device: str = "cpu"):
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    cls = T5EncoderModel if name == "t5_xxl" else CLIPTextModelWithProjection
    with torch.device(device):
        return cls(config).eval().requires_grad_(False)


def meta_params() -> dict[str, int]:
    """Parameters of each encoder, counted on the meta device (nothing allocated)."""
    return {n: sum(p.numel() for p in build(n, c, "meta").parameters()) for n, c in encoder_configs().items()}


def available_gb() -> float:
    """engines.machine.memory_available in GB (nan where unknown)."""
    available = memory_available()
    return float("nan") if available is None else available / 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.dit_text_export", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="directory for the graph and result.json")
    ap.add_argument("--t5", action="store_true", help="include T5-XXL (19 GB of fp32 weights)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    counts = meta_params()
    for n, c in counts.items():
        print(f"{n}: {c / 1e6:.1f} M parameters, {4 * c / 1e9:.2f} GB fp32")
    names = ["clip_l", "clip_g"] + (["t5_xxl"] if args.t5 else [])
    need = 2.5 * 4 * sum(counts[n] for n in names) / 1e9
    if need > available_gb():
        print(f"refused: {', '.join(names)} need about {need:.0f} GB (2.5 x fp32 weights), "
              f"{available_gb():.0f} GB available", file=sys.stderr)
        return 2
    phases = Phases(out / "progress.json", encoders=names, params=counts)
    configs = encoder_configs()
    with phases("build"):
        torch.manual_seed(0)
        enc = {n: build(n, configs[n]) for n in names}
    models = [Sd3TextEncoderGraph(enc["clip_l"], enc["clip_g"], enc.get("t5_xxl"), JOINT, T5_LEN)]
    del enc
    spec = sd3_text_encoder_spec(CLIP_LEN, T5_LEN, JOINT, 768 + 1280, (CLIP_VOCAB, CLIP_VOCAB,
                                                                       T5_VOCAB if args.t5 else None))
    errors = export_and_check(phases, models, spec, out / "text_encoder.onnx", args.threads)
    result = {"encoders": names, "params": counts, "phases": phases.records,
              "ok": all(v <= FP32_RTOL for v in errors.values())}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print("| phase | seconds | peak GB |\n|---|---|---|")
    for r in phases.records:
        print(f"| {r['phase']} | {r['seconds']:.1f} | {r['peak_gb']:.1f} |")
    export = next(r for r in phases.records if r["phase"] == "export")
    print(f"graph bytes: {sum(export['bytes'].values()) / 1e9:.2f} GB; "
          f"max relative error {max(errors.values()):.2e} ({'ok' if result['ok'] else 'OVER 1e-4'})")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
