"""The registry of unit kinds: everything the toolchain knows about one kind of prunable unit.

| kind                | one unit                          | gate (exact position)                  | torch-pruning root        |
|---------------------|-----------------------------------|----------------------------------------|---------------------------|
| `resnet_width`      | a GroupNorm group of conv1/conv2  | pre-hook on `conv2` (input channels)   | `conv1` out-channels      |
| `attn_heads`        | one attention head                | pre-hook on `to_out.0` (head outputs)  | `to_q` out-channels       |
| `ff_width`          | a group of GEGLU channels         | pre-hook on `net.2` (product channels) | `net.2` in-channels       |
| `resnet_depth`      | a whole ResBlock's residual branch| hook on `conv2`'s output               | - (block replaced)        |
| `transformer_depth` | a whole Transformer2DModel        | hook on `proj_out`'s output            | - (block replaced)        |
| `layer_depth`       | one BasicTransformerBlock         | hook on the block: `g*out + (1-g)*in`  | - (block replaced)        |
| `joint_heads`       | one head of an MMDiT joint attention (image and text tokens) | pre-hooks on `to_out.0` and `to_add_out` | `to_q` out-channels |
| `joint_depth`       | one MMDiT JointTransformerBlock   | hook on the block, both streams        | - (block replaced)        |

Gates (gates.py) read where to hook; materialisation (materialize.py) reads the torch-pruning root,
the layers that must be coupled to it, the attributes to fix after pruning, and the small exact
module that replaces a group with no unit left or a removed block. Where units are found in a UNet
is the architecture space's walk (arch_space.py, `_Discovery`), which names these kinds. Why the
gates sit where they do: docs/method.md §1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
from diffusers.models.activations import GEGLU
from diffusers.models.modeling_outputs import Transformer2DModelOutput

# ==================================================================== replacement modules


class ResnetShortcut(nn.Module):
    """A ResBlock without its residual branch: `(shortcut(x) [+ branch_bias]) / output_scale_factor`.

    `branch_bias` is set when the branch's width was pruned to zero channels: conv2 of zeros is its bias.
    """

    def __init__(self, conv_shortcut: nn.Module | None, output_scale_factor: float,
                 branch_bias: torch.Tensor | None = None):
        super().__init__()
        self.conv_shortcut = conv_shortcut
        self.output_scale_factor = float(output_scale_factor)
        self.branch_bias = None if branch_bias is None else nn.Parameter(branch_bias)

    def forward(self, input_tensor, temb=None, *args, **kwargs):
        x = input_tensor if self.conv_shortcut is None else self.conv_shortcut(input_tensor)
        if self.branch_bias is not None:
            x = x + self.branch_bias.to(x.dtype)[:, None, None]
        return x / self.output_scale_factor


class TransformerSkip(nn.Module):
    """A removed Transformer2DModel (residual): returns its input, in the caller's expected format."""

    def forward(self, hidden_states, *args, return_dict: bool = True, **kwargs):
        if not return_dict:
            return (hidden_states,)
        return Transformer2DModelOutput(sample=hidden_states)


class TransformerLayerSkip(nn.Module):
    """A removed BasicTransformerBlock: the block is three residual branches, so without them it is the
    identity on its hidden states."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class ConstantAttention(nn.Module):
    """An attention layer with every head removed: `to_out[0]` of zeros, i.e. its bias at every token."""

    def __init__(self, bias: torch.Tensor | None, out_dim: int):
        super().__init__()
        self.out_dim = int(out_dim)
        self.bias = None if bias is None else nn.Parameter(bias)

    def forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        shape = (*hidden_states.shape[:-1], self.out_dim)
        out = hidden_states.new_zeros(shape)  # a fresh tensor, not a view of the parameter
        return out if self.bias is None else out + self.bias.to(out.dtype)


class ConstantJointAttention(nn.Module):
    """An MMDiT joint attention with every head removed: the bias of `to_out[0]` at every image token and
    the bias of `to_add_out` at every text token (None for a context-pre-only block, whose caller drops it)."""

    def __init__(self, bias: torch.Tensor | None, out_dim: int, add_bias: torch.Tensor | None,
                 add_out_dim: int | None):
        super().__init__()
        self.out_dim = int(out_dim)
        self.add_out_dim = None if add_out_dim is None else int(add_out_dim)
        self.bias = None if bias is None else nn.Parameter(bias)
        self.add_bias = None if add_bias is None else nn.Parameter(add_bias)

    @staticmethod
    def _const(x, dim, bias):
        out = x.new_zeros((*x.shape[:-1], dim))
        return out if bias is None else out + bias.to(out.dtype)

    def forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        img = self._const(hidden_states, self.out_dim, self.bias)
        if encoder_hidden_states is None:
            return img
        ctx = None if self.add_out_dim is None else self._const(encoder_hidden_states, self.add_out_dim,
                                                                self.add_bias)
        return img, ctx


class JointBlockSkip(nn.Module):
    """A removed MMDiT JointTransformerBlock: both streams are residual, so it passes the image and text
    tokens through (text None after a context-pre-only block, as the block returns)."""

    def __init__(self, context_pre_only: bool):
        super().__init__()
        self.context_pre_only = bool(context_pre_only)

    def forward(self, hidden_states, encoder_hidden_states=None, temb=None, joint_attention_kwargs=None):
        return (None if self.context_pre_only else encoder_hidden_states), hidden_states


class ConstantFeedForward(nn.Module):
    """A feed-forward with every channel removed: `net[2]` of zeros, i.e. its bias at every token."""

    def __init__(self, bias: torch.Tensor | None, out_dim: int):
        super().__init__()
        self.out_dim = int(out_dim)
        self.bias = None if bias is None else nn.Parameter(bias)

    def forward(self, hidden_states, *args, **kwargs):
        shape = (*hidden_states.shape[:-1], self.out_dim)
        out = hidden_states.new_zeros(shape)  # a fresh tensor, not a view of the parameter
        return out if self.bias is None else out + self.bias.to(out.dtype)


REPLACEMENT_MODULES = (ResnetShortcut, TransformerSkip, TransformerLayerSkip, ConstantAttention, ConstantFeedForward,
                       ConstantJointAttention, JointBlockSkip)


def _clone(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().clone()


# ==================================================================== per-kind behaviour
def _fix_resnet_width(m, kept_units: int, ch: int) -> bool:
    m.norm2.num_groups = kept_units
    return m.conv1.out_channels == ch == m.conv2.in_channels == m.norm2.num_channels


def _fix_attn_heads(m, kept_units: int, ch: int) -> bool:
    m.heads = kept_units
    m.sliceable_head_dim = kept_units
    m.inner_dim = ch
    m.inner_kv_dim = ch
    return m.to_q.out_features == m.to_k.out_features == m.to_v.out_features == m.to_out[0].in_features == ch


def _fix_joint_heads(m, kept_units: int, ch: int) -> bool:
    ok = _fix_attn_heads(m, kept_units, ch)
    ok = ok and m.add_q_proj.out_features == m.add_k_proj.out_features == m.add_v_proj.out_features == ch
    return ok and (m.to_add_out is None or m.to_add_out.in_features == ch)


def _fix_ff_width(m, kept_units: int, ch: int) -> bool:
    halves = 2 if isinstance(m.net[0], GEGLU) else 1  # GEGLU projects to value and gate, GELU to the value
    return m.net[2].in_features == ch and m.net[0].proj.out_features == halves * ch


@dataclass(frozen=True)
class UnitKind:
    """What one kind of unit is, for gating and for physical pruning.

    gate_at: submodule (suffix of the group's module path) that carries the gate hook.
    gate_also: further submodules that carry the same width gate where they exist (the text-stream output
        projection of a joint attention).
    gate_layout: "nchw" / "last" - channel axis of the gated input (width kinds); "output" - the hooked
        module's output is multiplied by the depth gate; "residual" - the hooked module's output y and its
        input x become `g*y + (1-g)*x` (a block whose whole body is residual branches; exact at g = 0 and
        bit-identical at g = 1) (depth kinds); "joint_residual" - the same for both streams of an MMDiT
        block, whose output is (text, image).
    prune_root / prune_fn / coupled: torch-pruning root layer, its pruning function name, and the exact set
        of layers the dependency graph must couple to it (those of them the module has; anything else
        breaks an assumption); width only.
    fix: after pruning, set the attributes torch-pruning does not know; returns whether every coupled
        layer has the expected channel count.
    replace: the exact module that stands for the group's module when no unit of it is kept.
    """

    name: str
    depth: bool
    gate_at: str
    gate_layout: str
    replace: Callable[[nn.Module], nn.Module]
    prune_root: str | None = None
    prune_fn: str | None = None
    coupled: frozenset[str] = frozenset()
    fix: Callable[[nn.Module, int, int], bool] | None = None
    gate_also: tuple[str, ...] = ()


UNIT_KINDS: dict[str, UnitKind] = {k.name: k for k in (
    UnitKind("resnet_width", False, ".conv2", "nchw",
             lambda m: ResnetShortcut(m.conv_shortcut, m.output_scale_factor, _clone(m.conv2.bias)),
             ".conv1", "prune_conv_out_channels", frozenset({".conv1", ".time_emb_proj", ".norm2", ".conv2"}),
             _fix_resnet_width),
    UnitKind("attn_heads", False, ".to_out.0", "last",
             lambda m: ConstantAttention(_clone(m.to_out[0].bias), m.to_out[0].out_features),
             ".to_q", "prune_linear_out_channels", frozenset({".to_q", ".to_k", ".to_v", ".to_out.0"}),
             _fix_attn_heads),
    UnitKind("ff_width", False, ".net.2", "last",
             lambda m: ConstantFeedForward(_clone(m.net[2].bias), m.net[2].out_features),
             ".net.2", "prune_linear_in_channels", frozenset({".net.2", ".net.0.proj"}), _fix_ff_width),
    UnitKind("resnet_depth", True, ".conv2", "output",
             lambda m: ResnetShortcut(m.conv_shortcut, m.output_scale_factor)),
    UnitKind("transformer_depth", True, ".proj_out", "output", lambda m: TransformerSkip()),
    UnitKind("layer_depth", True, "", "residual", lambda m: TransformerLayerSkip()),
    UnitKind("joint_heads", False, ".to_out.0", "last",
             lambda m: ConstantJointAttention(
                 _clone(m.to_out[0].bias), m.to_out[0].out_features,
                 None if m.to_add_out is None else _clone(m.to_add_out.bias),
                 None if m.to_add_out is None else m.to_add_out.out_features),
             ".to_q", "prune_linear_out_channels",
             frozenset({".to_q", ".to_k", ".to_v", ".to_out.0", ".add_q_proj", ".add_k_proj", ".add_v_proj",
                        ".to_add_out"}),
             _fix_joint_heads, gate_also=(".to_add_out",)),
    UnitKind("joint_depth", True, "", "joint_residual", lambda m: JointBlockSkip(m.context_pre_only)),
)}

KINDS = tuple(UNIT_KINDS)
WIDTH_KINDS = tuple(k for k, v in UNIT_KINDS.items() if not v.depth)
DEPTH_KINDS = tuple(k for k, v in UNIT_KINDS.items() if v.depth)
