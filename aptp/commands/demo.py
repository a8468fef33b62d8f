"""End to end on the built-in toy teacher and toy world, on CPU, in minutes.

pruning phase -> expert fine-tuning -> export (with the dense reference) -> routing and
generation with the torch-free runtime -> benchmarks -> OUT/report.md. Training settings: the packaged
config training/configs/demo.yaml (--set overrides any key). Each stage's output is reused when present,
so an interrupted demo continues where it stopped (pass --fresh to redo).
"""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="aptp-demo", metavar="DIR", help="output directory (default: aptp-demo)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a value of the demo's training config (repeatable)")
    parser.add_argument("--prompts", type=int, default=256, help="held-out prompts to route (default 256)")
    parser.add_argument("--per-expert", type=int, default=6, help="images generated per expert (default 6)")
    parser.add_argument("--steps", type=int, default=25, help="denoising steps for the images (default 25)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale (default: the teacher's sampling.json, else 7.5)")
    parser.add_argument("--repeats", type=int, default=9, help="timed repeats per latency measurement (default 9)")
    parser.add_argument("--bench-threads", type=int, default=1,
                        help="intra-op threads per backend in the latency benchmark (default 1: steadier ratios on "
                             "a shared machine; 0 = each library's default)")
    parser.add_argument("--compare-n", type=int, default=500,
                        help="held-out prompts of the routed-vs-static error table (default 500)")
    parser.add_argument("--fresh", action="store_true", help="delete OUT first instead of reusing finished stages")


def run(args) -> int:
    from benchmarks.demo import run_demo  # heavy (torch): only when the verb runs

    run_demo(args.out, overrides=args.set, prompts=args.prompts, per_expert=args.per_expert, steps=args.steps,
             guidance=args.guidance, repeats=args.repeats, bench_threads=args.bench_threads, fresh=args.fresh,
             compare_n=args.compare_n)
    return 0
