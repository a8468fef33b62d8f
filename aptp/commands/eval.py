"""Quality against compute of an exported model: generate from a data set's captions with the runtime
(caption i with seed SEED + i, images and captions paired by index), then CLIP score, CMMD, FD-CLIP (and
FID with --inception) per model and per expert, the experts' top caption words by lift, and a
quality-vs-MACs plot. Writes OUT/eval.json, OUT/eval.md, OUT/quality_vs_macs.png. On the toy data the
shipped toy CLIP is used by default; nothing is downloaded.

With --diagnose probe,oracle,health (toy world) the diagnostics of benchmarks.diagnostics are written to
OUT/diagnostics/: the capacity-need probe (static sub-networks at --fractions of dense MACs, error per prompt
category), the oracle bound of --run's experts (against --static-run), the router health of --run. Without
--export only the diagnostics run."""

from __future__ import annotations

from aptp.args import add_export_argument


def add_arguments(parser) -> None:
    add_export_argument(parser)
    parser.set_defaults(export=None)
    for a in parser._actions:  # --export is optional when only --diagnose runs
        if a.dest == "export":
            a.required = False
    parser.add_argument("--diagnose", metavar="LIST", default=None,
                        help="comma-separated diagnostics on the toy world: probe, oracle, health (see above)")
    parser.add_argument("--run", metavar="DIR", help="a finished training run (--diagnose oracle, health)")
    parser.add_argument("--static-run", metavar="DIR", help="a finished K = 1 run to compare (--diagnose oracle)")
    parser.add_argument("--fractions", default="0.3,0.4,0.5,0.7",
                        help="MACs fractions of the probe's static sub-networks (default 0.3,0.4,0.5,0.7)")
    parser.add_argument("--data", default="toy", metavar="DIR_OR_toy",
                        help="'toy' (held-out captions of toy world v1), 'toy-v2' (world v2; scored by the v2 toy "
                             "CLIP) or an imagefolder directory with metadata.jsonl")
    parser.add_argument("-n", type=int, default=1000, help="captions to evaluate (the first N rows; default 1000)")
    parser.add_argument("--models", default="dense,routed", metavar="LIST",
                        help="comma-separated: dense, routed, static, expert-K (default dense,routed)")
    parser.add_argument("--static", metavar="DIR", help="export of a K = 1 model (adds the model 'static')")
    parser.add_argument("--clip", metavar="DIR", help="CLIP model directory (default on toy data: the toy CLIP)")
    parser.add_argument("--cmmd-clip", metavar="DIR", help="CLIP for CMMD (default: --clip; the paper uses ViT-L/14@336)")
    parser.add_argument("--inception", metavar="FILE", help="FID InceptionV3 weights file (needs the eval extra)")
    parser.add_argument("--out", default="eval", metavar="DIR", help="output directory (default: eval)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the export's)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale (default: the export's; 7.5 when it records none)")
    parser.add_argument("--scheduler", choices=("ddim", "pndm", "euler"), default=None,
                        help="sampler (default: the one in the manifest; the paper uses pndm)")
    parser.add_argument("--seed", type=int, default=0, help="caption i uses seed SEED + i (default 0)")
    parser.add_argument("--batch-size", type=int, default=8, help="most prompts per UNet call (default 8)")
    parser.add_argument("--resize", type=int, default=-1,
                        help="resize real and generated images to RESIZE px before every metric "
                             "(default 256, native size on toy data; 0 = never)")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads per session (0 = one per core)")


def _diagnose(args) -> None:
    from pathlib import Path

    from benchmarks.diagnostics import capacity_probe, oracle_bound, router_health
    from engines.errors import UserError

    what = [w.strip() for w in args.diagnose.split(",") if w.strip()]
    bad = sorted(set(what) - {"probe", "oracle", "health"})
    if bad or not what:
        raise UserError(f"--diagnose: unknown {', '.join(bad) or '(empty)'}; choose from probe, oracle, health")
    if {"oracle", "health"} & set(what) and not args.run:
        raise UserError("--diagnose oracle/health needs --run DIR (a finished training run)")
    try:
        fractions = [float(f) for f in args.fractions.split(",")]
    except ValueError:
        raise UserError(f"--fractions: not a list of numbers: {args.fractions!r}") from None
    if not all(0 < f < 1 for f in fractions):
        raise UserError("--fractions must lie in (0, 1)")
    out = Path(args.out) / "diagnostics"
    if "probe" in what:
        capacity_probe(out / "probe", fractions, args.n)
    if "oracle" in what:
        oracle_bound(args.run, out / "oracle", static=args.static_run, n=args.n)
    if "health" in what:
        router_health(args.run, out / "health", n=args.n)
    print(f"wrote {out}/ ({', '.join(what)}: JSON, markdown and a PNG each)")


def run(args) -> int:
    if args.diagnose:
        _diagnose(args)
        if args.export is None:
            return 0
    elif args.export is None:
        from engines.errors import UserError

        raise UserError("--export DIR is required (or --diagnose for the diagnostics alone)")
    from benchmarks.evaluate import EvalConfig, evaluate  # heavy (torch): only when the verb runs

    cfg = EvalConfig(engines=args.export, data=args.data, n=args.n, models=args.models, static=args.static,
                     clip=args.clip, cmmd_clip=args.cmmd_clip, inception=args.inception, out=args.out,
                     steps=args.steps, guidance=args.guidance, scheduler=args.scheduler, seed=args.seed,
                     batch_size=args.batch_size, resize=args.resize, threads=args.threads)
    result = evaluate(cfg)
    print(f"wrote {args.out}/eval.json, eval.md, quality_vs_macs.png ({result['seconds']:.0f} s)")
    return 0
