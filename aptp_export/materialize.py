"""Physical pruning: turn a dense UNet and a binary architecture vector into a smaller UNet that computes
exactly what the gated dense UNet computes (gates.py).

How (docs/method.md §1, §7, §8):

1. **Plan, once per UNet structure.** torch-pruning's `DependencyGraph` is built on a *meta-device* copy of
   the UNet (no weights, ~1 s for SD 2.1) and asked, for the root layer of every width group (`resnet.conv1`
   out-channels, `attn.to_q` out-channels, `ff.net[2]` in-channels), which layers and which of their indices
   are coupled to each root channel. The answer (module path, torch-pruning handler, target index, root
   index) is cached per config: pruning K experts replays it K times without re-tracing.
2. **Replay on a copy.** The input UNet is shallow-copied (its tensors shared, never written), the handlers
   remove exactly the channels the vector names (`idxs` = the removed units' channels, not an importance
   ranking), and every tensor still shared with the input is then cloned, so the expert owns its weights and
   the input is untouched.
3. **Fix what torch-pruning does not know:** `norm2.num_groups` (= kept groups), `attn.heads`,
   `attn.inner_dim` / `inner_kv_dim` / `sliceable_head_dim`. Block outputs are never pruned, so
   up/down-samplers, skips and `Transformer2DModel` widths keep their channel counts.
4. **Empty groups and removed blocks** become small exact modules (unit_kinds.py): a removed ResBlock ->
   `ResnetShortcut` (shortcut(x) / output_scale_factor); a ResBlock whose GroupNorm groups were all removed
   -> `ResnetShortcut` with `branch_bias` (conv2 of zeros is its bias); a removed transformer ->
   `TransformerSkip` (its input); an attention with no head left -> `ConstantAttention` (`to_out` bias);
   a feed-forward with no channel left -> `ConstantFeedForward` (`net[2]` bias).

`apply_arch_` applies steps 1, 3, 4 in place to any UNet of the structure, including a meta-device one: that is
how `load_expert` rebuilds an expert's modules before loading its weights.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch_pruning as tp
from diffusers.models.attention_processor import Attention

from engines.errors import UserError

from .gates import is_gated
from .unet_configs import added_cond_kwargs, backbone_of, build_unet, pooled_projections, unwrap_unet
from .unit_kinds import UNIT_KINDS

# ==================================================================== the pruning plan (torch-pruning)


@dataclass(frozen=True)
class PlanItem:
    """One coupled layer of a width group: call `handler(module, idxs[isin(roots, removed)])`."""

    module: str  # module path
    handler: Callable  # torch-pruning pruning function (bound method of its pruner)
    pruning_dim: int
    idxs: np.ndarray  # index in the target layer's pruned dimension
    roots: np.ndarray  # the root channel each index is coupled to


_TEMPLATES: OrderedDict[str, dict[str, list[PlanItem]]] = OrderedDict()
_MAX_TEMPLATES = 4


def _example_inputs(model) -> dict:
    """Smallest valid inputs for tracing on the meta device (UNet: latent 2^levels, 2 tokens; PixArt / SD3:
    the sample size, whose position table the model holds, 2 caption tokens, SD3's pooled embedding)."""

    backbone = backbone_of(model.config)
    if backbone in ("pixart", "sd3"):
        s = int(model.config.sample_size)
        text = model.config.caption_channels if backbone == "pixart" else model.config.joint_attention_dim
        out = {"hidden_states": torch.zeros(1, model.config.in_channels, s, s, device="meta"),
               "encoder_hidden_states": torch.zeros(1, 2, text, device="meta"),
               "timestep": torch.ones(1, device="meta")}
        if backbone == "sd3":
            out["pooled_projections"] = pooled_projections(model.config, 1, device="meta")
        return out
    n_down = sum(1 for b in model.down_blocks if getattr(b, "downsamplers", None) is not None)
    side = 2 ** n_down
    ctx = next((m.to_k.in_features for m in model.modules() if isinstance(m, Attention) and m.is_cross_attention),
               model.config.cross_attention_dim if isinstance(model.config.cross_attention_dim, int) else 8)
    dev = "meta"
    out = {
        "sample": torch.zeros(1, model.config.in_channels, side, side, device=dev),
        "timestep": torch.ones(1, device=dev),
        "encoder_hidden_states": torch.zeros(1, 2, ctx, device=dev),
    }
    added = added_cond_kwargs(model.config, 1, device=dev)
    if added is not None:
        out["added_cond_kwargs"] = added
    return out


def pruning_template(space) -> dict[str, list[PlanItem]]:
    """For every width group (by module path): the coupled layers and index maps, from torch-pruning's
    DependencyGraph traced once on a meta-device UNet of the space's config (cached per config)."""
    key = space.config_key
    if key in _TEMPLATES:
        _TEMPLATES.move_to_end(key)
        return _TEMPLATES[key]

    model = build_unet(space.unet_config, device="meta")
    with torch.enable_grad():
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=_example_inputs(model), verbose=False)
    name_of = {m: n for n, m in model.named_modules()}
    mods = dict(model.named_modules())
    template: dict[str, list[PlanItem]] = {}
    for g in space.width_groups:
        kind = UNIT_KINDS[g.kind]
        suffix = kind.prune_root
        expected = {c for c in kind.coupled if mods.get(g.name + c) is not None}  # e.g. no to_add_out
        root = mods[g.name + suffix]
        group = dg.get_pruning_group(root, getattr(tp, kind.prune_fn), list(range(g.num_units * g.unit_channels)))
        items = []
        for it in group.items:
            target = it.dep.target.module
            if not isinstance(target, nn.Module) or target not in name_of:
                continue  # traced tensor ops (reshape, add, ...) have no weights to prune
            items.append(PlanItem(name_of[target], it.dep.handler, it.dep.target.pruning_dim,
                                  np.asarray(it.idxs, dtype=np.int64), np.asarray(it.root_idxs, dtype=np.int64)))
        found = {i.module[len(g.name):] if i.module.startswith(g.name + ".") else i.module for i in items}
        if found != expected:
            raise RuntimeError(f"torch-pruning couples {sorted(found)} to {g.name}{suffix}, expected "
                               f"{sorted(expected)}: this UNet layout breaks an assumption of aptp")
        template[g.name] = items
    _TEMPLATES[key] = template
    while len(_TEMPLATES) > _MAX_TEMPLATES:
        _TEMPLATES.popitem(last=False)
    return template


# ==================================================================== applying an architecture


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, last = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, last, new)


def apply_arch_(space, model: nn.Module, keep: np.ndarray) -> nn.Module:
    """Prune `model` (a dense UNet of `space`'s structure, any device incl. meta) in place to the binary
    vector `keep` (bool [D]). Returns `model`."""
    keep = np.asarray(keep, dtype=bool)
    if keep.shape != (space.num_units,):
        raise UserError(f"architecture vector has shape {list(keep.shape)}, expected [{space.num_units}]")
    template = pruning_template(space)
    mods = dict(model.named_modules())
    with torch.no_grad():
        for g in space.width_groups:
            if g.removed(keep):
                continue  # the whole block is replaced below
            k = keep[g.start:g.stop]
            if k.all():
                continue
            if not k.any():
                _set_module(model, g.name, UNIT_KINDS[g.kind].replace(mods[g.name]))
                continue
            removed_units = np.nonzero(~k)[0]
            removed = (removed_units[:, None] * g.unit_channels + np.arange(g.unit_channels)).ravel()
            for item in template[g.name]:
                idxs = item.idxs[np.isin(item.roots, removed)]
                item.handler.__self__.pruning_dim = item.pruning_dim
                item.handler(mods[item.module], idxs.tolist())
            ch = int(k.sum()) * g.unit_channels
            if not UNIT_KINDS[g.kind].fix(mods[g.name], int(k.sum()), ch):
                raise RuntimeError(f"pruning {g.name} did not leave {ch} channels in every coupled layer")
        for g in space.depth_groups:
            if not keep[g.start] and not g.removed(keep):  # a layer in a removed transformer goes with it
                _set_module(model, g.name, UNIT_KINDS[g.kind].replace(mods[g.name]))
    return model


def materialize(space, unet, arch):
    """A physically pruned copy of `unet` for the vector `arch` [D] (threshold 0.5); `unet` is untouched."""
    a = space.as_tensor(arch)
    if a.ndim != 1:
        raise UserError(f"materialize takes one architecture vector [D], got shape {list(a.shape)}")

    unet = unwrap_unet(unet)
    space.check_unet(unet)
    if is_gated(unet):
        raise UserError("materialize the dense UNet outside space.gated(): the copy would inherit the gates")
    keep = a.detach().cpu().numpy() > 0.5
    base = [*unet.parameters(), *unet.buffers()]
    base_ids = {id(t) for t in base}
    # Share every tensor in the copy (no full copy of the weights); pruning makes new tensors, and what is
    # still shared afterwards is cloned below, so the expert owns all its weights.
    expert = copy.deepcopy(unet, {id(t): t for t in base})
    apply_arch_(space, expert, keep)
    requires_grad = {n: p.requires_grad for n, p in unet.named_parameters()}
    for mod in expert.modules():
        for k, p in list(mod._parameters.items()):
            if p is not None and id(p) in base_ids:
                mod._parameters[k] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
        for k, b in list(mod._buffers.items()):
            if b is not None and id(b) in base_ids:
                mod._buffers[k] = b.clone()
    for n, p in expert.named_parameters():
        p.requires_grad_(requires_grad.get(n, p.requires_grad))
    return expert
