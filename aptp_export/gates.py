"""Gating a dense UNet with an architecture vector: forward hooks at the exact-equivalence positions.

| unit kind           | hook                                   | effect                                     |
|---------------------|----------------------------------------|--------------------------------------------|
| `resnet_width`      | pre-hook on `resnet.conv2`              | input channels x gate (after norm2 + SiLU) |
| `resnet_depth`      | hook on `resnet.conv2` output           | residual branch x gate -> shortcut(x)      |
| `attn_heads`        | pre-hook on `attn.to_out[0]`            | each head's output x its gate              |
| `ff_width`          | pre-hook on `ff.net[2]`                 | GEGLU product channels x gate              |
| `transformer_depth` | hook on `transformer.proj_out` output   | transformer branch x gate -> its input     |
| `layer_depth`       | hook on a `BasicTransformerBlock`       | g * output + (1 - g) * input -> its input  |
| `joint_heads`       | pre-hooks on `attn.to_out[0]` and `attn.to_add_out` | each head's image and text outputs x its gate |
| `joint_depth`       | hook on a `JointTransformerBlock`       | the same as layer_depth, for both streams  |

Because every gate multiplies a quantity that enters the next layer linearly (after every normalisation and
non-linearity of its own path), a gate of 0 is exactly the removal of the unit (materialize.py), and a soft
gate interpolates smoothly. Gates are [D] (one architecture for the batch) or [B, D] (one per sample; with
classifier-free guidance pass the vector of each of the 2B rows). Gradients flow to the vector.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager

from engines.errors import UserError

from .unet_configs import unwrap_unet
from .unit_kinds import UNIT_KINDS

_ACTIVE: weakref.WeakSet = weakref.WeakSet()  # UNets currently inside gate_hooks


def is_gated(unet) -> bool:
    """True while `unet` is inside a `space.gated(...)` context."""
    return unet in _ACTIVE


def _per_sample(gate, x, where: str):
    """Reshape gate [C] / [B, C] so it broadcasts over x; channel axis given by `where` ("nchw" or "last")."""
    g = gate.to(device=x.device, dtype=x.dtype)
    if g.ndim == 2 and g.shape[0] != x.shape[0]:
        raise UserError(f"architecture batch has {g.shape[0]} rows but the UNet is running a batch of "
                        f"{x.shape[0]} (with classifier-free guidance repeat the vectors for both halves)")
    if where == "nchw":
        return g[..., None, None] if g.ndim == 2 else g[:, None, None]
    # channels last: [B, N, C] (or [B, C])
    if g.ndim == 2:
        return g.reshape(g.shape[0], *([1] * (x.ndim - 2)), g.shape[1])
    return g


def _depth_factor(d, x):
    """d [] or [B] -> broadcastable over x [B, ...]."""
    d = d.to(device=x.device, dtype=x.dtype)
    if d.ndim == 1:
        if d.shape[0] != x.shape[0]:
            raise UserError(f"architecture batch has {d.shape[0]} rows but the UNet is running a batch of "
                            f"{x.shape[0]} (with classifier-free guidance repeat the vectors for both halves)")
        return d.reshape(-1, *([1] * (x.ndim - 1)))
    return d


def _channel_pre_hook(arch, start, stop, unit_channels, where):
    def hook(module, args):
        x = args[0]
        g = arch[..., start:stop].repeat_interleave(unit_channels, dim=-1)
        return (x * _per_sample(g, x, where), *args[1:])

    return hook


def _depth_hook(arch, index):
    def hook(module, args, output):
        return output * _depth_factor(arch[..., index], output)

    return hook


def _residual_hook(arch, index):
    """A block made only of residual branches: g * block(x) + (1 - g) * x. At g = 1 this is block(x)
    bit for bit (x * 0 adds zero), at g = 0 exactly x (the removed block)."""

    def hook(module, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        d = _depth_factor(arch[..., index], output)
        return output * d + x * (1 - d)

    return hook


def _joint_residual_hook(arch, index):
    """An MMDiT block (text, image) -> (text', image'), both residual: g * new + (1 - g) * old per stream
    (text None after a context-pre-only block stays None)."""

    def hook(module, args, kwargs, output):
        names = ("hidden_states", "encoder_hidden_states")
        x, ctx = (args[i] if len(args) > i else kwargs.get(n) for i, n in enumerate(names))
        ctx_out, x_out = output
        d = _depth_factor(arch[..., index], x_out)
        x_new = x_out * d + x * (1 - d)
        if ctx_out is None:
            return None, x_new
        dc = _depth_factor(arch[..., index], ctx_out)
        return ctx_out * dc + ctx * (1 - dc), x_new

    return hook


@contextmanager
def gate_hooks(space, unet, arch):
    """Install the gates of `arch` on `unet` for the duration of the context (see module docstring)."""

    a = space.as_tensor(arch)
    unet = unwrap_unet(unet)  # hooks on the inner modules also act through DDP / compile wrappers
    space.check_unet(unet)
    if is_gated(unet):
        raise UserError("this UNet is already gated; nested space.gated() contexts would multiply the gates")
    for name, m in unet.named_modules():
        if getattr(m, "_chunk_size", None) is not None:
            raise UserError(f"chunked feed-forward (at {name}) cannot be gated per sample; "
                            "call unet.disable_forward_chunking()")
    mods = dict(unet.named_modules())
    handles = []
    _ACTIVE.add(unet)
    try:
        for g in space.groups:
            kind = UNIT_KINDS[g.kind]
            target = mods[g.name + kind.gate_at]  # gate_at "": the group's module itself
            if kind.gate_layout == "residual":
                handles.append(target.register_forward_hook(_residual_hook(a, g.start), with_kwargs=True))
            elif kind.gate_layout == "joint_residual":
                handles.append(target.register_forward_hook(_joint_residual_hook(a, g.start), with_kwargs=True))
            elif kind.depth:
                handles.append(target.register_forward_hook(_depth_hook(a, g.start)))
            else:
                hook = _channel_pre_hook(a, g.start, g.stop, g.unit_channels, kind.gate_layout)
                handles.append(target.register_forward_pre_hook(hook))
                for extra in kind.gate_also:  # the same gate where the group has a second output (MMDiT text)
                    if g.name + extra in mods and mods[g.name + extra] is not None:
                        handles.append(mods[g.name + extra].register_forward_pre_hook(hook))
        yield unet
    finally:
        for h in handles:
            h.remove()
        _ACTIVE.discard(unet)
