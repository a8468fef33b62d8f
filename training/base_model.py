"""The dense base model a run prunes: UNet, noise scheduler, text conditioning and (for latent models) VAE.

Two on-disk layouts:
- toy / pixel space: unet/, scheduler/, text_encoder.json (token states of the packaged MiniLM);
- Stable Diffusion: unet/, vae/, text_encoder/ (CLIPTextModel), tokenizer/ (CLIPTokenizer), scheduler/.
  Training then runs on VAE latents and the pipeline's own CLIP text states; the router always uses the
  sentence encoder (training/embeddings.py), never this text encoder.

    base = load_base_model(cfg.model)
    x0 = base.encode_images(pixels, eps)          # pixels [B,3,H,W] in [-1,1] -> UNet-space x0
    ctx = base.encode_text(captions)              # [B, L, C] cross-attention context
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from engines.errors import UserError

from .text import TextEncoder
from .toy import teacher_dir

SD_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass
class BaseModel:
    path: Path
    kind: str                 # "pixel" | "latent"
    unet: torch.nn.Module
    scheduler: object         # diffusers DDPMScheduler (training noise schedule)
    prediction_type: str
    image_size: int           # pixels
    sample_size: int          # UNet input side (latent side for latent models)
    text_len: int             # tokens of the cross-attention context
    text_encoder: object      # .encode(captions) -> [B, L, C]
    vae: torch.nn.Module | None = None
    latent_channels: int = 0
    scaling_factor: float = 1.0
    # the model's own scheduler config (scheduler/scheduler_config.json as written, prediction_type resolved):
    # what sampling uses (an export's manifest), as opposed to `scheduler`, the DDPM rebuilt for training,
    # which drops keys DDPM has no use for (set_alpha_to_one) and fills others with DDPM's defaults
    scheduler_config: dict = field(default_factory=dict)

    @property
    def sample_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> torch.Tensor:
        return self.text_encoder.encode(list(captions))

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        """pixels [B, 3, H, W] in [-1, 1] -> x0 in the UNet's space. For latent models a sample of the VAE
        posterior, mean + std * eps (eps [B, C, h, w]; None = the mean), times the scaling factor."""
        if self.vae is None:
            return pixels
        dist = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        lat = dist.mean if eps is None else dist.mean + dist.std * eps.to(dist.mean)
        return lat.float() * self.scaling_factor

    def latent_shape(self) -> tuple[int, int, int]:
        return (self.sample_channels, self.sample_size, self.sample_size)


class _MiniLMTokens:
    """Toy conditioning: last hidden states of the packaged MiniLM (training.text.TextEncoder)."""

    def __init__(self, max_length: int, device):
        self.enc = TextEncoder(max_length=max_length, device=device)

    def encode(self, captions):
        return self.enc.token_states(captions)


class _ClipTokens:
    """Stable Diffusion conditioning: CLIPTokenizer + CLIPTextModel last hidden state (as the pipelines)."""

    def __init__(self, path: Path, max_length: int | None, device):
        self.tokenizer = CLIPTokenizer.from_pretrained(str(path / "tokenizer"), local_files_only=True)
        self.model = CLIPTextModel.from_pretrained(str(path / "text_encoder"), local_files_only=True).to(device).eval()
        self.model.requires_grad_(False)
        self.max_length = int(max_length or self.tokenizer.model_max_length)
        self.device = device

    @torch.no_grad()
    def encode(self, captions):
        ids = self.tokenizer(list(captions), padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt").input_ids.to(self.device)
        return self.model(ids)[0].float()


def detect_layout(path: Path) -> str:
    """'latent' (Stable Diffusion layout), 'pixel' (toy layout) or raise UserError naming what is missing."""
    if not path.is_dir():
        raise UserError(f"model directory not found: {path}")
    if (path / "vae").is_dir():
        missing = [p for p in SD_PARTS if not (path / p).is_dir()]
        if missing:
            raise UserError(f"{path}: Stable Diffusion layout is missing {', '.join(missing)}/")
        return "latent"
    missing = [p for p in ("unet", "scheduler") if not (path / p).is_dir()]
    if missing:
        raise UserError(f"{path}: not a model directory (missing {', '.join(missing)}/; expected unet/, scheduler/ and "
                        "text_encoder.json, or the Stable Diffusion layout with vae/, text_encoder/, tokenizer/)")
    if not (path / "text_encoder.json").is_file():
        raise UserError(f"{path}: pixel-space model without text_encoder.json (how its captions are encoded)")
    return "pixel"


def resolve_model_path(path: str | None) -> Path:
    if path is None:

        d = teacher_dir()
        if not (d / "unet").is_dir():
            raise UserError(f"the built-in toy teacher is not present in {d}; set model.path")
        return d
    return Path(os.path.expanduser(path))


def load_base_model(mcfg, device="cpu") -> BaseModel:
    """Load the dense model described by a ModelConfig (training/config.py). Weights are frozen (eval mode)."""

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = resolve_model_path(mcfg.path)
    kind = detect_layout(path)
    device = torch.device(device)
    unet = UNet2DConditionModel.from_pretrained(str(path), subfolder="unet", local_files_only=True).to(device)
    unet.eval().requires_grad_(False)
    file_cfg = dict(DDPMScheduler.load_config(str(path), subfolder="scheduler", local_files_only=True))
    scheduler = DDPMScheduler.from_config({k: v for k, v in file_cfg.items() if k != "set_alpha_to_one"})
    prediction_type = mcfg.prediction_type or scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise UserError(f"{path}/scheduler: unsupported prediction_type {prediction_type!r} (epsilon or v_prediction)")
    sampling_cfg = {**file_cfg, "prediction_type": prediction_type}
    if kind == "latent":

        vae = AutoencoderKL.from_pretrained(str(path), subfolder="vae", local_files_only=True).to(device)
        vae.eval().requires_grad_(False)
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        text = _ClipTokens(path, mcfg.text_max_length, device)
        image_size = int(mcfg.resolution or unet.config.sample_size * factor)
        if image_size % factor:
            raise UserError(f"model.resolution {image_size} must be a multiple of the VAE factor {factor}")
        return BaseModel(path, kind, unet, scheduler, prediction_type, image_size, image_size // factor,
                         text.max_length, text, vae, int(vae.config.latent_channels),
                         float(vae.config.scaling_factor), scheduler_config=sampling_cfg)
    te = json.loads((path / "text_encoder.json").read_text())
    if te.get("type") != "token_states":
        raise UserError(f"{path}/text_encoder.json: unsupported type {te.get('type')!r} (token_states)")
    max_len = int(mcfg.text_max_length or te.get("max_length", 16))
    text = _MiniLMTokens(max_len, device)
    image_size = int(mcfg.resolution or unet.config.sample_size)
    return BaseModel(path, kind, unet, scheduler, prediction_type, image_size, image_size, max_len, text,
                     scheduler_config=sampling_cfg)
