"""Where the prunable units of a diffusion transformer are: the discovery walks for `PixArtTransformer2DModel`
(`walk_pixart`) and `SD3Transformer2DModel` (`walk_sd3`, MMDiT, described at the function).

A PixArt transformer is patch embedding -> N DiT blocks -> final layer. Each block is a diffusers
`BasicTransformerBlock` with `norm_type="ada_norm_single"`: self-attention, cross-attention to the projected
caption and a GELU(tanh) feed-forward, each a residual branch scaled by the adaLN-single gates. Its units:

| kind          | one unit                                  | gate (exact position, gates.py)        |
|---------------|-------------------------------------------|----------------------------------------|
| `attn_heads`  | one head of `attn1` (self) / `attn2` (cross) | input of `to_out[0]`                |
| `ff_width`    | `inner/ff_groups` GELU channels           | input of `ff.net[2]` (after the GELU)  |
| `layer_depth` | a whole DiT block                         | `g * block(x) + (1 - g) * x`           |

The block width (the residual stream, 1152 in PixArt-Sigma) is never pruned: the adaLN-single modulation
(`scale_shift_table`, the timestep MLP's 6 x width output) and every block read it. Kept dense and counted in
the MACs: the patch embedding (a conv of kernel = stride = patch), the timestep embedder and adaLN-single
linear, the caption projection (two linears over the L caption tokens) and the final projection. The block
order of the vector is the forward order (attn1, attn2, ff of block 0, then block 1, ...), then one depth unit
per block (`layer_depth="multi"` or `"all"`; `"none"`: no depth units). `depth_blocks` has no meaning here.

Rejected with a UserError naming the feature: resolution / aspect-ratio conditioning
(`use_additional_conditions`, PixArt-alpha 1024), a patch embedding with LayerNorm or a cropped positional
embedding, blocks of another norm type, and whatever the UNet walk rejects in attention layers.
"""

from __future__ import annotations

from diffusers.models.attention import BasicTransformerBlock, JointTransformerBlock
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import PatchEmbed


def walk_pixart(disc) -> None:
    """Collect the unit groups and MAC terms of the PixArt transformer `disc.model` into `disc` (an
    arch_space._Discovery), in forward order."""
    m = disc.model
    if m.use_additional_conditions:
        disc.problem("resolution/aspect-ratio conditioning (use_additional_conditions, PixArt-alpha 1024)")
    tokens = _patch_tokens(disc, m.pos_embed, int(m.config.patch_size), allow_crop=False)
    for path in ("adaln_single.emb.timestep_embedder.linear_1", "adaln_single.emb.timestep_embedder.linear_2",
                 "adaln_single.linear"):
        disc.linear(path, "one", -1)
    if m.caption_projection is not None:
        disc.linear("caption_projection.linear_1", "text", -1)
        disc.linear("caption_projection.linear_2", "text", -1)
    layers = disc.layer_depth in ("multi", "all")
    for k, b in enumerate(m.transformer_blocks):
        bp = f"transformer_blocks.{k}"
        if type(b) is not BasicTransformerBlock or b.norm_type != "ada_norm_single":
            disc.problem(f"transformer block {type(b).__name__} with norm_type={getattr(b, 'norm_type', None)!r} "
                         f"(only ada_norm_single; at {bp})")
            continue
        if b.only_cross_attention or b.attn2 is None or hasattr(b, "fuser") or b.pos_embed is not None:
            disc.problem(f"a DiT block without cross-attention, with GLIGEN or positional embeddings (at {bp})")
            continue
        d = disc.add_depth(bp, "layer_depth") if layers else None
        disc.attention(f"{bp}.attn1", tokens, d, cross=False)
        disc.attention(f"{bp}.attn2", tokens, d, cross=True)
        disc.feed_forward(f"{bp}.ff", tokens, d)
    disc.linear("proj_out", "hw", tokens)


def _patch_tokens(disc, pe, patch: int, allow_crop: bool) -> int:
    """The slot of the patch grid (kernel = stride = patch: (h - p) // p + 1 = h / p per side), with the
    patch convolution counted."""
    if type(pe) is not PatchEmbed or pe.layer_norm or (pe.pos_embed_max_size and not allow_crop):
        disc.problem("a patch embedding with LayerNorm" + ("" if allow_crop else " or a cropped positional embedding"))
    s0 = disc.slot(("input",))
    tokens = disc.slot(("down", s0, 0, patch, patch))
    disc.conv("pos_embed.proj", tokens)
    return tokens


def joint_attention(disc, path: str, tokens: int, depth) -> None:
    """An MMDiT joint attention: q/k/v of the N image tokens (to_q/k/v) and of the L text tokens
    (add_q/k/v_proj) are split into the same heads and attend over all N + L tokens; each head's output is
    projected back per stream (to_out[0], and to_add_out unless the block is context-pre-only). One unit =
    one head of both streams. Products per kept channel: 2 (N + L)^2 = 2 N^2 + 4 N L + 2 L^2."""
    a = disc.mods[path]
    if type(a) is not Attention or a.add_q_proj is None or a.add_k_proj is None or a.add_v_proj is None:
        disc.problem(f"joint attention without add_q/k/v projections (at {path})")
        return
    if a.group_norm is not None or a.spatial_norm is not None or a.residual_connection \
            or a.rescale_output_factor != 1.0:
        disc.problem(f"joint attention with group/spatial norm or a rescaled residual (at {path})")
    disc.check_qk_norms(a, path, ("norm_q", "norm_k", "norm_added_q", "norm_added_k"))
    heads, inner = a.heads, a.inner_dim
    if inner % heads or a.inner_kv_dim != inner or a.to_out is None:
        disc.problem(f"attention layout not supported (at {path})")
        return
    w = disc.add_width(path, "joint_heads", heads, inner // heads, depth)
    g = ("w", w)
    for proj in ("to_q", "to_k", "to_v"):
        disc.linear(f"{path}.{proj}", "hw", tokens, out_g=g, depth=depth)
    for proj in ("add_q_proj", "add_k_proj", "add_v_proj"):
        disc.linear(f"{path}.{proj}", "text", -1, out_g=g, depth=depth)
    disc.term(2, "hw2", tokens, g, depth, f"{path}.products")
    disc.term(4, "hw_text", tokens, g, depth, f"{path}.products")
    disc.term(2, "text2", -1, g, depth, f"{path}.products")
    disc.linear(f"{path}.to_out.0", "hw", tokens, in_g=g, depth=depth)
    if a.to_add_out is not None:
        disc.linear(f"{path}.to_add_out", "text", -1, in_g=g, depth=depth)


def walk_sd3(disc) -> None:
    """Collect the unit groups and MAC terms of the SD3 transformer `disc.model` into `disc`.

    SD3 (MMDiT) = patch embedding (position table cropped from `pos_embed_max_size`) -> N
    `JointTransformerBlock`s over two token streams, image (N = h w / p^2) and text (L) -> final layer.
    Units per block, in forward order: `joint_heads` of `attn` (both streams), `attn_heads` of `attn2`
    (SD3.5's dual self-attention on the image stream, where present), `ff_width` of `ff` (image) and of
    `ff_context` (text; absent in the last, context-pre-only block); then one `joint_depth` unit per block
    (`layer_depth` "multi"/"all"). The stream width (1536 for SD3-medium) is never pruned. Kept dense and
    counted: the patch convolution, the timestep and pooled-text embedders, the context embedder, the
    adaLN-Zero linears of each block (inside its depth unit) and the final adaLN + projection.
    """
    m = disc.model
    tokens = _patch_tokens(disc, m.pos_embed, int(m.config.patch_size), allow_crop=True)
    for path in ("time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
                 "time_text_embed.text_embedder.linear_1", "time_text_embed.text_embedder.linear_2"):
        disc.linear(path, "one", -1)
    disc.linear("context_embedder", "text", -1)
    layers = disc.layer_depth in ("multi", "all")
    for k, b in enumerate(m.transformer_blocks):
        bp = f"transformer_blocks.{k}"
        if type(b) is not JointTransformerBlock:
            disc.problem(f"transformer block {type(b).__name__} (only JointTransformerBlock; at {bp})")
            continue
        d = disc.add_depth(bp, "joint_depth") if layers else None
        disc.linear(f"{bp}.norm1.linear", "one", -1, depth=d)
        disc.linear(f"{bp}.norm1_context.linear", "one", -1, depth=d)
        joint_attention(disc, f"{bp}.attn", tokens, d)
        if b.attn2 is not None:
            disc.attention(f"{bp}.attn2", tokens, d, cross=False)
        disc.feed_forward(f"{bp}.ff", tokens, d)
        if b.ff_context is not None:
            disc.feed_forward(f"{bp}.ff_context", -1, d, tokens="text")
    disc.linear("norm_out.linear", "one", -1)
    disc.linear("proj_out", "hw", tokens)
