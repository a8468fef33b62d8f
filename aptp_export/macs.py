"""Analytic multiply-accumulate counts (MACs) of a UNet sub-network, differentiable in soft gates.

The MACs of an architecture vector `a` are a sum of *terms*, one per matrix product of the network:

    MACs(a) = sum_t  c_t(H, W, L) * kept_{g_t}(a) * d_{e_t}(a)

- `c_t` is the term's constant: kernel area x the fixed channel count x a token count that depends on the
  latent size H x W (at the term's resolution) and the text length L;
- `kept_g(a) = unit_channels_g * sum_{u in g} a_u` is the number of channels a width group keeps (1 if the
  term has no width group): a convolution or linear layer is linear in its kept input or output channels,
  an attention product is linear in the kept heads;
- `d_e(a)` is the depth gate of the block containing the term (1 if none): a removed block removes all MACs of
  its residual branch, including those of its width units. A depth unit nested in another (an SDXL
  transformer layer in a depth-prunable transformer) is multiplied by its enclosing unit's gate too.

Every term has at most one width group because the pruned dimensions are block-internal (`conv1`->`conv2`,
q/k/v->`to_out`, GEGLU->`ff.net[2]`) and never meet each other in one product. The formula is therefore exact
for binary vectors: it equals the MACs of the physically pruned model (see docs/macs.md for the validation
against torch's FlopCounterMode), and for soft gates it is a smooth, differentiable interpolation.

Counted: convolutions (conv_in, ResBlock convs and 1x1 shortcuts, down/up-sampler convs, conv_out, 1x1
proj_in/proj_out), linear layers (time-embedding MLP, SDXL's addition-embedding MLP, time_emb_proj, proj_in/proj_out, to_q/k/v/out, GEGLU
projection, ff output) and both attention products per kept head (QK^T and AV; self-attention N*N*d each,
cross-attention N*L*d each), at batch 1. Not counted (small and not matrix products): GroupNorm, LayerNorm,
SiLU/GELU, softmax, the attention scale, residual adds, bias adds, up-sampling interpolation, the sinusoidal
timestep features.

Stable Diffusion 2.1 at a 96x96 latent, 77 tokens: 1074.55 GMACs = convolutions 470.66 + linear layers 289.83
+ attention products 314.07. The APTP paper's 1384.2 G for the same model is within 0.32 % of counting the
attention products twice (1388.62 G, FLOP-style for attention only); aptp always reports true MACs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

TOKEN_KINDS = ("one", "text", "hw", "hw2", "hw_text", "text2")


@dataclass(frozen=True)
class MacTerm:
    """One matrix product: `coef * tokens(kind, slot) * kept(group) * depth_gate(depth)` MACs."""

    coef: float  # kernel area x fixed channels (x 2 for two attention products / GEGLU's two halves)
    tokens: str  # "one" (per sample), "text" (L), "hw" (N = h*w at slot), "hw2" (N*N), "hw_text" (N*L), "text2" (L*L)
    slot: int  # resolution slot (index into the resolution program); -1 for "one"/"text"
    group: int  # index of the width group (in ArchSpace.groups) whose kept channels multiply; -1 if none
    depth: int  # index of the depth group gating this term; -1 if none
    module: str  # the module this product belongs to (for tables and tests)


# Resolution program: slot i is computed from earlier slots.
#   ("input",)                      the latent H x W
#   ("down", parent, extra, k, s)   (h + extra - k) // s + 1 per side (a strided conv / pool)
#   ("alias", other)                same as another slot (an up-sampler restores the skip's size)
#   ("up2x", parent)                2h x 2w (an up-sampler with no skip left to match)
def slot_sizes(program: list[tuple], height: int, width: int) -> list[tuple[int, int]]:
    """(h, w) of every resolution slot for a latent of `height` x `width`."""
    sizes: list[tuple[int, int]] = []
    for spec in program:
        if spec[0] == "input":
            sizes.append((height, width))
        elif spec[0] == "down":
            _, parent, extra, k, s = spec
            h, w = sizes[parent]
            sizes.append(((h + extra - k) // s + 1, (w + extra - k) // s + 1))
        elif spec[0] == "alias":
            sizes.append(sizes[spec[1]])
        elif spec[0] == "up2x":
            h, w = sizes[spec[1]]
            sizes.append((2 * h, 2 * w))
        else:  # pragma: no cover - programs are built by arch_space only
            raise ValueError(f"unknown resolution op {spec[0]!r}")
    return sizes


class MacModel:
    """Evaluates the MAC terms of a space for binary or soft architecture vectors.

    `group_slices[g] = (start, stop, unit_channels)` for every group of the space (width and depth groups; a
    depth group has one unit of "1 channel", so its kept value is its gate). `parents[g]`: the group index of
    the depth unit enclosing depth group g (-1 if none); one level of nesting is supported.
    """

    def __init__(self, terms: list[MacTerm], program: list[tuple], group_slices: list[tuple[int, int, int]],
                 num_units: int, parents: list[int] | None = None):
        self.terms = list(terms)
        self.program = list(program)
        self.num_units = num_units
        g = len(group_slices)
        # [D, G+1]: arch @ W gives kept channels per group; the extra last column is the constant 1 so that
        # index -1 ("no group") picks it.
        w = np.zeros((num_units, g + 1), dtype=np.float64)
        for gi, (start, stop, uc) in enumerate(group_slices):
            w[start:stop, gi] = uc
        self._w = w
        self._group_idx = np.array([t.group for t in self.terms], dtype=np.int64)
        self._depth_idx = np.array([t.depth for t in self.terms], dtype=np.int64)
        par = np.full(g + 1, -1, dtype=np.int64)  # last entry: "no depth group" has no parent
        if parents is not None:
            par[:g] = parents
            if (par[par[par >= 0]] >= 0).any():
                raise ValueError("MacModel: depth units nested more than one level deep")
        self._outer_idx = par[self._depth_idx]
        self._coef_cache: dict[tuple[int, int, int], np.ndarray] = {}
        self._torch_cache: dict = {}

    def coefficients(self, height: int, width: int, text_len: int) -> np.ndarray:
        """c_t for every term (float64 [T])."""
        key = (int(height), int(width), int(text_len))
        if key not in self._coef_cache:
            sizes = slot_sizes(self.program, key[0], key[1])
            n = np.array([sizes[t.slot][0] * sizes[t.slot][1] if t.slot >= 0 else 0 for t in self.terms],
                         dtype=np.float64)
            length = float(key[2])
            tok = {
                "one": np.ones_like(n),
                "text": np.full_like(n, length),
                "hw": n,
                "hw2": n * n,
                "hw_text": n * length,
                "text2": np.full_like(n, length * length),
            }
            kinds = np.array([t.tokens for t in self.terms])
            factor = np.zeros_like(n)
            for kind, values in tok.items():
                factor = np.where(kinds == kind, values, factor)
            self._coef_cache[key] = np.array([t.coef for t in self.terms], dtype=np.float64) * factor
        return self._coef_cache[key]

    def per_term(self, arch: np.ndarray, height: int, width: int, text_len: int) -> np.ndarray:
        """MACs of every term for one binary/soft vector [D] (float64 numpy [T])."""
        kept = np.concatenate([arch.astype(np.float64) @ self._w[:, :-1], [1.0]])
        return (self.coefficients(height, width, text_len) * kept[self._group_idx] * kept[self._depth_idx]
                * kept[self._outer_idx])

    def numpy(self, arch: np.ndarray, height: int, width: int, text_len: int) -> np.ndarray:
        """MACs for arch [D] or [B, D] (numpy, float64) -> [] or [B]."""
        a = np.atleast_2d(arch).astype(np.float64)
        kept = a @ self._w
        kept[:, -1] = 1.0
        terms = (self.coefficients(height, width, text_len) * kept[:, self._group_idx] * kept[:, self._depth_idx]
                 * kept[:, self._outer_idx])
        out = terms.sum(-1)
        return out if np.ndim(arch) == 2 else out[0]

    def torch(self, arch, height: int, width: int, text_len: int):
        """MACs for a torch tensor arch [D] or [B, D] -> tensor [] or [B], differentiable w.r.t. arch."""

        key = (arch.device, int(height), int(width), int(text_len))
        if key not in self._torch_cache:
            self._torch_cache[key] = (
                torch.as_tensor(self._w, dtype=torch.float64, device=arch.device),
                torch.as_tensor(self.coefficients(height, width, text_len), device=arch.device),
                torch.as_tensor(self._group_idx, device=arch.device),
                torch.as_tensor(self._depth_idx, device=arch.device),
                torch.as_tensor(self._outer_idx, device=arch.device),
            )
        w, coef, gidx, didx, oidx = self._torch_cache[key]
        a = arch.to(torch.float64)
        a2 = a.unsqueeze(0) if a.ndim == 1 else a
        kept = a2 @ w[:, :-1]
        kept = torch.cat([kept, torch.ones_like(kept[:, :1])], dim=1)
        out = (coef * kept[:, gidx] * kept[:, didx] * kept[:, oidx]).sum(-1)
        out = out.to(arch.dtype if arch.is_floating_point() else torch.float32)
        return out[0] if a.ndim == 1 else out
