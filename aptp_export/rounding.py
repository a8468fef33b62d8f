"""Round an expert's kept channels up to hardware-friendly multiples.

    from aptp_export.rounding import round_units, pad_expert
    rounded = round_units(space, arch, 16)           # more units kept, never fewer
    padded = pad_expert(space, expert, arch, rounded) # same function as `expert`, rounded channel counts

Why: onnxruntime's CPU provider runs a convolution in its blocked NCHWc layout (MLAS, block = 16
channels with AVX-512, 8 with AVX2) only when the input channel count is a multiple of the block;
otherwise it falls back to im2col + GEMM and reorders the activations around it. A pruned ResBlock
keeps `k x unit_channels` channels (unit = one GroupNorm group, 10 channels in SD's 320-wide
level), which is rarely a multiple of 16. GEMM kernels (attention and feed-forward projections)
likewise prefer multiples of their register tile.

`round_units` rounds the kept channel count of every width group (`k x unit_channels`) up to the
smallest multiple of `multiple` that the group can reach by keeping more of its own units: the
pruned units with the lowest indices are added back. A group that keeps nothing stays empty (zero
channels is a multiple), a group that cannot reach a multiple without exceeding its units is left
as it is, and width groups inside a block whose depth unit is off are left alone (the block is gone).
Depth units never change. MACs are whatever `space.macs(rounded, ...)` says (always >= the original).

`pad_expert` turns an already materialised (e.g. fine-tuned) expert for `arch` into one for the rounded
vector that computes exactly the same function: the added units get all-zero weights, so their
contribution to the layer that reads them (`conv2` input channels, `to_out[0]` input features,
`ff.net[2]` input features) is exactly zero whatever their GroupNorm / softmax / GEGLU produce.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from engines.errors import UserError
from engines.validation import is_int

from .materialize import apply_arch_, pruning_template
from .unet_configs import build_unet


def _check_multiple(multiple) -> int:
    if not is_int(multiple) or int(multiple) < 1:
        raise UserError(f"the rounding multiple must be a positive integer number of channels, got {multiple!r}")
    return int(multiple)


def _binary(space, arch) -> np.ndarray:
    a = space.as_tensor(arch)
    if a.ndim != 1:
        raise UserError(f"round_units takes one architecture vector [D], got shape {list(a.shape)}")
    return a.detach().cpu().numpy() > 0.5


def round_units(space, arch, multiple: int):
    """`arch` [D] with the kept channels of every width group rounded up to a multiple of `multiple`.

    Returns a float32 torch tensor of 0/1 [D]; `multiple=1` returns the binarised input. See the module doc
    for the rules (never drops a unit; empty groups, groups in removed blocks and unreachable multiples are
    left unchanged)."""
    m = _check_multiple(multiple)
    keep = _binary(space, arch)
    out = keep.copy()
    if m > 1:
        for g in space.width_groups:
            if g.removed(keep):
                continue
            k_mask = keep[g.start:g.stop]
            k = int(k_mask.sum())
            if k == 0 or (k * g.unit_channels) % m == 0:
                continue
            target = next((n for n in range(k + 1, g.num_units + 1) if (n * g.unit_channels) % m == 0), None)
            if target is None:
                continue
            missing = np.nonzero(~k_mask)[0][: target - k]
            out[g.start + missing] = True
    return torch.from_numpy(out.astype(np.float32))


def rounding_summary(space, arch, rounded, multiple: int) -> dict:
    """How many width groups were rounded, could not be rounded, and the units added."""
    m = _check_multiple(multiple)
    a, r = _binary(space, arch), _binary(space, rounded)
    changed = unreachable = 0
    for g in space.width_groups:
        if g.removed(a):
            continue
        k, kr = int(a[g.start:g.stop].sum()), int(r[g.start:g.stop].sum())
        changed += kr != k
        unreachable += (kr * g.unit_channels) % m != 0
    return {"multiple": m, "groups_rounded": changed, "groups_not_multiple": unreachable,
            "units_added": int((r & ~a).sum())}


def pad_expert(space, expert: nn.Module, arch, rounded) -> nn.Module:
    """The expert for `rounded` (a superset of `arch`, e.g. from round_units) that computes exactly what
    `expert` (materialised for `arch`) computes: its weights scattered into the larger layers, zeros for
    the added units. `expert` is untouched."""

    a, r = _binary(space, arch), _binary(space, rounded)
    if (a & ~r).any():
        raise UserError("pad_expert: the rounded vector drops units the expert keeps; it must be a superset")
    if any(a[g.start] != r[g.start] for g in space.depth_groups):
        raise UserError("pad_expert: rounding changes width only; the depth units differ")
    ref = next(iter(expert.parameters()))
    padded = build_unet(space.unet_config, device="meta")
    apply_arch_(space, padded, r)
    padded = padded.to_empty(device=ref.device).to(ref.dtype)
    src = dict(expert.named_parameters())
    src.update(dict(expert.named_buffers()))
    dst = dict(padded.named_parameters())
    dst.update(dict(padded.named_buffers()))
    if set(src) != set(dst):
        diff = sorted(set(src) ^ set(dst))
        raise UserError(f"pad_expert: the expert does not have the structure of `arch` (differs in {diff[:3]})")

    # dense index positions of every coupled layer of a rounded group: where the expert's channels go
    template = pruning_template(space)
    positions: dict[str, np.ndarray] = {}
    sizes: dict[str, tuple[int, int]] = {}
    for g in space.width_groups:
        if g.removed(a):
            continue
        ka, kr = a[g.start:g.stop], r[g.start:g.stop]
        if (ka == kr).all():
            continue
        uc = g.unit_channels
        ch_a = (np.nonzero(ka)[0][:, None] * uc + np.arange(uc)).ravel()
        ch_r = (np.nonzero(kr)[0][:, None] * uc + np.arange(uc)).ravel()
        for item in template[g.name]:
            pos_r = np.unique(item.idxs[np.isin(item.roots, ch_r)])
            pos_a = np.unique(item.idxs[np.isin(item.roots, ch_a)])
            positions[item.module] = np.searchsorted(pos_r, pos_a)
            sizes[item.module] = (len(pos_a), len(pos_r))

    with torch.no_grad():
        for name, t in dst.items():
            s = src[name]
            if s.shape == t.shape:
                t.copy_(s)
                continue
            module = name.rpartition(".")[0]
            dims = [d for d in range(t.ndim) if s.shape[d] != t.shape[d]] if s.ndim == t.ndim else []
            if module not in positions or len(dims) != 1 or \
                    (s.shape[dims[0]], t.shape[dims[0]]) != sizes[module]:
                raise RuntimeError(f"pad_expert: cannot place {name} {tuple(s.shape)} into {tuple(t.shape)}")
            t.zero_()
            t.index_copy_(dims[0], torch.as_tensor(positions[module], device=t.device), s)
    for n, p in padded.named_parameters():
        p.requires_grad_(src[n].requires_grad)
    return padded.train(expert.training)
