"""Denoiser configurations as plain dicts: reading a model's config, building a denoiser from one (on the meta
device when only the structure is needed), the reference architectures (Stable Diffusion 1.5, 2.1 and XL UNets,
the PixArt-Sigma and SD3-medium transformers), and the extra denoiser inputs (`added_cond_kwargs` of SDXL,
`pooled_projections` of SD3).

The toolchain calls every denoiser a "UNet" in its names (`build_unet`, `is_unet`, `unet_config`); three
backbones are supported (`backbone_of`): diffusers' `UNet2DConditionModel` ("unet"), `PixArtTransformer2DModel`
("pixart", a DiT: patch embedding, N transformer blocks with self- and cross-attention, adaLN-single) and
`SD3Transformer2DModel` ("sd3", an MMDiT: joint attention over image and text tokens, two streams).

A UNet's *config* (diffusers' `unet.config` without the private `_…` keys, tuples as lists) is what the
architecture space, expert files and export code pass around; the weights travel separately as safetensors.
"""

from __future__ import annotations

import json

import torch
from diffusers import PixArtTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

from engines.errors import UserError

# Stable Diffusion 2.1 (768 px, v-prediction) UNet: 865.9 M parameters, latent 96x96x4, OpenCLIP-H text (1024-d).
# Values as in stabilityai/stable-diffusion-2-1/unet/config.json; the remaining keys are diffusers' defaults.
SD21_UNET_CONFIG: dict = {
    "sample_size": 96,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 1024,
    "attention_head_dim": [5, 10, 20, 20],  # diffusers' naming: number of heads per block (head dim 64)
    "use_linear_projection": True,
    "upcast_attention": True,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "center_input_sample": False,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_scale_factor": 1,
}


# Stable Diffusion 1.5 (512 px, epsilon) UNet: 859.5 M parameters, latent 64x64x4, CLIP ViT-L text (768-d), 8 heads
# at every level, 1x1-conv projections. Values as in runwayml/stable-diffusion-v1-5/unet/config.json.
SD15_UNET_CONFIG: dict = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 768,
    "attention_head_dim": 8,  # diffusers' naming: 8 heads per block
    "use_linear_projection": False,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "center_input_sample": False,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_scale_factor": 1,
}

# Stable Diffusion XL base 1.0 (1024 px, epsilon) UNet: 2567.5 M parameters, latent 128x128x4, two text encoders
# (penultimate states concatenated to 2048-d; pooled 1280-d), no attention at the first level, 1/2/10 transformer
# layers per level and 10 in the mid block. Values as in stabilityai/stable-diffusion-xl-base-1.0/unet/config.json.
SDXL_UNET_CONFIG: dict = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10],
    "cross_attention_dim": 2048,
    "attention_head_dim": [5, 10, 20],  # diffusers' naming: number of heads per block (head dim 64)
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 1280 (pooled text) + 6 x 256 (time_ids features)
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "center_input_sample": False,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_scale_factor": 1,
}

# PixArt-Sigma XL-2 1024 (PixArt-alpha/PixArt-Sigma-XL-2-1024-MS/transformer/config.json): 28 DiT blocks of
# 16 heads x 72 (1152 wide), GELU-tanh feed-forward 4608 wide, patch 2 on a 128x128x4 latent (4096 tokens),
# T5-XXL captions (4096-d, 300 tokens), learned sigma (8 output channels), no resolution conditioning.
PIXART_SIGMA_CONFIG: dict = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 8,
    "patch_size": 2,
    "num_layers": 28,
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "cross_attention_dim": 1152,
    "caption_channels": 4096,
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "norm_type": "ada_norm_single",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "num_embeds_ada_norm": 1000,
    "interpolation_scale": 2,
    "use_additional_conditions": False,
    "upcast_attention": False,
    "dropout": 0.0,
    "attention_type": "default",
}

# Stable Diffusion 3 medium (stabilityai/stable-diffusion-3-medium-diffusers/transformer/config.json): 24 MMDiT
# blocks of 24 heads x 64 (1536 wide), patch 2 on a 128x128x16 latent (4096 image tokens), text 4096-d (CLIP-L/G
# padded + T5-XXL; 77 + 256 = 333 tokens), pooled CLIP 2048-d, position table cropped from 192x192. The last
# block is "context pre-only" (it updates no text stream).
SD3_MEDIUM_CONFIG: dict = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 192,
}
SD3_TEXT_LEN = 333  # the SD3 pipelines' prompt embedding: 77 CLIP tokens + 256 T5 tokens

_BACKBONE_CLASSES = {"unet": UNet2DConditionModel, "pixart": PixArtTransformer2DModel, "sd3": SD3Transformer2DModel}
BACKBONES = tuple(_BACKBONE_CLASSES)


def backbone_of(config) -> str:
    """"unet", "pixart" or "sd3": which diffusers class a denoiser config (dict or FrozenDict, `_class_name`
    optional) describes; an unknown class name raises UserError. Without a class name: SD3 by its
    `joint_attention_dim`, PixArt by its `caption_channels` (the UNet has neither)."""
    c = dict(config or {})
    name = c.get("_class_name")
    for key, cls in _BACKBONE_CLASSES.items():
        if name == cls.__name__:
            return key
    if is_legacy_pixart(c):
        return "pixart"
    if name is not None:
        raise UserError(f"unsupported denoiser class {name!r} (supported: "
                        f"{', '.join(cls.__name__ for cls in _BACKBONE_CLASSES.values())})")
    if "joint_attention_dim" in c or "pooled_projection_dim" in c:
        return "sd3"
    return "pixart" if "caption_channels" in c or ("num_layers" in c and "block_out_channels" not in c) else "unet"


def pooled_projections(config, batch: int, device=None):
    """Zeros of the pooled text embedding an SD3 transformer reads ([B, pooled_projection_dim]; for tracing
    its structure), None for other backbones."""
    if backbone_of(config) != "sd3":
        return None
    return torch.zeros(batch, int(dict(config).get("pooled_projection_dim", 2048)), device=device)


def sd3_text_condition(encoders, ids, joint_dim: int, t5_length: int):
    """SD3's conditioning as StableDiffusion3Pipeline.encode_prompt computes it (no clip_skip): (context
    [B, S1 + t5_length, joint_dim], pooled [B, P1 + P2]) from `encoders` = (CLIP-L, CLIP-G, T5 or None), each a
    transformers model, and their token ids `ids` (the third None without T5). Both CLIPs
    (`CLIPTextModelWithProjection`, no mask) give their penultimate hidden states, concatenated and zero-padded to
    joint_dim, then T5's last hidden state (no mask) or zeros; pooled concatenates both CLIPs' projected pooled
    outputs. The one implementation for training (training.base_model) and the export's text graph."""
    clip_l, clip_g, t5 = encoders
    out1 = clip_l(ids[0], output_hidden_states=True)
    out2 = clip_g(ids[1], output_hidden_states=True)
    clip = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
    clip = torch.nn.functional.pad(clip, (0, int(joint_dim) - clip.shape[-1]))
    if t5 is None:
        states = clip.new_zeros(clip.shape[0], int(t5_length), int(joint_dim))
    else:
        states = t5(ids[2])[0]
    return torch.cat([clip, states], dim=-2), torch.cat([out1[0], out2[0]], dim=-1)


def is_legacy_pixart(config) -> bool:
    """A PixArt transformer saved under diffusers' old class name (`Transformer2DModel` with
    norm_type "ada_norm_single", as the official PixArt-alpha and -Sigma repositories still name it; diffusers
    loads it as PixArtTransformer2DModel, `_CLASS_REMAPPING_DICT`)."""
    c = dict(config or {})
    return c.get("_class_name") == "Transformer2DModel" and c.get("norm_type") == "ada_norm_single"


def backbone_class(config):
    """The diffusers model class a config describes (see backbone_of)."""
    return _BACKBONE_CLASSES[backbone_of(config)]


TIME_IDS = 6  # SDXL's micro-conditioning: original (h, w), crop top-left (y, x), target (h, w)


def added_cond_dims(config) -> tuple[int, int] | None:
    """(text_embeds width, time_ids count) of an SDXL-style UNet (`addition_embed_type="text_time"`), else None.

    The UNet embeds each time id with `addition_time_embed_dim` sinusoidal features and concatenates them to
    text_embeds, so text_embeds has `projection_class_embeddings_input_dim - 6 * addition_time_embed_dim`.
    """
    c = dict(config)
    if c.get("addition_embed_type") != "text_time":
        return None
    return int(c["projection_class_embeddings_input_dim"]) - TIME_IDS * int(c["addition_time_embed_dim"]), TIME_IDS


def added_cond_kwargs(config, batch: int, device=None, generator=None, image_size: int | None = None):
    """The `added_cond_kwargs` an SDXL-style UNet needs ({"text_embeds": [B, D_pool], "time_ids": [B, 6]}),
    None for other UNets. text_embeds are N(0, 1) from `generator` (zeros on the meta device); time_ids are
    SDXL's default micro-conditioning for a square image of `image_size` px (default 8 x sample_size):
    (size, size, 0, 0, size, size)."""

    dims = added_cond_dims(config)
    if dims is None:
        return None
    d_pool, n_ids = dims
    c = dict(config)
    s = c.get("sample_size") or 128
    size = float(image_size if image_size is not None else 8 * int(s[0] if isinstance(s, (list, tuple)) else s))
    if device is not None and torch.device(device).type == "meta":
        text = torch.zeros(batch, d_pool, device=device)
    else:
        text = torch.randn(batch, d_pool, generator=generator).to(device or "cpu")
    ids = torch.tensor([size, size, 0.0, 0.0, size, size][:n_ids], device=device).repeat(batch, 1)
    return {"text_embeds": text, "time_ids": ids}


def clean_config(config) -> dict:
    """A JSON-able copy of a diffusers config (FrozenDict or dict): private `_…` keys dropped, tuples as lists."""
    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}))


def config_key(config) -> str:
    """A canonical string identifying a UNet structure (same key -> same modules and shapes)."""
    return json.dumps(clean_config(config), sort_keys=True)


def build_unet(config: dict, device: str | None = "meta"):
    """The denoiser `config` describes (`UNet2DConditionModel`, `PixArtTransformer2DModel` or
    `SD3Transformer2DModel`, see backbone_of);
    on the meta device (no memory, no init time) by default."""

    cls = backbone_class(config)
    if device is None:
        return cls.from_config(dict(config))
    with torch.device(device):
        return cls.from_config(dict(config))


def unwrap_unet(unet):
    """The UNet2DConditionModel inside DistributedDataParallel / accelerate / torch.compile wrappers."""
    seen = 0
    while seen < 8 and not is_unet(unet):
        inner = getattr(unet, "module", None)
        if inner is None:
            inner = getattr(unet, "_orig_mod", None)
        if inner is None:
            break
        unet, seen = inner, seen + 1
    return unet


def is_unet(m) -> bool:
    """Whether `m` is a denoiser the toolchain prunes (UNet2DConditionModel, PixArt or SD3 transformer)."""
    return isinstance(m, tuple(_BACKBONE_CLASSES.values()))


def fill_position_tables(model, device=None, only_missing: bool = True) -> None:
    """(Re)compute the sin-cos position tables of a transformer's `PatchEmbed` (PixArt's, non-persistent, and
    SD3's cropped one), a function of the config alone: after loading weights (`only_missing`: tables left on
    the meta device) or after `to_empty()` (only_missing=False: every table, whose memory is uninitialised)."""
    from diffusers.models.embeddings import PatchEmbed, get_2d_sincos_pos_embed

    for m in model.modules():
        if not isinstance(m, PatchEmbed) or getattr(m, "pos_embed", None) is None:
            continue
        if only_missing and not m.pos_embed.is_meta:
            continue
        grid = m.pos_embed_max_size or int((m.height * m.width) ** 0.5)
        table = get_2d_sincos_pos_embed(m.proj.out_channels, grid, base_size=m.base_size,
                                        interpolation_scale=m.interpolation_scale, output_type="pt")
        dev = device if device is not None else (m.proj.weight.device if not m.proj.weight.is_meta else "cpu")
        m.register_buffer("pos_embed", table.float().unsqueeze(0).to(dev), persistent=bool(m.pos_embed_max_size))


def denoiser_output(model, sample, timestep, encoder_hidden_states, added_cond_kwargs=None,
                    encoder_attention_mask=None):
    """The noise (or v, or flow velocity) prediction of any supported denoiser, called with the UNet's
    convention: a UNet as `model(sample, timestep, encoder_hidden_states, added_cond_kwargs=...)`, a PixArt
    transformer with its keywords and the caption's padding mask, its learned-sigma half dropped (as its
    pipelines do), an SD3 transformer with the pooled projection passed as `text_embeds`. `model` may
    be wrapped (DDP, accelerate, torch.compile) or gated; its backbone is read from the unwrapped config."""
    kind = backbone_of(unwrap_unet(model).config)
    if kind == "pixart":
        out = model(sample, encoder_hidden_states=encoder_hidden_states, timestep=timestep,
                    encoder_attention_mask=encoder_attention_mask).sample
        c = sample.shape[1]
        return out[:, :c] if out.shape[1] == 2 * c else out
    if kind == "sd3":  # added_cond_kwargs carries the pooled projection as text_embeds (UNetCond)
        return model(sample, encoder_hidden_states=encoder_hidden_states, timestep=timestep,
                     pooled_projections=added_cond_kwargs["text_embeds"]).sample
    kwargs = {} if added_cond_kwargs is None else {"added_cond_kwargs": added_cond_kwargs}
    return model(sample, timestep, encoder_hidden_states=encoder_hidden_states, **kwargs).sample
