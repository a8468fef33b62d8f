"""Print the table of prunable units of a UNet, a PixArt or an SD3 transformer: for every unit group its vector slice, kind (ResBlock width,
attention heads, feed-forward width, ResBlock / transformer depth), units, channels per unit, the depth unit
containing it and the share of the dense MACs it controls. Reads only the config (no weights are loaded)."""

from __future__ import annotations

import json
from pathlib import Path

from engines.errors import UserError


def add_arguments(parser) -> None:
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--unet", metavar="DIR",
                     help="a diffusers UNet, PixArt or SD3 transformer directory (config.json), or a pipeline "
                          "directory containing unet/ or transformer/")
    src.add_argument("--toy", action="store_true", help="the built-in toy teacher UNet (default)")
    src.add_argument("--sd21", action="store_true", help="the Stable Diffusion 2.1 UNet architecture")
    src.add_argument("--sd15", action="store_true", help="the Stable Diffusion 1.5 UNet architecture")
    src.add_argument("--sdxl", action="store_true", help="the Stable Diffusion XL base 1.0 UNet architecture")
    src.add_argument("--pixart", action="store_true",
                     help="the PixArt-Sigma XL-2 1024 transformer architecture (DiT; text length 300)")
    src.add_argument("--sd3", action="store_true",
                     help="the Stable Diffusion 3 medium transformer architecture (MMDiT; text length 333)")
    src.add_argument("--export", metavar="DIR",
                     help="an export directory instead: its experts (MACs, precision, share) and sampling defaults")
    parser.add_argument("--depth-blocks", choices=("last", "all", "none"), default="last",
                        help="which blocks get a depth unit (default: last = last ResBlock and transformer of "
                             "each down/up block)")
    parser.add_argument("--ff-groups", type=int, default=32, help="feed-forward width units per FFN (default 32)")
    parser.add_argument("--height", type=int, default=None, help="latent height for MACs (default: sample_size)")
    parser.add_argument("--width", type=int, default=None, help="latent width for MACs (default: height)")
    parser.add_argument("--text-len", type=int, default=None,
                        help="text tokens for MACs (default: 16 for the toy model, 300 for PixArt, 333 for SD3, else 77)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")


def _read_config(directory: str) -> dict:
    d = Path(directory)
    for cand in (d / "config.json", d / "unet" / "config.json", d / "transformer" / "config.json"):
        if cand.is_file():
            try:
                cfg = json.loads(cand.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise UserError(f"{cand}: cannot read the model config: {e}") from None
            if not isinstance(cfg, dict):
                raise UserError(f"{cand}: not a model config")
            from aptp_export.unet_configs import backbone_of

            try:
                backbone_of(cfg)  # the supported classes, PixArt's legacy name included
            except UserError:
                raise UserError(f"{cand}: a {cfg.get('_class_name')}, expected UNet2DConditionModel, "
                                "PixArtTransformer2DModel or SD3Transformer2DModel") from None
            return cfg
    raise UserError(f"{d}: no config.json, unet/config.json or transformer/config.json")


def _inspect_export(path: str, as_json: bool) -> int:
    from engines.errors import EngineError
    from engines.manifest import read_manifest

    try:
        m = read_manifest(path)
    except EngineError as e:
        raise UserError(str(e)) from None
    d = m.sampling_defaults
    info = {"base_model": m.base_model, "family": m.family, "format_version": m.format_version,
            "sample_size": list(m.sample_size), "dense_gmacs": m.dense_macs / 1e9,
            "sampling": {"steps": d.steps, "guidance_scale": d.guidance_scale, "scheduler": m.scheduler.name,
                         "recorded": m.sampling is not None},
            "experts": [{"id": e.id, "macs_fraction": e.macs_fraction, "share": e.share, "precision": e.precision,
                         "params": e.params} for e in m.experts], "dense": m.dense is not None}
    if as_json:
        print(json.dumps(info, indent=2))
        return 0
    rec = "" if m.sampling is not None else " (not recorded: the defaults)"
    print(f"{path}: {m.base_model} ({m.family}), {len(m.experts)} experts, dense {info['dense_gmacs']:.3f} GMACs at "
          f"{m.sample_size[0]}x{m.sample_size[1]}, manifest format {m.format_version}")
    print(f"sampling: {d.steps} steps, guidance {d.guidance_scale}, {m.scheduler.name}{rec}")
    print("expert  MACs    share  precision  params")
    for e in info["experts"]:
        print(f"{e['id']:6d}  {e['macs_fraction']:.3f}  {e['share']:.3f}  {e['precision']:9s}  {e['params'] / 1e6:.2f} M")
    return 0


def run(args) -> int:
    if args.export:
        return _inspect_export(args.export, args.json)
    from aptp_export.arch_space import ArchSpace  # heavy (torch): only when the verb runs
    from aptp_export.unet_configs import (PIXART_SIGMA_CONFIG, SD3_MEDIUM_CONFIG, SD3_TEXT_LEN, SD15_UNET_CONFIG,
                                          SD21_UNET_CONFIG, SDXL_UNET_CONFIG, backbone_of)
    from training.toy.model import TEXT_LEN, UNET_CONFIG

    text_len = args.text_len
    if args.unet:
        cfg = _read_config(args.unet)
    elif args.sd21 or args.sd15 or args.sdxl:
        cfg = SD21_UNET_CONFIG if args.sd21 else SD15_UNET_CONFIG if args.sd15 else SDXL_UNET_CONFIG
    elif args.pixart or args.sd3:
        cfg = PIXART_SIGMA_CONFIG if args.pixart else SD3_MEDIUM_CONFIG
    else:
        cfg = UNET_CONFIG
        text_len = TEXT_LEN if text_len is None else text_len
    if text_len is None:
        text_len = {"pixart": 300, "sd3": SD3_TEXT_LEN}.get(backbone_of(cfg), 77)
    if text_len < 1 or (args.height is not None and args.height < 1) or (args.width is not None and args.width < 1):
        raise UserError("--height, --width and --text-len must be positive")
    space = ArchSpace.from_config(cfg, depth_blocks=args.depth_blocks, ff_groups=args.ff_groups)
    height = args.height
    width = args.width if args.width is not None else height
    if args.json:
        print(json.dumps({"num_units": space.num_units, "groups": space.table(height, width, text_len)}, indent=1))
    else:
        print(space.format_table(height, width, text_len))
    return 0
