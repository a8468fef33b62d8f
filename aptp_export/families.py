"""The registry of model families: everything the toolchain knows about one kind of base model.

| family  | UNet (`addition_embed_type`) | VAE | text conditioning                                   | extra UNet inputs       |
|---------|------------------------------|-----|-----------------------------------------------------|-------------------------|
| `pixel` | none                         | no  | one encoder's token states (toy: packaged MiniLM)   | -                       |
| `sd`    | none                         | yes | CLIPTextModel, last hidden state, no attention mask | -                       |
| `sdxl`  | `"text_time"`                | yes | two CLIP encoders (second: pooled `text_embeds`)    | text_embeds, time_ids   |
| `pixart`| a PixArt transformer         | yes | T5EncoderModel, last hidden state, with its mask    | encoder_attention_mask  |
| `sd3`   | an SD3 (MMDiT) transformer   | yes | CLIP-L + CLIP-G penultimate (padded) + T5; pooled   | pooled_projections      |

A family is decided once, from the UNet's config and whether the model has a VAE (`detect_family`); loading a
base model (training/base_model.py), the UNet graph (onnx_export.py) and the export directory
(manifest_writer.py) ask the entry what to do. The names are the export format's
(`engines.manifest.FAMILIES`, the manifest's `family`). Adding a family is one entry here, its name in that
tuple, and its graph code (the text-encoder graph in onnx_export.py, the loader in training/base_model.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from engines.errors import UserError
from engines.manifest import FAMILIES, UNET_ADDED_INPUTS, UNET_MASK_INPUT, UNET_POOLED_INPUT, AddedCondInfo

from .unet_configs import added_cond_dims, backbone_of


TEXT_GRAPHS = ("single", "sdxl", "sd3")


@dataclass(frozen=True)
class Family:
    """What one model family is, for loading, exporting and the manifest.

    name: the manifest's `family` (one of engines.manifest.FAMILIES).
    latent: the model has a VAE and its UNet runs on latents (the manifest's `latent`, `vae_decoder`).
    addition_embed_type: the value of the UNet config's `addition_embed_type` this family's UNets have
        (None: no addition embedding); with `latent`, what `detect_family` matches.
    extra_inputs: the UNet's inputs after (sample, timestep, encoder_hidden_states), in graph order; diffusers
        takes them as `added_cond_kwargs` (the manifest's `added_cond`).
    backbone: the denoiser class (`detect_family` matches it): "unet", "pixart" or "sd3".
    text_graph: the text conditioning's graph (onnx_export): "single" (one encoder, `TextEncoderGraph`),
        "sdxl" (two CLIPs, `DualTextEncoderGraph`: both penultimate states, the second's pooled projection as
        `text_embeds`), "sd3" (CLIP-L + CLIP-G + optional T5, `Sd3TextEncoderGraph`: pooled = both CLIPs').
        With two or three encoders the manifest has `tokenizer.json_2` (and `json_3`) and
        `text_encoder.pooled_dim` (`second_text_encoder`).
    upcast_vae: an fp16 export keeps the VAE decoder in fp32 when the VAE's config asks to be upcast
        (`force_upcast`), as the family's diffusers pipeline decodes.
    guidance_scale: the family's diffusers pipeline's default guidance scale, what an export records when the
        model has no sampling.json and the export no --guidance (None: the format's 7.5).
    """

    name: str
    latent: bool
    addition_embed_type: str | None = None
    extra_inputs: tuple[str, ...] = ()
    text_graph: str = "single"
    guidance_scale: float | None = None
    upcast_vae: bool = False
    backbone: str = "unet"  # aptp_export.unet_configs.backbone_of of the family's denoisers

    def __post_init__(self):
        if self.name not in FAMILIES:  # the runtime reads only the format's families
            raise ValueError(f"family {self.name!r} is not one of engines.manifest.FAMILIES {FAMILIES}")
        if self.text_graph not in TEXT_GRAPHS:
            raise ValueError(f"family {self.name!r}: text_graph {self.text_graph!r} is not one of {TEXT_GRAPHS}")

    @property
    def second_text_encoder(self) -> bool:
        """The text conditioning has a second encoder and tokenizer (text_encoder_2/, tokenizer_2/) whose pooled
        projection the denoiser reads (SDXL's text_embeds, SD3's pooled_projections with the first's)."""
        return self.text_graph != "single"

    def added_cond_dims(self, unet_config) -> tuple[int, int] | None:
        """(text_embeds width, time_ids count) an SDXL-class UNet reads (its `added_cond_kwargs`), None for the
        other families (PixArt's mask and SD3's pooled projection are not added conditions)."""
        return added_cond_dims(unet_config) if self.extra_inputs else None

    def pooled_dim(self, unet_config) -> int | None:
        """Width of the pooled text embedding the denoiser reads (SDXL's text_embeds, SD3's pooled_projections),
        None for a family that reads none."""
        if self.text_graph == "sd3":
            return int(dict(unet_config)["pooled_projection_dim"])
        dims = self.added_cond_dims(unet_config)
        return None if dims is None else dims[0]

    def added_cond(self, unet_config, image_size: tuple[int, int]) -> AddedCondInfo | None:
        """The manifest's `added_cond`: text_embeds width and the image size (h, w) pixels the runtime builds
        time_ids from; None for a family without extra inputs."""
        dims = self.added_cond_dims(unet_config)
        if dims is None:
            return None
        return AddedCondInfo(int(dims[0]), (int(image_size[0]), int(image_size[1])))

    def vae_precision(self, vae, precision: str) -> str:
        """The VAE decoder graph's precision ("fp32" | "fp16") in an export of `precision`.

        SDXL's VAE (config `force_upcast`, the default) overflows to inf/NaN in fp16 on real latents, so its
        pipelines decode in fp32; the fp16-fix SDXL VAE (force_upcast false) and SD 1.x / 2.x decode in fp16."""
        config = getattr(vae, "config", None) or {}
        return "fp32" if self.upcast_vae and precision == "fp16" and config.get("force_upcast", True) else precision


MODEL_FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("pixel", latent=False),
    Family("sd", latent=True, guidance_scale=7.5),  # the pipelines' defaults: StableDiffusionPipeline,
    Family("sdxl", latent=True, addition_embed_type="text_time", extra_inputs=UNET_ADDED_INPUTS,
           text_graph="sdxl", upcast_vae=True, guidance_scale=5.0),  # StableDiffusionXLPipeline,
    Family("pixart", latent=True, extra_inputs=(UNET_MASK_INPUT,), backbone="pixart",
           guidance_scale=4.5),  # PixArtSigmaPipeline (and Alpha),
    Family("sd3", latent=True, extra_inputs=(UNET_POOLED_INPUT,), backbone="sd3", text_graph="sd3",
           guidance_scale=7.0),  # StableDiffusion3Pipeline
)}


def get_family(name: str) -> Family:
    """The registry entry named `name` (a BaseModel's or a manifest's `family`)."""
    try:
        return MODEL_FAMILIES[name]
    except KeyError:
        raise UserError(f"unknown model family {name!r} (one of {', '.join(MODEL_FAMILIES)})") from None


def _embed_type(unet_config) -> str | None:
    return dict(unet_config or {}).get("addition_embed_type")


def detect_family(unet_config, has_vae: bool) -> Family:
    """The family of a model whose UNet has `unet_config` (diffusers config, dict or FrozenDict; {} for a module
    without one) and which has a VAE or not. Raises UserError when no family fits."""
    embed, backbone = _embed_type(unet_config), backbone_of(unet_config)
    for family in MODEL_FAMILIES.values():
        if family.latent == bool(has_vae) and family.addition_embed_type == embed and family.backbone == backbone:
            return family
    raise UserError(f"no model family has a UNet with addition_embed_type {embed!r} "
                    f"{'and' if has_vae else 'without'} a VAE (families: "
                    + ", ".join(f"{f.name}: {f.addition_embed_type!r}, {'latent' if f.latent else 'pixel space'}"
                                for f in MODEL_FAMILIES.values()) + ")")


def unet_extra_inputs(unet_config) -> tuple[str, ...]:
    """The inputs a denoiser with `unet_config` reads after (sample, timestep, encoder_hidden_states): those of the
    family of its class (a diffusion transformer) or of its addition embedding (a UNet; the same with or without
    a VAE)."""
    embed, backbone = _embed_type(unet_config), backbone_of(unet_config)
    for family in MODEL_FAMILIES.values():
        if family.backbone == backbone and (backbone != "unet" or family.addition_embed_type == embed):
            return family.extra_inputs
    raise UserError(f"unsupported UNet: addition_embed_type {embed!r} (supported: "
                    + ", ".join(sorted({repr(f.addition_embed_type) for f in MODEL_FAMILIES.values()})) + ")")
