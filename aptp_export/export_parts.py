"""What an export is made of besides its experts: `ExpertModel` (one UNet with its accounting) and `ExportParts`
(the shared models, tokenizers, scheduler config, shapes and what the manifest records about them).

    parts = ExportParts(text_encoder=enc, tokenizer="minilm/", router_encoder=enc, router_head=head,
                        router_max_length=256, embedding_dim=384, scheduler_config=cfg, sample_size=(32, 32),
                        in_channels=3, text_len=16, context_dim=384, dense_macs=1e9)
    write_export_dir("export/toy", experts, parts, ExportOptions())

`training.export_run` fills it from a training run; tests fill it with tiny random models. The knobs of an
export (backend, precision, sampler, profile sizes) are `ExportOptions`'.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from engines.errors import UserError
from engines.manifest import UNCOND_KINDS


@dataclass
class ExpertModel:
    """One UNet to export with its accounting: MACs per call (batch 1, at sample_size), parameter
    count (counted from the module when None) and `share` of training prompts routed to it."""

    unet: Any
    macs: float
    params: int | None = None
    share: float = 0.0


@dataclass(frozen=True, kw_only=True)
class ExportParts:
    """The shared parts of an export (shapes for batch 1 unless said).

    UNet input and accounting:
        sample_size (h, w) / in_channels: the UNet's input (latent when `vae` is given);
        text_len / context_dim: its cross-attention context [B, text_len, context_dim] (with a second text
            encoder the concatenated width); dense_macs: MACs of the dense UNet per call;
        dense: the dense UNet, exported as the latency reference (experts/dense.onnx) when given.
    Text conditioning:
        text_encoder: transformers-style encoder giving the context; tokenizer: its tokenizer.json or the
            directory holding one (pad_token overrides its padding token); text_encoder_uses_mask: False for
            encoders their pipeline calls without an attention mask (SD's CLIP);
        text_encoder_2 / tokenizer_2 / pad_token_2: the second text encoder (CLIPTextModelWithProjection) and
            its tokenizer, for families that have one (SDXL, SD3);
        text_encoder_3 / tokenizer_3: SD3's T5 encoder and tokenizer (None: an SD3 model without T5, whose
            context has zeros there); token_lengths: the tokens each text tokenizer pads to when not text_len
            ({"json": 77, "json_2": 77, "json_3": 256} for SD3: CLIP's length, then T5's);
        uncond: "empty_prompt" or "zeros" (SDXL's force_zeros_for_empty_prompt).
    Router:
        router_encoder + router_head: prompt encoder (mean-pooled, L2-normalised, embedding_dim) and the head
            mapping embeddings to K expert scores; router_max_length: its tokens; router_tokenizer /
            router_pad_token: the router encoder's, when it is another model (default: `tokenizer`);
        codes: JSON-able architecture codes written next to the router (router_codes.json).
    VAE (latent models): vae (diffusers AutoencoderKL), vae_scaling_factor and vae_shift_factor (SD3's latent
        shift, 0 for the others); image_size: pixels (h, w) of the
        images, from which the runtime builds SDXL's time_ids (default: sample_size times the VAE factor).
    Sampling and record: scheduler_config (diffusers scheduler config dict); sampling: the model's recommended
        {"num_inference_steps", "guidance_scale"} (its sampling.json, None when it has none); budget,
        base_model and info (recorded in the manifest as given).
    """

    sample_size: tuple[int, int]
    in_channels: int
    text_len: int
    context_dim: int
    dense_macs: float
    scheduler_config: dict
    text_encoder: Any
    tokenizer: str | os.PathLike
    router_encoder: Any
    router_head: Any
    router_max_length: int
    embedding_dim: int
    dense: ExpertModel | None = None
    pad_token: str | None = None
    text_encoder_uses_mask: bool = True
    text_encoder_2: Any = None
    tokenizer_2: str | os.PathLike | None = None
    pad_token_2: str | None = None
    text_encoder_3: Any = None
    tokenizer_3: str | os.PathLike | None = None
    token_lengths: dict[str, int] | None = None
    uncond: str = "empty_prompt"
    router_tokenizer: str | os.PathLike | None = None
    router_pad_token: str | None = None
    codes: dict | None = None
    vae: Any = None
    vae_scaling_factor: float | None = None
    vae_shift_factor: float = 0.0
    image_size: tuple[int, int] | None = None
    budget: float | None = None
    base_model: str = "unet"
    info: dict | None = None
    sampling: dict | None = None

    def __post_init__(self):
        if (self.vae is None) != (self.vae_scaling_factor is None):
            raise UserError("a VAE needs its scaling factor (and a scaling factor needs a VAE)")
        if (self.text_encoder_2 is None) != (self.tokenizer_2 is None):
            raise UserError("a second text encoder needs its tokenizer (and a second tokenizer its encoder)")
        if (self.text_encoder_3 is None) != (self.tokenizer_3 is None):
            raise UserError("a third text encoder needs its tokenizer (and a third tokenizer its encoder)")
        if self.uncond not in UNCOND_KINDS:
            raise UserError(f"uncond must be one of {', '.join(UNCOND_KINDS)}, got {self.uncond!r}")
