"""Materialise experts of the Stable Diffusion 2.1 / 1.5 / XL UNet (random weights) on CPU: time and peak memory.

    python -m benchmarks.materialize_sd21 [--family sd21|sd15|sdxl] [--keep 0.9 0.78 0.66 0.5] [--dtype float32]
        [--in-place] [--check] [--io DIR] [--out results.json]

`--family sdxl` is the stabilityai/stable-diffusion-xl-base-1.0 UNet (2.57 B parameters: 10.3 GB in float32,
5.1 GB in bfloat16), MACs at its native 128x128 latent (1024 px). `space.materialize` keeps the dense UNet and
returns a copy, so its peak is dense + expert; `--in-place` instead prunes a freshly built dense UNet in place
(`apply_arch_`, what `load_expert` does on the meta device), whose peak is the dense UNet plus the largest
pruned layer - the way to materialise SDXL experts within a small memory budget.

Prints: UNet build time (meta construction + random weights), ArchSpace build time, the one-off torch-pruning
DependencyGraph plan time (traced on a meta-device copy, reused by every expert), per-expert materialise time,
parameters and MACs (the family's native latent: 96x96, 64x64, 128x128; 77 tokens), and the peak RSS of the process. `--check` also runs the gated
dense UNet and the 0.5 expert on a small random input (32x32 latent, 8 tokens) and prints their relative error;
`--io DIR` saves and reloads the last expert and times both.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from aptp_export import ArchSpace, load_expert, save_expert
from aptp_export.materialize import apply_arch_, pruning_template
from aptp_export.unet_configs import (
    SD15_UNET_CONFIG,
    SD21_UNET_CONFIG,
    SDXL_UNET_CONFIG,
    added_cond_kwargs,
    build_unet,
    fill_position_tables,
)
from engines.fileio import write_json


def rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1e6
    return float("nan")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


# family -> (UNet config, native latent side)
FAMILIES = {"sd21": (SD21_UNET_CONFIG, 96), "sd15": (SD15_UNET_CONFIG, 64), "sdxl": (SDXL_UNET_CONFIG, 128)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def random_sd21(seed: int = 0):
    """The SD 2.1 UNet with random weights: built on meta, allocated empty, filled (fast, no default init)."""
    return random_unet(SD21_UNET_CONFIG, seed)


def random_unet(config: dict, seed: int = 0, dtype=torch.float32):
    """A UNet of `config` with random weights in `dtype`: built on meta, allocated empty, filled in place."""

    unet = build_unet(config, device="meta").to(dtype).to_empty(device="cpu")  # never allocates float32
    g = torch.Generator().manual_seed(seed)
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    with torch.no_grad():
        for mod in unet.modules():
            for name, p in mod.named_parameters(recurse=False):
                p.normal_(generator=g)
                if isinstance(mod, norms):
                    p.mul_(0.2).add_(1.0 if name == "weight" else 0.0)
                elif name == "bias":
                    p.mul_(0.02)
                else:
                    p.mul_((p[0].numel() if p.ndim > 1 else p.numel()) ** -0.5)
    fill_position_tables(unet, "cpu", only_missing=False)  # DiTs: to_empty left their position tables unset
    return unet.eval()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--family", choices=sorted(FAMILIES), default="sd21", help="UNet architecture (random weights)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weight dtype of the dense UNet")
    ap.add_argument("--in-place", action="store_true",
                    help="prune a freshly built dense UNet in place per expert (peak: dense + one layer)")
    ap.add_argument("--keep", type=float, nargs="+", default=[0.9, 0.78, 0.66, 0.5],
                    help="keep ratio of each random expert (each unit kept with this probability)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true", help="masked vs materialised on a small input (slow-ish)")
    ap.add_argument("--io", metavar="DIR", help="save and reload the last expert in DIR, timing both")
    ap.add_argument("--out", help="write the figures as JSON")
    args = ap.parse_args(argv)

    config, side = FAMILIES[args.family]
    dtype = DTYPES[args.dtype]
    res: dict = {"threads": torch.get_num_threads(), "family": args.family, "dtype": args.dtype,
                 "in_place": args.in_place, "latent": side}
    t = time.perf_counter()
    unet = random_unet(config, args.seed, dtype)
    res["build_unet_s"] = time.perf_counter() - t
    res["rss_base_gb"] = rss_gb()
    print(f"{args.family} UNet (random weights, {args.dtype}): {sum(p.numel() for p in unet.parameters()) / 1e6:.1f} M "
          f"params, built in {res['build_unet_s']:.1f} s, RSS {res['rss_base_gb']:.2f} GB")

    t = time.perf_counter()
    space = ArchSpace.from_unet(unet)
    res["space_s"] = time.perf_counter() - t
    dense = space.dense_macs(side, side, 77)
    res["dense_gmacs"] = dense / 1e9
    print(f"{space}  built in {res['space_s']:.2f} s; dense {dense / 1e9:.2f} GMACs ({side}x{side}, 77 tokens)")

    t = time.perf_counter()
    pruning_template(space)
    res["dependency_graph_s"] = time.perf_counter() - t
    print(f"torch-pruning DependencyGraph plan (meta trace + {len(space.width_groups)} groups): "
          f"{res['dependency_graph_s']:.2f} s (once per UNet structure)")

    res["experts"] = []
    expert = arch = None
    for i, keep in enumerate(args.keep):
        arch = space.sample(torch.Generator().manual_seed(args.seed + i), keep=keep)
        del expert
        if args.in_place and i > 0:
            del unet
            unet = random_unet(config, args.seed, dtype)
        t = time.perf_counter()
        if args.in_place:
            expert = apply_arch_(space, unet, arch.numpy() > 0.5)
        else:
            expert = space.materialize(unet, arch)
        dt = time.perf_counter() - t
        params = sum(p.numel() for p in expert.parameters())
        macs = space.macs(arch.tolist(), side, side, 77)
        row = {"keep": keep, "materialize_s": dt, "params_m": params / 1e6, "gmacs": macs / 1e9,
               "macs_ratio": macs / dense, "rss_gb": rss_gb()}
        res["experts"].append(row)
        print(f"expert keep={keep:.2f}: materialised in {dt:.2f} s, {params / 1e6:.1f} M params, "
              f"{macs / 1e9:.1f} GMACs ({100 * macs / dense:.1f} %), RSS {row['rss_gb']:.2f} GB")

    if args.check:
        g = torch.Generator().manual_seed(1)
        if args.in_place:
            raise SystemExit("--check needs the dense UNet: leave out --in-place")
        x = torch.randn(1, 4, 32, 32, generator=g).to(dtype)
        ctx = torch.randn(1, 8, config["cross_attention_dim"], generator=g).to(dtype)
        ts = torch.tensor([500])
        added = added_cond_kwargs(config, 1, generator=g)
        kw = {} if added is None else {"added_cond_kwargs": {k: v.to(dtype) for k, v in added.items()}}
        t = time.perf_counter()
        with torch.no_grad():
            with space.gated(unet, arch):
                y_masked = unet(x, ts, ctx, **kw).sample
            y_pruned = expert(x, ts, ctx, **kw).sample
        res["check_rel_err"] = float((y_masked - y_pruned).norm() / y_masked.norm())
        print(f"masked vs materialised (keep={args.keep[-1]}, 32x32 latent, 8 tokens): relative error "
              f"{res['check_rel_err']:.2e} ({time.perf_counter() - t:.1f} s)")

    if args.io:
        t = time.perf_counter()
        path = save_expert(args.io, space, arch, expert)
        res["save_s"] = time.perf_counter() - t
        del expert
        t = time.perf_counter()
        loaded = load_expert(path)
        res["load_s"] = time.perf_counter() - t
        print(f"save_expert {res['save_s']:.1f} s, load_expert {res['load_s']:.1f} s "
              f"({sum(p.numel() for p in loaded.parameters()) / 1e6:.1f} M params)")

    res["peak_rss_gb"] = peak_rss_gb()
    print(f"peak RSS {res['peak_rss_gb']:.2f} GB")
    if args.out:

        write_json(args.out, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
