"""The architecture space of a diffusers `UNet2DConditionModel`, `PixArtTransformer2DModel` (a DiT) or
`SD3Transformer2DModel` (an MMDiT): its prunable units, their order and their MACs.

    space = ArchSpace.from_unet(unet)                  # depth_blocks="last", ff_groups=32
    space.num_units                                    # D
    a = space.sample(generator=g, keep=0.6)            # float32 [D] of 0/1
    space.macs(a, height=32, width=32, text_len=77)    # analytic MACs at batch 1
    with space.gated(unet, a): y = unet(x, t, ctx).sample   # masked dense forward (see gates.py)
    expert = space.materialize(unet, a)                # physically pruned copy (see materialize.py)

Units (see docs/method.md §1 for why the gates sit where they do):

| kind                | one unit                                   | gate position (exact equivalence)        |
|---------------------|--------------------------------------------|------------------------------------------|
| `resnet_width`      | one GroupNorm group of a ResBlock's `norm2` | input of `conv2` (after norm2 + SiLU)    |
| `attn_heads`        | one head of `attn1` (self) or `attn2` (cross) | input of `to_out[0]` (the head's output) |
| `ff_width`          | `inner/ff_groups` GEGLU channels            | input of `ff.net[2]` (after the product) |
| `resnet_depth`      | a ResBlock's residual branch               | output becomes `shortcut(x)/scale`       |
| `transformer_depth` | a whole `Transformer2DModel`               | output becomes its input                 |
| `layer_depth`       | one `BasicTransformerBlock` of a transformer | output becomes its input               |

Order of the vector (stable, documented): all width units first, then all depth units. Width groups follow
the forward order of the UNet (down blocks, mid block, up blocks; inside a block resnet j, then transformer j;
inside a transformer, for each BasicTransformerBlock: attn1, attn2, ff); units inside a group follow channel
order. Depth groups follow the same forward order.

Depth-prunable blocks (`depth_blocks`): "last" (the reference's choice: the last ResBlock and the last
transformer of every down and up block; the mid block is never depth-pruned), "all" (every ResBlock and
transformer, mid block included) or "none".
Depth-prunable transformer layers (`layer_depth`): "multi" (every BasicTransformerBlock of a transformer
that holds more than one, mid block included: SDXL's 2- and 10-layer transformers; SD 1.5 / 2.1 have none),
"all" (every BasicTransformerBlock) or "none". A layer unit inside a depth-prunable transformer is nested:
its `depth_unit` is the transformer's unit, and the layer's width groups name both (`depth_units`).

Supported UNets: `UNet2DConditionModel` with down blocks DownBlock2D / CrossAttnDownBlock2D, up blocks
UpBlock2D / CrossAttnUpBlock2D, mid block UNetMidBlock2DCrossAttn (or none), any number of levels, layers per
block, transformer layers per block, heads, head size, GroupNorm groups, cross-attention width, linear or
1x1-conv projections, and SDXL's addition embedding (`addition_embed_type="text_time"`: `add_time_proj` and
`add_embedding`, kept dense and counted in the MACs; the forward then needs
`added_cond_kwargs={"text_embeds": [B, D_pool], "time_ids": [B, 6]}`). SD 1.5, SD 2.1 and SDXL UNets are
supported. Rejected with a UserError naming the feature: class / other addition / encoder-hidden
embeddings, time-conditioning projections, scale-shift ResBlocks, up/down-sampling ResBlocks, dual or
only-cross attention, gated (GLIGEN) attention, feed-forwards other than GEGLU, fused QKV projections and
attention processors that do not apply `to_out[0]` to the merged heads (IP-Adapter, custom processors).

PixArt-alpha / -Sigma transformers (`PixArtTransformer2DModel`, walked by dit_walk.py): the same three width
kinds per `BasicTransformerBlock` (`attn_heads` of attn1 and attn2, `ff_width` of a GELU-tanh MLP, mult 1
instead of GEGLU's 2) and a `layer_depth` unit per block ("multi"/"all": every block; "none"). The patch
embedding, the adaLN-single timestep embedder, the caption projection and the final layer are kept dense and
counted. Rejected: `use_additional_conditions` (PixArt-alpha 1024's resolution / aspect embedders), a
`PatchEmbed` with a layer norm or a cropped position table, and blocks whose norm is not "ada_norm_single".

SD3 / SD3.5 transformers (`SD3Transformer2DModel`, dit_walk.walk_sd3): `joint_heads` (one head of the joint
attention, in the image and the text stream), `attn_heads` of SD3.5's dual self-attention, `ff_width` of the
image and the text MLP, and a `joint_depth` unit per block (both streams residual). Per-head RMS query/key norms
are accepted.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from diffusers.models.activations import GEGLU, GELU
from diffusers.models.attention import BasicTransformerBlock, FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.embeddings import TimestepEmbedding
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.upsampling import Upsample2D

from engines.errors import UserError

from .gates import gate_hooks
from .macs import MacModel, MacTerm
from .materialize import materialize
from .dit_walk import walk_pixart, walk_sd3
from .unet_configs import backbone_class, backbone_of, build_unet, clean_config, config_key, is_unet, unwrap_unet
from .unit_kinds import DEPTH_KINDS

DEPTH_BLOCK_CHOICES = ("last", "all", "none")
LAYER_DEPTH_CHOICES = ("multi", "all", "none")
# Space descriptions written before `layer_depth` existed had no layer units: read them so.
_LEGACY_LAYER_DEPTH = "none"
FORMAT = "aptp-arch-space"
FORMAT_VERSION = 1

# Processors that compute the heads and then call attn.to_out[0] on [B, N, heads*head_dim]: the head gate
# (a pre-hook on to_out[0]) and head removal are exact for all of them.
SUPPORTED_PROCESSORS = frozenset({
    "AttnProcessor", "AttnProcessor2_0", "SlicedAttnProcessor", "XFormersAttnProcessor", "AttnProcessorNPU",
    "JointAttnProcessor2_0",  # SD3: q/k/v of both streams split into heads, to_out[0] / to_add_out on the merge
})

# Tolerance on [0, 1] so that straight-through gates (hard + s - s.detach()) that round to 1 + 1 ulp pass.
_RANGE_TOL = 1e-5


@dataclass(frozen=True)
class UnitGroup:
    """A contiguous slice `arch[start:stop]` of units of one kind in one module.

    name: module path in the UNet (the ResBlock, the Attention, the FeedForward or the Transformer2DModel).
    unit_channels: channels per unit (GroupNorm group size, head size, FF channels per group; 1 for depth).
    depth_unit: vector index of the innermost depth unit whose block contains this group, or None (for a
        layer unit inside a depth-prunable transformer: the transformer's unit).
    depth_units: every enclosing depth unit, outermost first (ends with depth_unit; empty if None). The
        group is removed when any of them is off.
    """

    name: str
    kind: str
    start: int
    stop: int
    unit_channels: int
    depth_unit: int | None = None
    depth_units: tuple[int, ...] = ()

    def removed(self, keep) -> bool:
        """Whether an enclosing depth unit is off in the binary vector `keep` ([D] bool / 0-1)."""
        return any(not keep[u] for u in self.depth_units)

    @property
    def num_units(self) -> int:
        return self.stop - self.start

    @property
    def is_depth(self) -> bool:
        return self.kind in DEPTH_KINDS


class ArchSpace:
    """Prunable units of one UNet structure (built from its config; holds no weights)."""

    def __init__(self, unet_config: dict, depth_blocks: str = "last", ff_groups: int = 32,
                 layer_depth: str = "multi", _model=None):
        if depth_blocks not in DEPTH_BLOCK_CHOICES:
            raise UserError(f"depth_blocks must be one of {', '.join(DEPTH_BLOCK_CHOICES)}, got {depth_blocks!r}")
        if layer_depth not in LAYER_DEPTH_CHOICES:
            raise UserError(f"layer_depth must be one of {', '.join(LAYER_DEPTH_CHOICES)}, got {layer_depth!r}")
        if not isinstance(ff_groups, int) or isinstance(ff_groups, bool) or ff_groups < 1:
            raise UserError(f"ff_groups must be a positive integer, got {ff_groups!r}")
        if not isinstance(unet_config, dict) and not hasattr(unet_config, "items"):
            raise UserError(f"a UNet config must be a dict, got {type(unet_config).__name__}")
        model = _model if _model is not None else _build_structure(clean_config(unet_config))
        # The full config (diffusers' defaults filled in), so that a space built from a partial config
        # recognises every UNet built from it.
        self.unet_config = clean_config(model.config)
        self.depth_blocks = depth_blocks
        self.ff_groups = ff_groups
        self.layer_depth = layer_depth
        self.config_key = config_key(self.unet_config)
        self.dense_params = int(sum(p.numel() for p in model.parameters()))
        self._ref_shapes = _shapes(model)
        groups, terms, program, parents = _Discovery(model, self.unet_config, depth_blocks, ff_groups,
                                                     layer_depth).run()
        self.groups: list[UnitGroup] = groups
        self.num_units: int = groups[-1].stop if groups else 0
        self._mac_model = MacModel(terms, program, [(g.start, g.stop, g.unit_channels) for g in groups],
                                   self.num_units, parents)

    # ---------------------------------------------------------------- construction and serialisation
    @classmethod
    def from_unet(cls, unet, depth_blocks: str = "last", ff_groups: int = 32, layer_depth: str = "multi") -> ArchSpace:
        """The space of a dense `UNet2DConditionModel` or `PixArtTransformer2DModel` (its config must
        describe its weights); DDP /
        accelerate / torch.compile wrappers are looked through."""
        unet = unwrap_unet(unet)
        check_unet_class(unet)
        cfg = clean_config(unet.config)
        check_processors(unet)  # first: a fused projection also changes the weights, but this names the fix
        model = _build_structure(cfg)
        _check_same_structure(unet, model)
        return cls(cfg, depth_blocks=depth_blocks, ff_groups=ff_groups, layer_depth=layer_depth, _model=model)

    @classmethod
    def from_config(cls, unet_config: dict, depth_blocks: str = "last", ff_groups: int = 32,
                    layer_depth: str = "multi") -> ArchSpace:
        """The space of the UNet that `UNet2DConditionModel.from_config(unet_config)` builds."""
        return cls(unet_config, depth_blocks=depth_blocks, ff_groups=ff_groups, layer_depth=layer_depth)

    def to_dict(self) -> dict:
        """JSON-able description; `ArchSpace.from_dict(space.to_dict())` rebuilds the same space."""
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "unet_config": self.unet_config,
            "depth_blocks": self.depth_blocks,
            "ff_groups": self.ff_groups,
            "layer_depth": self.layer_depth,
            "num_units": self.num_units,
        }

    @classmethod
    def from_dict(cls, d: dict) -> ArchSpace:
        if not isinstance(d, dict):
            raise UserError("architecture space description must be a JSON object")
        if d.get("format") != FORMAT:
            raise UserError(f"not an architecture space description (format {d.get('format')!r}, expected {FORMAT!r})")
        if d.get("version") != FORMAT_VERSION:
            raise UserError(f"architecture space version {d.get('version')!r} is not supported (expected {FORMAT_VERSION})")
        unknown = set(d) - {"format", "version", "unet_config", "depth_blocks", "ff_groups", "layer_depth", "num_units"}
        if unknown:
            raise UserError(f"unknown key(s) in architecture space description: {', '.join(sorted(unknown))}")
        if not isinstance(d.get("unet_config"), dict):
            raise UserError("architecture space description has no unet_config object")
        space = cls(d["unet_config"], depth_blocks=d.get("depth_blocks", "last"), ff_groups=d.get("ff_groups", 32),
                    layer_depth=d.get("layer_depth", _LEGACY_LAYER_DEPTH))
        if "num_units" in d and d["num_units"] != space.num_units:
            raise UserError(f"architecture space description says {d['num_units']} units but this version of aptp "
                            f"finds {space.num_units} in that UNet")
        return space

    def __repr__(self) -> str:
        nw = sum(g.num_units for g in self.width_groups)
        return (f"ArchSpace(D={self.num_units}: {nw} width units in {len(self.width_groups)} groups + "
                f"{len(self.depth_groups)} depth units, depth_blocks={self.depth_blocks!r}, ff_groups={self.ff_groups}, "
                f"layer_depth={self.layer_depth!r})")

    def __eq__(self, other) -> bool:
        return isinstance(other, ArchSpace) and self.to_dict() == other.to_dict()

    __hash__ = None

    # ---------------------------------------------------------------- views
    @property
    def width_groups(self) -> list[UnitGroup]:
        return [g for g in self.groups if not g.is_depth]

    @property
    def depth_groups(self) -> list[UnitGroup]:
        return [g for g in self.groups if g.is_depth]

    def group(self, name: str, kind: str) -> UnitGroup:
        for g in self.groups:
            if g.name == name and g.kind == kind:
                return g
        raise KeyError((name, kind))

    @property
    def sample_size(self) -> int:
        s = self.unet_config.get("sample_size") or 64
        return int(s[0] if isinstance(s, (list, tuple)) else s)

    # ---------------------------------------------------------------- vectors
    def ones(self):
        """The dense architecture (all units kept), float32 [D]."""

        return torch.ones(self.num_units, dtype=torch.float32)

    def sample(self, generator=None, keep: float = 0.6):
        """A random binary vector (float32 [D]): every unit kept independently with probability `keep`."""

        if not (0.0 <= float(keep) <= 1.0):
            raise UserError(f"keep must lie in [0, 1], got {keep}")
        return (torch.rand(self.num_units, generator=generator) < float(keep)).to(torch.float32)

    def validate(self, arch) -> None:
        """Raise UserError unless `arch` is [D] or [B, D] with finite values in [0, 1]."""
        self.as_tensor(arch)

    def as_tensor(self, arch):
        """`arch` as a validated floating torch tensor [D] or [B, D] (a tensor input is returned as is,
        keeping its autograd graph; lists and numpy arrays become float32)."""

        if isinstance(arch, torch.Tensor):
            t = arch if arch.is_floating_point() else arch.to(torch.float32)
        else:
            try:
                t = torch.as_tensor(np.asarray(arch, dtype=np.float32))
            except (TypeError, ValueError) as e:
                raise UserError(f"architecture vector is not numeric: {e}") from None
        if t.ndim not in (1, 2):
            raise UserError(f"architecture vector must have shape [D] or [B, D], got {list(t.shape)}")
        if t.shape[-1] != self.num_units:
            raise UserError(f"architecture vector has length {t.shape[-1]}, this space has D={self.num_units} units")
        if t.numel() == 0:
            raise UserError("architecture batch is empty")
        d = t.detach()
        if bool(torch.isnan(d).any()):
            raise UserError("architecture vector contains NaN")
        lo, hi = float(d.min()), float(d.max())
        if lo < -_RANGE_TOL or hi > 1 + _RANGE_TOL:
            raise UserError(f"architecture vector values must lie in [0, 1], found values in [{lo:g}, {hi:g}]")
        return t

    def binarize(self, arch):
        """Threshold at 0.5 (a unit is kept iff its value is > 0.5): float32 tensor of 0/1, same shape."""

        return (self.as_tensor(arch).detach() > 0.5).to(torch.float32)

    def effective(self, arch):
        """The binary vector with every width unit inside a removed depth unit set to 0 (same sub-network)."""
        a = self.binarize(arch).clone()
        for g in self.depth_groups:  # outer units precede the layer units nested in them
            if g.depth_unit is not None:
                a[..., g.start:g.stop] *= a[..., g.depth_unit:g.depth_unit + 1]
        for g in self.width_groups:
            if g.depth_unit is not None:
                a[..., g.start:g.stop] *= a[..., g.depth_unit:g.depth_unit + 1]
        return a

    # ---------------------------------------------------------------- MACs
    def macs(self, arch, height: int | None = None, width: int | None = None, text_len: int = 77):
        """Analytic MACs at batch 1 (true MACs: each attention product counted once; see macs.py).

        arch: torch tensor [D] / [B, D] (soft values allowed) -> differentiable torch tensor [] / [B];
        a list or numpy array [D] -> python float ([B, D] -> numpy [B]).
        height, width: latent size (default: the UNet's sample_size); text_len: cross-attention tokens.
        """

        h, w = self.resolve_hw(height, width)
        t = self.as_tensor(arch)
        if isinstance(arch, torch.Tensor):
            return self._mac_model.torch(t, h, w, text_len)
        out = self._mac_model.numpy(t.numpy(), h, w, text_len)
        return float(out) if np.ndim(out) == 0 else out

    def dense_macs(self, height: int | None = None, width: int | None = None, text_len: int = 77) -> float:
        """MACs of the dense UNet at batch 1."""
        h, w = self.resolve_hw(height, width)
        return float(self._mac_model.numpy(np.ones(self.num_units), h, w, text_len))

    def macs_by_module(self, arch=None, height: int | None = None, width: int | None = None,
                       text_len: int = 77) -> dict[str, float]:
        """MACs per module path (binary or soft vector [D]; default dense) - for tables and tests."""
        h, w = self.resolve_hw(height, width)
        a = np.ones(self.num_units) if arch is None else self.as_tensor(arch).detach().double().numpy()
        if a.ndim != 1:
            raise UserError("macs_by_module takes one architecture vector [D]")
        per = self._mac_model.per_term(a, h, w, text_len)
        out: dict[str, float] = {}
        for term, v in zip(self._mac_model.terms, per, strict=True):
            out[term.module] = out.get(term.module, 0.0) + float(v)
        return out

    @property
    def mac_terms(self) -> list[MacTerm]:
        return list(self._mac_model.terms)

    def resolve_hw(self, height, width) -> tuple[int, int]:
        h = self.sample_size if height is None else int(height)
        w = h if width is None and height is not None else (self.sample_size if width is None else int(width))
        if h < 1 or w < 1:
            raise UserError(f"latent size must be positive, got {h}x{w}")
        return h, w

    # ---------------------------------------------------------------- table
    def table(self, height: int | None = None, width: int | None = None, text_len: int = 77) -> list[dict]:
        """One row per group: name, kind, units, unit_channels, vector slice, depth unit, MACs share.

        `macs_share` is the fraction of the dense MACs that removing the whole group removes.
        """
        dense = self.dense_macs(height, width, text_len)
        ones = np.ones(self.num_units)
        h, w = self.resolve_hw(height, width)
        rows = []
        for g in self.groups:
            a = ones.copy()
            a[g.start:g.stop] = 0.0
            share = (dense - float(self._mac_model.numpy(a, h, w, text_len))) / dense
            rows.append({
                "name": g.name, "kind": g.kind, "units": g.num_units, "unit_channels": g.unit_channels,
                "start": g.start, "stop": g.stop, "depth_unit": g.depth_unit, "macs_share": share,
            })
        return rows

    def format_table(self, height: int | None = None, width: int | None = None, text_len: int = 77) -> str:
        """The table of `table()` as aligned text, with totals."""
        h, w = self.resolve_hw(height, width)
        rows = self.table(h, w, text_len)
        head = ("#", "slice", "kind", "units", "ch/unit", "in depth", "MACs share", "module")
        lines = [[str(i), f"{r['start']}:{r['stop']}", r["kind"], str(r["units"]), str(r["unit_channels"]),
                  "" if r["depth_unit"] is None else str(r["depth_unit"]), f"{100 * r['macs_share']:.2f} %",
                  r["name"]] for i, r in enumerate(rows)]
        widths = [max(len(head[c]), *(len(line[c]) for line in lines)) for c in range(len(head))]

        def fmt(cells):
            return "  ".join(c.rjust(wd) if i in (0, 3, 4, 5, 6) else c.ljust(wd)
                             for i, (c, wd) in enumerate(zip(cells, widths, strict=True))).rstrip()

        out = [fmt(head), fmt(["-" * wd for wd in widths])] + [fmt(line) for line in lines]
        nw = sum(g.num_units for g in self.width_groups)
        out.append("")
        blocks = f"depth_blocks={self.depth_blocks!r}, " if backbone_of(self.unet_config) == "unet" else ""
        out.append(f"D = {self.num_units} units: {nw} width units in {len(self.width_groups)} groups, "
                   f"{len(self.depth_groups)} depth units ({blocks}"
                   f"ff_groups={self.ff_groups}, layer_depth={self.layer_depth!r})")
        out.append(f"dense: {self.dense_params / 1e6:.2f} M parameters, "
                   f"{self.dense_macs(h, w, text_len) / 1e9:.3f} GMACs at a {h}x{w} latent, {text_len} tokens, batch 1 "
                   "(true MACs; attention products counted once)")
        return "\n".join(out)

    # ---------------------------------------------------------------- model operations
    @contextmanager
    def gated(self, unet, arch):
        """Context manager: `unet` computes the sub-network `arch` ([D] or per-sample [B, D], soft allowed).

        Forward hooks multiply the gate positions (see module docstring); gradients flow to `arch`. On exit
        (also on exceptions) every hook is removed: the model is exactly as before.
        """

        with gate_hooks(self, unet, arch):
            yield unet

    def materialize(self, unet, arch):
        """A physically pruned deep copy of `unet` computing what `gated(unet, binarize(arch))` computes.

        `unet` is never modified. Threshold 0.5. See materialize.py.
        """

        return materialize(self, unet, arch)

    def check_unet(self, unet) -> None:
        """Raise UserError unless `unet` is a dense UNet of this space's structure with supported processors."""
        check_unet_class(unet)
        if config_key(unet.config) != self.config_key:
            raise UserError("the UNet's config differs from the one this architecture space was built from")
        _check_same_structure(unet, None, self)
        check_processors(unet)


# ==================================================================== support checks
def check_unet_class(unet) -> None:
    if not is_unet(unet):
        raise UserError(f"expected a diffusers UNet2DConditionModel, PixArtTransformer2DModel or "
                        f"SD3Transformer2DModel, "
                        f"got {type(unet).__name__}")


def check_processors(unet) -> None:
    """Raise UserError if an attention processor or fused projection would escape the head gates."""

    bad, fused = set(), set()
    for name, m in unet.named_modules():
        if isinstance(m, Attention):
            pname = type(m.processor).__name__
            if getattr(m, "fused_projections", False):  # named first: its fix is one call
                fused.add(f"fused QKV projections (at {name}; call .unfuse_qkv_projections())")
            elif pname not in SUPPORTED_PROCESSORS:
                bad.add(f"attention processor {pname} (at {name})")
    bad = sorted(fused) + sorted(bad)
    if bad:
        raise UserError(f"unsupported {type(unet).__name__}: " + "; ".join(bad[:3]) + (" ..." if len(bad) > 3 else "")
                        + f" - supported processors: {', '.join(sorted(SUPPORTED_PROCESSORS))}")


def _build_structure(cfg: dict):
    try:
        return build_unet(cfg, device="meta")
    except Exception as e:  # diffusers raises ValueError/TypeError for inconsistent configs
        raise UserError(f"cannot build a {backbone_class(cfg).__name__} from this config: {e}") from None


def _shapes(model) -> dict[str, tuple]:
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def _check_same_structure(unet, model=None, space: ArchSpace | None = None) -> None:
    """The UNet's parameter shapes must equal those its config builds (i.e. it is not a pruned expert)."""
    if model is not None:
        ref = _shapes(model)
    else:
        ref = getattr(space, "_ref_shapes", None)
        if ref is None:
            ref = space._ref_shapes = _shapes(_build_structure(space.unet_config))
    got = _shapes(unet)
    if ref == got:
        return
    missing = sorted(set(ref) - set(got))
    extra = sorted(set(got) - set(ref))
    if missing or extra:
        what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
    else:
        n = next(k for k in ref if ref[k] != got[k])
        what = f"{n} has shape {list(got[n])}, its config gives {list(ref[n])}"
    raise UserError(f"the model's weights do not match its config ({what}); an architecture space needs the "
                    "dense UNet, not a pruned expert")


# ==================================================================== discovery
class _Discovery:
    """Walks a (meta) UNet in forward order; collects unit groups, MAC terms and the resolution program."""

    def __init__(self, model, cfg: dict, depth_blocks: str, ff_groups: int, layer_depth: str = "multi"):
        self.model = model
        self.cfg = cfg
        self.depth_blocks = depth_blocks
        self.ff_groups = ff_groups
        self.layer_depth = layer_depth
        self.mods = dict(model.named_modules())
        self.width: list[list] = []  # [name, kind, units, unit_channels, depth_ref]
        self.depth: list[list] = []  # [name, kind, enclosing depth_ref | None]
        self.terms: list[tuple] = []  # (coef, tokens, slot, ("w"|"d", i) | None, depth_ref | None, module)
        self.program: list[tuple] = []
        self.problems: list[str] = []

    # ------------------------------------------------------------ helpers
    def problem(self, msg: str) -> None:
        if msg not in self.problems:
            self.problems.append(msg)

    def slot(self, spec: tuple) -> int:
        self.program.append(spec)
        return len(self.program) - 1

    def add_width(self, name, kind, units, unit_channels, depth_ref) -> int:
        self.width.append([name, kind, units, unit_channels, depth_ref])
        return len(self.width) - 1

    def add_depth(self, name, kind, parent=None) -> int:
        self.depth.append([name, kind, parent])
        return len(self.depth) - 1

    def term(self, coef, tokens, slot, group, depth, module) -> None:
        self.terms.append((float(coef), tokens, slot, group, depth, module))

    def conv(self, path, slot, in_g=None, out_g=None, depth=None) -> None:
        m = self.mods[path]
        if not isinstance(m, nn.Conv2d):
            self.problem(f"{path} is a {type(m).__name__}, expected Conv2d")
            return
        if m.groups != 1:
            self.problem(f"grouped convolution at {path}")
        kh, kw = m.kernel_size
        coef = kh * kw * (m.in_channels if in_g is None else 1) * (m.out_channels if out_g is None else 1)
        self.term(coef, "hw", slot, in_g if in_g is not None else out_g, depth, path)

    def linear(self, path, tokens, slot, in_g=None, out_g=None, depth=None, mult=1) -> None:
        m = self.mods[path]
        if not isinstance(m, nn.Linear):
            self.problem(f"{path} is a {type(m).__name__}, expected Linear")
            return
        coef = mult * (m.in_features if in_g is None else 1) * (m.out_features if out_g is None else 1)
        self.term(coef, tokens, slot, in_g if in_g is not None else out_g, depth, path)

    def proj(self, path, slot, depth) -> None:
        if isinstance(self.mods[path], nn.Linear):
            self.linear(path, "hw", slot, depth=depth)
        else:
            self.conv(path, slot, depth=depth)

    # ------------------------------------------------------------ blocks
    def resnet(self, path, slot, prunable) -> None:
        r = self.mods[path]
        if type(r) is not ResnetBlock2D:
            self.problem(f"ResBlock type {type(r).__name__} (at {path})")
            return
        if r.up or r.down:
            self.problem(f"up/down-sampling ResBlocks (at {path})")
        if r.time_embedding_norm != "default":
            self.problem(f"ResBlock time_embedding_norm={r.time_embedding_norm!r} (only 'default')")
        if r.time_emb_proj is None:
            self.problem(f"ResBlock without a time embedding (at {path})")
            return
        mid, groups = r.conv1.out_channels, r.norm2.num_groups
        if mid % groups:
            self.problem(f"{path}: conv1 has {mid} channels, not a multiple of norm2's {groups} groups")
            return
        d = self.add_depth(path, "resnet_depth") if prunable else None
        w = self.add_width(path, "resnet_width", groups, mid // groups, d)
        self.conv(f"{path}.conv1", slot, out_g=("w", w), depth=d)
        self.linear(f"{path}.time_emb_proj", "one", -1, out_g=("w", w), depth=d)
        self.conv(f"{path}.conv2", slot, in_g=("w", w), depth=d)
        if r.conv_shortcut is not None:
            self.conv(f"{path}.conv_shortcut", slot)

    def transformer(self, path, slot, prunable) -> None:
        t = self.mods[path]
        if type(t) is not Transformer2DModel:
            self.problem(f"transformer type {type(t).__name__} (at {path})")
            return
        if not t.is_input_continuous or t.config.norm_type != "layer_norm":
            self.problem(f"Transformer2DModel with patch/vector input or norm_type={t.config.norm_type!r} (at {path})")
            return
        d = self.add_depth(path, "transformer_depth") if prunable else None
        self.proj(f"{path}.proj_in", slot, d)
        n_layers = len(t.transformer_blocks)
        layers = self.layer_depth == "all" or (self.layer_depth == "multi" and n_layers > 1)
        for k, b in enumerate(t.transformer_blocks):
            bp = f"{path}.transformer_blocks.{k}"
            if type(b) is not BasicTransformerBlock:
                self.problem(f"transformer block type {type(b).__name__} (at {bp})")
                continue
            # a BasicTransformerBlock is three residual branches (attn1, attn2, ff): removing it is exact
            bd = self.add_depth(bp, "layer_depth", parent=d) if layers else d
            if b.norm_type != "layer_norm" or b.pos_embed is not None:
                self.problem(f"transformer blocks with norm_type={b.norm_type!r} or positional embeddings")
            if b.only_cross_attention:
                self.problem("only_cross_attention")
            if hasattr(b, "fuser"):
                self.problem("gated (GLIGEN) attention")
            self.attention(f"{bp}.attn1", slot, bd, cross=False)
            if b.attn2 is not None:
                if not b.attn2.is_cross_attention:
                    self.problem("double_self_attention (a second self-attention instead of cross-attention)")
                self.attention(f"{bp}.attn2", slot, bd, cross=True)
            self.feed_forward(f"{bp}.ff", slot, bd)
        self.proj(f"{path}.proj_out", slot, d)

    def attention(self, path, slot, depth, cross) -> None:
        a = self.mods[path]
        if type(a) is not Attention:
            self.problem(f"attention type {type(a).__name__} (at {path})")
            return
        for attr in ("group_norm", "spatial_norm", "added_kv_proj_dim"):
            if getattr(a, attr, None) is not None:
                self.problem(f"attention with {attr} (at {path})")
        self.check_qk_norms(a, path, ("norm_q", "norm_k"))
        if a.residual_connection or a.rescale_output_factor != 1.0:
            self.problem(f"attention with residual_connection/rescale_output_factor (at {path})")
        heads, inner = a.heads, a.inner_dim
        if inner % heads or a.inner_kv_dim != inner or a.to_out is None:
            self.problem(f"attention layout not supported (at {path})")
            return
        w = self.add_width(path, "attn_heads", heads, inner // heads, depth)
        kv = "text" if cross else "hw"
        self.linear(f"{path}.to_q", "hw", slot, out_g=("w", w), depth=depth)
        self.linear(f"{path}.to_k", kv, -1 if cross else slot, out_g=("w", w), depth=depth)
        self.linear(f"{path}.to_v", kv, -1 if cross else slot, out_g=("w", w), depth=depth)
        # QK^T and AV: N_q x N_kv x head_dim MACs each per kept head = 2 * N_q * N_kv per kept channel.
        self.term(2, "hw_text" if cross else "hw2", slot, ("w", w), depth, f"{path}.products")
        self.linear(f"{path}.to_out.0", "hw", slot, in_g=("w", w), depth=depth)

    def check_qk_norms(self, a, path, names) -> None:
        """Query/key norms must act on one head at a time (normalised shape = head size, weights shared by
        every head: SD3.5's RMSNorm), so that removing a head leaves the others' unchanged. A LayerNorm of the
        same shape would be exact too, but torch-pruning couples its parameters to the heads: refused."""
        for attr in names:
            n = getattr(a, attr, None)
            if n is None:
                continue
            shape = getattr(n, "normalized_shape", None)
            shape = getattr(n, "dim", None) if shape is None else shape  # diffusers' RMSNorm: .dim
            shape = tuple(shape) if isinstance(shape, (tuple, list, torch.Size)) else (shape,)
            if type(n).__name__ != "RMSNorm" or shape != (a.inner_dim // a.heads,):
                # a per-head LayerNorm has a bias that torch-pruning couples to the heads: not supported
                self.problem(f"attention with a {attr} of type {type(n).__name__} over {shape} (only a per-head "
                             f"RMSNorm; at {path})")

    def feed_forward(self, path, slot, depth, tokens="hw") -> None:
        f = self.mods[path]
        if type(f) is not FeedForward or len(f.net) < 3 or not isinstance(f.net[2], nn.Linear):
            self.problem(f"feed-forward type {type(f).__name__} (at {path})")
            return
        act = type(f.net[0])
        if act not in (GEGLU, GELU):
            self.problem(f"feed-forward activation {act.__name__} (only GEGLU and GELU are supported)")
            return
        inner = f.net[2].in_features
        if inner % self.ff_groups:
            self.problem(f"{path}: {inner} feed-forward channels are not divisible into ff_groups={self.ff_groups}")
            return
        w = self.add_width(path, "ff_width", self.ff_groups, inner // self.ff_groups, depth)
        # GEGLU's projection computes two halves (value and gate) per kept channel, GELU's one
        self.linear(f"{path}.net.0.proj", tokens, slot, out_g=("w", w), depth=depth, mult=2 if act is GEGLU else 1)
        self.linear(f"{path}.net.2", tokens, slot, in_g=("w", w), depth=depth)

    def downsampler(self, path, slot) -> int:
        ds = self.mods[path]
        if type(ds) is not Downsample2D or ds.norm is not None:
            self.problem(f"down-sampler {type(ds).__name__} (at {path})")
            return slot
        op = ds.conv
        if isinstance(op, nn.Conv2d):
            k, s, p = op.kernel_size[0], op.stride[0], op.padding[0]
            extra = 2 * p if p else 1  # padding=0: diffusers pads (0, 1, 0, 1) by hand
            new = self.slot(("down", slot, extra, k, s))
            self.conv(f"{path}.conv", new)
        else:  # AvgPool2d(2, 2): no MACs
            new = self.slot(("down", slot, 0, 2, 2))
        return new

    def upsampler(self, path, slot, skips) -> int:
        us = self.mods[path]
        if type(us) is not Upsample2D or us.use_conv_transpose or us.norm is not None or not us.interpolate:
            self.problem(f"up-sampler {type(us).__name__} with transpose conv / norm (at {path})")
            return slot
        new = self.slot(("alias", skips[-1])) if skips else self.slot(("up2x", slot))
        if us.use_conv:
            self.conv(f"{path}.conv", new)
        return new

    # ------------------------------------------------------------ walk
    def run(self):
        backbone = backbone_of(self.cfg)
        if backbone == "pixart":
            walk_pixart(self)
        elif backbone == "sd3":
            walk_sd3(self)
        else:
            self.walk_unet()
        if self.problems:
            raise UserError("unsupported UNet: " + "; ".join(self.problems[:4])
                            + (f" (and {len(self.problems) - 4} more)" if len(self.problems) > 4 else ""))
        if not self.width:
            raise UserError("unsupported UNet: it has no prunable units")
        return self.finish()

    def walk_unet(self) -> None:
        m, cfg = self.model, self.cfg
        addition = cfg.get("addition_embed_type")
        if addition not in (None, "text_time"):
            self.problem(f"addition embeddings (addition_embed_type={addition!r}; only SDXL's 'text_time')")
        for key, label in (("class_embed_type", "class embeddings"), ("num_class_embeds", "class embeddings"),
                           ("encoder_hid_dim", "encoder_hid_dim projections"),
                           ("encoder_hid_dim_type", "encoder_hid_dim projections"),
                           ("time_cond_proj_dim", "time-conditioning projections"),
                           ("attention_type", None), ("time_embedding_type", None)):
            v = cfg.get(key)
            if key == "attention_type":
                if v not in (None, "default"):
                    self.problem(f"attention_type={v!r}")
            elif key == "time_embedding_type":
                if v not in (None, "positional"):
                    self.problem(f"time_embedding_type={v!r}")
            elif v is not None:
                self.problem(f"{label} ({key}={v!r})")
        for key in ("dual_cross_attention", "only_cross_attention"):
            v = cfg.get(key)
            if v is True or (isinstance(v, list) and any(v)):
                self.problem(f"{key}")
        if getattr(m, "class_embedding", None) is not None or getattr(m, "encoder_hid_proj", None) is not None \
                or getattr(m, "position_net", None) is not None \
                or (getattr(m, "add_embedding", None) is not None and addition != "text_time"):
            self.problem("extra embeddings (class / addition / encoder_hid / GLIGEN position net)")

        s0 = self.slot(("input",))
        self.conv("conv_in", s0)
        te = m.time_embedding
        if getattr(te, "cond_proj", None) is not None:
            self.problem("time-conditioning projections (time_cond_proj_dim)")
        self.linear("time_embedding.linear_1", "one", -1)
        self.linear("time_embedding.linear_2", "one", -1)
        if addition == "text_time":
            # SDXL: sinusoidal features of time_ids (no MACs) concatenated with text_embeds, then an MLP added
            # to the time embedding; kept dense (its output width is the time embedding's, never pruned).
            ae = getattr(m, "add_embedding", None)
            if type(ae) is not TimestepEmbedding or ae.cond_proj is not None or ae.post_act is not None:
                self.problem(f"addition embedding {type(ae).__name__} (only diffusers' TimestepEmbedding)")
            else:
                self.linear("add_embedding.linear_1", "one", -1)
                self.linear("add_embedding.linear_2", "one", -1)

        skips, cur = [s0], s0
        down_ok = {"DownBlock2D", "CrossAttnDownBlock2D"}
        up_ok = {"UpBlock2D", "CrossAttnUpBlock2D"}
        for i, blk in enumerate(m.down_blocks):
            if type(blk).__name__ not in down_ok:
                self.problem(f"down block type {type(blk).__name__}")
                continue
            attns = getattr(blk, "attentions", None)
            n = len(blk.resnets)
            for j in range(n):
                prunable = self.depth_blocks == "all" or (self.depth_blocks == "last" and j == n - 1)
                self.resnet(f"down_blocks.{i}.resnets.{j}", cur, prunable)
                if attns is not None:
                    self.transformer(f"down_blocks.{i}.attentions.{j}", cur, prunable)
                skips.append(cur)
            if blk.downsamplers is not None:
                cur = self.downsampler(f"down_blocks.{i}.downsamplers.0", cur)
                skips.append(cur)

        if m.mid_block is not None:
            mb = m.mid_block
            if type(mb).__name__ != "UNetMidBlock2DCrossAttn":
                self.problem(f"mid block type {type(mb).__name__}")
            else:
                prunable = self.depth_blocks == "all"
                self.resnet("mid_block.resnets.0", cur, prunable)
                for k in range(len(mb.attentions)):
                    self.transformer(f"mid_block.attentions.{k}", cur, prunable)
                    self.resnet(f"mid_block.resnets.{k + 1}", cur, prunable)

        for i, blk in enumerate(m.up_blocks):
            if type(blk).__name__ not in up_ok:
                self.problem(f"up block type {type(blk).__name__}")
                continue
            attns = getattr(blk, "attentions", None)
            n = len(blk.resnets)
            for j in range(n):
                prunable = self.depth_blocks == "all" or (self.depth_blocks == "last" and j == n - 1)
                self.resnet(f"up_blocks.{i}.resnets.{j}", cur, prunable)
                if attns is not None:
                    self.transformer(f"up_blocks.{i}.attentions.{j}", cur, prunable)
                if skips:
                    skips.pop()
            if blk.upsamplers is not None:
                cur = self.upsampler(f"up_blocks.{i}.upsamplers.0", cur, skips)
        self.conv("conv_out", cur)

    def finish(self):
        groups: list[UnitGroup] = []
        pos = 0
        n_width_units = sum(w[2] for w in self.width)
        # depth unit j sits at vector index n_width_units + j (one unit each)
        depth_index = [n_width_units + j for j in range(len(self.depth))]

        def chain(dref) -> tuple[int, ...]:  # enclosing depth units, outermost first
            out = []
            while dref is not None:
                out.append(depth_index[dref])
                dref = self.depth[dref][2]
            return tuple(reversed(out))

        for name, kind, units, uc, dref in self.width:
            groups.append(UnitGroup(name, kind, pos, pos + units, uc,
                                    None if dref is None else depth_index[dref], chain(dref)))
            pos += units
        for j, (name, kind, parent) in enumerate(self.depth):
            groups.append(UnitGroup(name, kind, depth_index[j], depth_index[j] + 1, 1,
                                    None if parent is None else depth_index[parent], chain(parent)))
        nw = len(self.width)
        # the MAC model's parent of every group (index into groups): a nested depth unit's enclosing unit
        parents = [-1] * nw + [-1 if p is None else nw + p for _, _, p in self.depth]
        terms = []
        for coef, tokens, slot, grp, dref, module in self.terms:
            gi = -1 if grp is None else grp[1]
            di = -1 if dref is None else nw + dref
            terms.append(MacTerm(coef, tokens, slot, gi, di, module))
        return groups, terms, self.program, parents
