"""Quality against compute of an exported model: generate from a data set's captions with the runtime
(caption i with seed SEED + i, images and captions paired by index), then CLIP score, CMMD, FD-CLIP (and
FID with --inception) per model and per expert, the experts' top caption words by lift, and a
quality-vs-MACs plot. Writes OUT/eval.json, OUT/eval.md, OUT/quality_vs_macs.png. On the toy data the
shipped toy CLIP is used by default; nothing is downloaded."""

from __future__ import annotations

from aptp.args import add_export_argument
from benchmarks.evaluate import EvalConfig, evaluate


def add_arguments(parser) -> None:
    add_export_argument(parser)
    parser.add_argument("--data", default="toy", metavar="DIR_OR_toy",
                        help="'toy' (held-out toy world captions) or an imagefolder directory with metadata.jsonl")
    parser.add_argument("-n", type=int, default=1000, help="captions to evaluate (the first N rows; default 1000)")
    parser.add_argument("--models", default="dense,routed", metavar="LIST",
                        help="comma-separated: dense, routed, static, expert-K (default dense,routed)")
    parser.add_argument("--static", metavar="DIR", help="export of a K = 1 model (adds the model 'static')")
    parser.add_argument("--clip", metavar="DIR", help="CLIP model directory (default on toy data: the toy CLIP)")
    parser.add_argument("--cmmd-clip", metavar="DIR", help="CLIP for CMMD (default: --clip; the paper uses ViT-L/14@336)")
    parser.add_argument("--inception", metavar="FILE", help="FID InceptionV3 weights file (needs the eval extra)")
    parser.add_argument("--out", default="eval", metavar="DIR", help="output directory (default: eval)")
    parser.add_argument("--steps", type=int, default=25, help="denoising steps (default 25)")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    parser.add_argument("--scheduler", choices=("ddim", "pndm", "euler"), default=None,
                        help="sampler (default: the one in the manifest; the paper uses pndm)")
    parser.add_argument("--seed", type=int, default=0, help="caption i uses seed SEED + i (default 0)")
    parser.add_argument("--batch-size", type=int, default=8, help="most prompts per UNet call (default 8)")
    parser.add_argument("--resize", type=int, default=-1,
                        help="resize real and generated images to RESIZE px before every metric "
                             "(default 256, native size on toy data; 0 = never)")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads per session (0 = one per core)")


def run(args) -> int:
    cfg = EvalConfig(engines=args.export, data=args.data, n=args.n, models=args.models, static=args.static,
                     clip=args.clip, cmmd_clip=args.cmmd_clip, inception=args.inception, out=args.out,
                     steps=args.steps, guidance=args.guidance, scheduler=args.scheduler, seed=args.seed,
                     batch_size=args.batch_size, resize=args.resize, threads=args.threads)
    result = evaluate(cfg)
    print(f"wrote {args.out}/eval.json, eval.md, quality_vs_macs.png ({result['seconds']:.0f} s)")
    return 0
