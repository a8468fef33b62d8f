"""Export a training run's experts, router and shared parts to ONNX (and TensorRT engines).

Writes OUT/manifest.json (read by the torch-free runtime `engines`), router.onnx, text_encoder.onnx,
experts/expert_XX.onnx (and .plan with --backend tensorrt), the tokenizer, and with --with-dense the
dense UNet as the latency reference. Every graph passes onnx.checker and is compared with its torch
model on fresh random inputs (fp32: relative error <= 1e-4) or the export fails.

--precision int8 writes the fp32 export to OUT.fp32 (the reference) and then runs `aptp quantize` on it into
OUT with its defaults (int8 OpenVINO IR per expert; `aptp quantize --help` for the calibration and guard
settings).
"""

from __future__ import annotations

from pathlib import Path

from aptp_export.export_options import ExportOptions
from engines.errors import UserError
from engines.manifest import BACKENDS, PRECISIONS
from engines.schedulers import SCHEDULERS

DEFAULTS = ExportOptions()


def add_arguments(parser) -> None:
    parser.add_argument("--run", required=True, metavar="DIR", help="training run directory (after aptp finetune)")
    parser.add_argument("--out", required=True, metavar="DIR", help="export directory to write")
    parser.add_argument("--backend", choices=BACKENDS, default=DEFAULTS.backend,
                        help="onnx (default) or tensorrt (ONNX + TensorRT plans; needs a GPU and the tensorrt extra)")
    parser.add_argument("--precision", choices=(*PRECISIONS, "int8"), default=DEFAULTS.precision,
                        help="graph precision (int8: fp32 export to OUT.fp32, then aptp quantize into OUT)")
    parser.add_argument("--with-dense", action="store_true", help="also export the dense UNet (dense.onnx)")
    parser.add_argument("--scheduler", choices=tuple(SCHEDULERS), default=DEFAULTS.scheduler,
                        help="default sampler recorded in the manifest (the runtime can override it; default: "
                             "ddim, flow_euler for a flow-matching model such as SD3)")
    parser.add_argument("--steps", type=int, default=None,
                        help="sampling steps recorded as the export's default (default: the model's sampling.json, else 25)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="guidance scale recorded as the export's default (default: the model's sampling.json, "
                             "else its pipeline's: SD 7.5, SDXL 5.0, PixArt 4.5, SD3 7.0)")
    parser.add_argument("--max-batch", type=int, default=DEFAULTS.max_batch, help="most prompts per UNet call the profiles allow")
    parser.add_argument("--round-to", type=int, default=DEFAULTS.round_to, metavar="N",
                        help="round every expert's kept channels per layer up to a multiple of N (added channels "
                             "are zero, outputs unchanged; e.g. 16 for AVX-512 CPUs, 8 for tensor cores; 1 = off)")


def run(args) -> int:
    from training.export_run import export_run  # heavy (torch): only when the verb runs

    int8 = args.precision == "int8"
    if int8:
        from training.config import load_config

        cfg_file = Path(args.run) / "config.yaml"
        path = load_config(cfg_file).model.path if cfg_file.is_file() else None
        if path not in (None, "builtin:toy-teacher", "builtin:toy-teacher-v2"):
            raise UserError("--precision int8 picks calibration prompts only for the toy model; for your own model "
                            "export in fp32, then run aptp quantize --prompts FILE --guard-prompts FILE")
    options = ExportOptions(backend=args.backend, precision="fp32" if int8 else args.precision,
                            scheduler=args.scheduler, max_batch=args.max_batch, with_dense=args.with_dense,
                            round_to=args.round_to, steps=args.steps, guidance_scale=args.guidance)
    out = f"{str(args.out).rstrip('/')}.fp32" if int8 else args.out
    manifest, _ = export_run(args.run, out, options)
    if int8:
        from aptp.commands.quantize import default_pools, default_sampling
        from aptp_export.quantize import QuantizeOptions, quantize_export

        pool, guard = default_pools(out, None, None)
        steps, guidance = default_sampling(out)
        report = quantize_export(out, args.out, QuantizeOptions(prompts=pool, guard_prompts=guard, steps=steps,
                                                                guidance=guidance))
        kinds = [e["precision"] for e in report["experts"]]
        print(f"quantized into {args.out}: {kinds.count('int8')} int8, {kinds.count('int8_weights')} weights-only, "
              f"{kinds.count('fp32')} fp32 experts (fp32 reference export: {out})")
    print(f"exported {len(manifest.experts)} experts to {args.out} ({manifest.precision})")
    for e in manifest.experts:
        print(f"  expert {e.id:2d}: {e.macs / 1e6:8.1f} MMACs ({e.macs_fraction:.2f} of dense), "
              f"{e.params / 1e6:.2f} M params, share {e.share:.2f}")
    return 0
