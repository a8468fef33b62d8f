"""Where the prunable units of a diffusion transformer are: the discovery walk for `PixArtTransformer2DModel`.

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

from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.embeddings import PatchEmbed


def walk_pixart(disc) -> None:
    """Collect the unit groups and MAC terms of the PixArt transformer `disc.model` into `disc` (an
    arch_space._Discovery), in forward order."""
    m = disc.model
    if m.use_additional_conditions:
        disc.problem("resolution/aspect-ratio conditioning (use_additional_conditions, PixArt-alpha 1024)")
    pe = m.pos_embed
    if type(pe) is not PatchEmbed or pe.layer_norm or pe.pos_embed_max_size:
        disc.problem("a patch embedding with LayerNorm or a cropped positional embedding")
    p = int(m.config.patch_size)
    s0 = disc.slot(("input",))
    tokens = disc.slot(("down", s0, 0, p, p))  # the patch grid: (h - p) // p + 1 = h / p per side
    disc.conv("pos_embed.proj", tokens)
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
