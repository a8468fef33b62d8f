"""The dense base model a run prunes: UNet, noise scheduler, text conditioning and (for latent models) VAE.

Three on-disk layouts:
- toy / pixel space: unet/, scheduler/, text_encoder.json (token states of the packaged MiniLM);
- Stable Diffusion 1.x / 2.x: unet/, vae/, text_encoder/ (CLIPTextModel), tokenizer/ (CLIPTokenizer), scheduler/.
  Training then runs on VAE latents and the pipeline's own CLIP text states; the router always uses the
  sentence encoder (training/embeddings.py), never this text encoder;
- Stable Diffusion XL: the same plus text_encoder_2/ (CLIPTextModelWithProjection) and tokenizer_2/. The UNet
  context is both encoders' penultimate hidden states concatenated, and the UNet also reads
  `added_cond_kwargs`: the second encoder's pooled embedding (text_embeds) and time_ids = (original height,
  width, crop top, left, target height, width) per image (from the data when it records them, else the
  training resolution with no crop), as diffusers' SDXL pipeline and training script build them;
- PixArt-alpha / -Sigma (issue 25): transformer/ (PixArtTransformer2DModel) instead of unet/, text_encoder/
  (T5EncoderModel) and tokenizer/ (T5 tokenizer, `model.text_max_length` tokens: 300 for Sigma, 120 for
  alpha; default the tokenizer's model_max_length capped at 300). The context is T5's last hidden state and
  the transformer reads the caption's padding mask (`UNetCond.mask`), as PixArtSigmaPipeline builds them
  (without its caption cleaning);
- Stable Diffusion 3 / 3.5 (issue 25): transformer/ (SD3Transformer2DModel), vae/, text_encoder/ and
  text_encoder_2/ (CLIPTextModelWithProjection), tokenizer/ and tokenizer_2/, optionally text_encoder_3/ +
  tokenizer_3/ (T5; zeros without it, as the pipeline), scheduler/ (FlowMatchEulerDiscreteScheduler). The
  context is both CLIPs' penultimate states concatenated and zero-padded to T5's width, then T5's states
  (`model.text_max_length` T5 tokens, default 256); the pooled projection is both CLIPs' pooled outputs, as
  StableDiffusion3Pipeline.encode_prompt. Training uses flow matching (`FlowMatchTraining`): x_t = (1 - s) x0 +
  s noise, velocity target noise - x0, model timestep 1000 s on the scheduler's shifted training sigmas.
  Trains; does not export yet.

    base = load_base_model(cfg.model)
    x0 = base.encode_images(pixels, eps)          # pixels [B,3,H,W] in [-1,1] -> UNet-space x0
    cond = base.conditioning(captions, sizes)     # UNetCond: cond.predict(unet, x, t) (any backbone)
    ctx = base.encode_text(captions)              # [B, L, C] cross-attention context only
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from aptp_export.families import Family, detect_family, get_family
from aptp_export.unet_configs import backbone_of, denoiser_output, sd3_text_condition
from engines.errors import UserError

from .data import missing_path_message
from .text import TextEncoder
from .toy import teacher_dir

SD_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
PIXART_PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
PIXART_MAX_LENGTH = 300  # PixArt-Sigma's max_sequence_length (PixArt-alpha: 120)
SD3_T5_LENGTH = 256  # StableDiffusion3Pipeline's max_sequence_length
SD3_PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
SDXL_PARTS = ("text_encoder_2", "tokenizer_2")


@dataclass
class UNetCond:
    """Everything a UNet call reads about its batch besides sample and timestep: the cross-attention context
    [B, L, C]; for SDXL-class UNets text_embeds [B, P] and time_ids [B, 6] (`added_cond_kwargs`); for PixArt
    the caption's padding mask [B, L] (1 = a real token)."""

    context: torch.Tensor
    text_embeds: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    timestep_table: torch.Tensor | None = None  # flow matching: the model timestep (1000 sigma) per training index

    def __len__(self) -> int:
        return int(self.context.shape[0])

    def __getitem__(self, rows) -> UNetCond:
        pick = (lambda t: None if t is None else t[rows])  # noqa: E731
        return UNetCond(self.context[rows], pick(self.text_embeds), pick(self.time_ids), pick(self.mask),
                        self.timestep_table)

    def kwargs(self) -> dict:
        """Keyword arguments of a UNet's `unet(sample, timestep, **kwargs)` (UNets only; `predict` calls any
        backbone)."""
        out = {"encoder_hidden_states": self.context}
        if self.text_embeds is not None:
            out["added_cond_kwargs"] = {"text_embeds": self.text_embeds, "time_ids": self.time_ids}
        return out

    def predict(self, model, sample, timestep) -> torch.Tensor:
        """The model's prediction for this condition: UNets with `kwargs()`, PixArt transformers with the
        caption mask and without their learned-sigma half (aptp_export.unet_configs.denoiser_output)."""
        added = None if self.text_embeds is None else {"text_embeds": self.text_embeds, "time_ids": self.time_ids}
        if self.timestep_table is not None:  # training indices -> the flow model's timesteps
            timestep = self.timestep_table.to(sample.device)[timestep.long()]
        return denoiser_output(model, sample, timestep, self.context, added, self.mask)


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
    family: str = "pixel"     # aptp_export.families: "pixel" | "sd" | "sdxl" | "pixart" | "sd3"
    shift_factor: float = 0.0  # the VAE's latent shift (SD3: 0.0609), subtracted before scaling
    force_zeros_for_empty_prompt: bool = False  # SDXL pipelines: the unconditional condition is zeros
    timestep_sampling: str = "uniform"  # model.timestep_sampling: how training draws t (sample_timesteps)
    # the model's own scheduler config (scheduler/scheduler_config.json as written, prediction_type resolved):
    # what sampling uses (an export's manifest), as opposed to `scheduler`, the DDPM rebuilt for training,
    # which drops keys DDPM has no use for (set_alpha_to_one) and fills others with DDPM's defaults
    scheduler_config: dict = field(default_factory=dict)

    @property
    def family_info(self) -> Family:
        """The registry entry of the model's family (aptp_export.families)."""
        return get_family(self.family)

    @property
    def sample_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> torch.Tensor:
        return self.text_encoder.encode(list(captions))

    @torch.no_grad()
    def conditioning(self, captions: list[str], sizes: torch.Tensor | None = None) -> UNetCond:
        """The UNet's condition for a batch. sizes: int [B, 4] (original height, width, crop top, left) per
        image (training.data.collate(..., sizes=True)); None = the training resolution, no crop. Only
        SDXL-class UNets read it. With force_zeros_for_empty_prompt (SDXL) an empty caption gets zeros, the
        unconditional condition the pipeline and the runtime sample with."""
        if self.family == "pixart":
            context, mask = self.text_encoder.encode_masked(list(captions))
            return UNetCond(context, mask=mask)
        if self.family == "sd3":
            context, pooled = self.text_encoder.encode_pooled(list(captions))
            return UNetCond(context, pooled, timestep_table=self.scheduler.timesteps)
        if not self.family_info.extra_inputs:
            return UNetCond(self.encode_text(captions))
        context, pooled = self.text_encoder.encode_pooled(list(captions))
        if self.force_zeros_for_empty_prompt:  # "" (a dropped caption) is what sampling's zeros stand for
            empty = torch.tensor([c == "" for c in captions], device=context.device)
            context, pooled = context.masked_fill(empty[:, None, None], 0.0), pooled.masked_fill(empty[:, None], 0.0)
        return UNetCond(context, pooled, self.time_ids(len(captions), sizes).to(context.device))

    def sample_timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n training timestep indices (int64, in [0, num_train_timesteps), increasing with the noise): uniform,
        or with "logit_normal" (SD3's recipe, diffusers' `weighting_scheme="logit_normal"`, mean 0, std 1) the
        index of sigmoid(z), z ~ N(0, 1), which favours the middle of the schedule."""
        steps = int(self.scheduler.config.num_train_timesteps)
        if self.timestep_sampling == "logit_normal":
            u = torch.sigmoid(torch.randn((n,), generator=generator))
            return (u * steps).long().clamp_(max=steps - 1)
        return torch.randint(0, steps, (n,), generator=generator)

    def time_ids(self, batch: int, sizes: torch.Tensor | None = None) -> torch.Tensor:
        """SDXL's time_ids [B, 6] float: original (h, w), crop (top, left), target (h, w) = the training size."""
        s = self.image_size
        if sizes is None:
            sizes = torch.tensor([[s, s, 0, 0]] * batch)
        target = torch.tensor([[s, s]] * batch)
        return torch.cat([sizes.reshape(batch, 4).long(), target], dim=1).float()

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        """pixels [B, 3, H, W] in [-1, 1] -> x0 in the UNet's space. For latent models a sample of the VAE
        posterior, mean + std * eps (eps [B, C, h, w]; None = the mean), times the scaling factor."""
        if self.vae is None:
            return pixels
        dist = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        lat = dist.mean if eps is None else dist.mean + dist.std * eps.to(dist.mean)
        return (lat.float() - self.shift_factor) * self.scaling_factor

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

    def _ids(self, tok, captions):
        return tok(list(captions), padding="max_length", truncation=True, max_length=self.max_length,
                   return_tensors="pt").input_ids.to(self.device)

    @torch.no_grad()
    def encode(self, captions):
        return self.model(self._ids(self.tokenizer, captions))[0].float()


class _SdxlClipTokens(_ClipTokens):
    """SDXL conditioning, as StableDiffusionXLPipeline.encode_prompt without clip_skip: both CLIP encoders'
    penultimate hidden states concatenated ([B, L, E1 + E2]) and the second's projected pooled output."""

    def __init__(self, path: Path, max_length: int | None, device):
        super().__init__(path, max_length, device)
        self.tokenizer_2 = CLIPTokenizer.from_pretrained(str(path / "tokenizer_2"), local_files_only=True)
        self.model_2 = CLIPTextModelWithProjection.from_pretrained(str(path / "text_encoder_2"), local_files_only=True)
        self.model_2.to(device).eval().requires_grad_(False)

    @torch.no_grad()
    def encode_pooled(self, captions):
        h1 = self.model(self._ids(self.tokenizer, captions), output_hidden_states=True).hidden_states[-2]
        out2 = self.model_2(self._ids(self.tokenizer_2, captions), output_hidden_states=True)
        return torch.cat([h1, out2.hidden_states[-2]], dim=-1).float(), out2.text_embeds.float()

    def encode(self, captions):
        return self.encode_pooled(captions)[0]


def t5_fast_tokenizer(tokenizer_dir: Path):
    """The T5 tokenizer of a pipeline's tokenizer/ as a fast tokenizer: from its tokenizer.json, or converted
    from its spiece.model, which needs the sentencepiece package (the official PixArt repositories ship only
    spiece.model); a UserError names the fix when it is missing."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True, use_fast=True)
    except (ImportError, ValueError, OSError) as e:
        raise UserError(f"{tokenizer_dir}: cannot load the T5 tokenizer ({str(e).strip().splitlines()[0][:200]}); "
                        "a tokenizer/ with only spiece.model needs `pip install sentencepiece` once (the train "
                        "extra has it; or save a tokenizer.json there with T5TokenizerFast.save_pretrained)") from None
    if not getattr(tok, "is_fast", False):
        raise UserError(f"{tokenizer_dir}: no fast T5 tokenizer could be built (install sentencepiece)")
    return tok


class _T5Tokens:
    """PixArt conditioning, as PixArtSigmaPipeline.encode_prompt with clean_caption=False: T5 tokens padded to
    `max_length`, T5EncoderModel's last hidden state computed with the attention mask, and the mask itself
    (the transformer masks padded tokens in its cross-attention)."""

    def __init__(self, path: Path, max_length: int | None, device):
        from transformers import T5EncoderModel

        self.tokenizer = t5_fast_tokenizer(path / "tokenizer")
        self.model = T5EncoderModel.from_pretrained(str(path / "text_encoder"), local_files_only=True).to(device)
        self.model.eval().requires_grad_(False)
        self.max_length = int(max_length or min(self.tokenizer.model_max_length, PIXART_MAX_LENGTH))
        self.device = device

    @torch.no_grad()
    def encode_masked(self, captions):
        tok = self.tokenizer(list(captions), padding="max_length", max_length=self.max_length, truncation=True,
                             add_special_tokens=True, return_tensors="pt")
        mask = tok.attention_mask.to(self.device)
        return self.model(tok.input_ids.to(self.device), attention_mask=mask)[0].float(), mask

    def encode(self, captions):
        return self.encode_masked(captions)[0]


class _Sd3Tokens:
    """SD3 conditioning, as StableDiffusion3Pipeline.encode_prompt (no clip_skip): CLIP-L and CLIP-G penultimate
    states concatenated and zero-padded to T5's width, followed by T5's last hidden state (no mask; zeros
    without text_encoder_3); pooled = both CLIPs' projected pooled outputs concatenated."""

    def __init__(self, path: Path, max_length: int | None, joint_dim: int, device):
        from transformers import T5EncoderModel

        def clip(i):
            sub = "" if i == 1 else f"_{i}"
            tok = CLIPTokenizer.from_pretrained(str(path / f"tokenizer{sub}"), local_files_only=True)
            enc = CLIPTextModelWithProjection.from_pretrained(str(path / f"text_encoder{sub}"), local_files_only=True)
            return tok, enc.to(device).eval().requires_grad_(False)

        (self.tokenizer, self.model), (self.tokenizer_2, self.model_2) = clip(1), clip(2)
        self.t5_length = int(max_length or SD3_T5_LENGTH)
        self.tokenizer_3 = self.model_3 = None
        if (path / "text_encoder_3").is_dir():
            self.tokenizer_3 = t5_fast_tokenizer(path / "tokenizer_3")
            self.model_3 = T5EncoderModel.from_pretrained(str(path / "text_encoder_3"), local_files_only=True)
            self.model_3.to(device).eval().requires_grad_(False)
        self.joint_dim = int(joint_dim)
        self.clip_length = int(self.tokenizer.model_max_length)
        self.max_length = self.clip_length + self.t5_length  # the context's tokens
        self.device = device

    def _ids(self, tok, captions, length):
        return tok(list(captions), padding="max_length", max_length=length, truncation=True,
                   return_tensors="pt").input_ids.to(self.device)

    @torch.no_grad()
    def encode_pooled(self, captions):
        ids = (self._ids(self.tokenizer, captions, self.clip_length),
               self._ids(self.tokenizer_2, captions, self.clip_length),
               None if self.model_3 is None else self._ids(self.tokenizer_3, captions, self.t5_length))
        context, pooled = sd3_text_condition((self.model, self.model_2, self.model_3), ids, self.joint_dim,
                                             self.t5_length)
        return context.float(), pooled.float()

    def encode(self, captions):
        return self.encode_pooled(captions)[0]


class FlowMatchTraining:
    """The training side of rectified-flow models (SD3), with the DDPM scheduler's interface the training code
    uses: t is an index into the scheduler's 1000 training steps; `add_noise(x0, noise, t)` = (1 - s_t) x0 +
    s_t noise with the shifted sigmas of FlowMatchEulerDiscreteScheduler (diffusers' SD3 training script);
    `timesteps[t]` = 1000 s_t is what the transformer reads (UNetCond.timestep_table); the target is
    noise - x0 (training.losses, prediction_type "flow_prediction")."""

    def __init__(self, config: dict):
        from diffusers import FlowMatchEulerDiscreteScheduler

        self._sched = FlowMatchEulerDiscreteScheduler.from_config(config)
        self.config = self._sched.config
        # the training schedule, increasing in noise with the index (diffusers stores it decreasing)
        self.sigmas = self._sched.sigmas.flip(0).float()
        self.timesteps = self._sched.timesteps.flip(0).float()

    def add_noise(self, x0, noise, t):
        s = self.sigmas.to(x0.device)[t.long()].reshape(-1, *([1] * (x0.ndim - 1)))
        return (1.0 - s) * x0 + s * noise


def _force_zeros(path: Path) -> bool:
    """SDXL pipelines' `force_zeros_for_empty_prompt` from model_index.json (diffusers' default: true)."""
    index = path / "model_index.json"
    if index.is_file():
        try:
            return bool(json.loads(index.read_text()).get("force_zeros_for_empty_prompt", True))
        except json.JSONDecodeError:
            raise UserError(f"{index}: not valid JSON") from None
    return True


def detect_layout(path: Path) -> str:
    """'latent' (Stable Diffusion layout), 'transformer' (PixArt), 'sd3', 'pixel' (toy layout) or raise
    UserError naming what is missing."""
    if not path.is_dir():
        raise UserError(missing_path_message("model", path))
    if (path / "transformer").is_dir():
        cfg_file = path / "transformer" / "config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        cls = cfg.get("_class_name")
        try:
            backbone = backbone_of(cfg) if cls else None
        except UserError:
            backbone = None
        if backbone == "sd3":
            missing = [p for p in SD3_PARTS if not (path / p).is_dir()]
            if missing:
                raise UserError(f"{path}: a Stable Diffusion 3 pipeline directory but it lacks "
                                f"{', '.join(m + '/' for m in missing)} (text_encoder_3/ + tokenizer_3/ are optional)")
            return "sd3"
        missing = [p for p in PIXART_PARTS if not (path / p).is_dir()]
        if backbone != "pixart" or missing:  # backbone_of also reads PixArt's legacy class name
            raise UserError(f"{path}: a transformer pipeline directory ({cls or 'no transformer/config.json'}); "
                            f"supported: PixArt (transformer/ vae/ text_encoder/ tokenizer/ scheduler/)"
                            + (f", it lacks {', '.join(m + '/' for m in missing)}" if missing else ""))
        return "transformer"
    if (path / "vae").is_dir():
        missing = [p for p in SD_PARTS if not (path / p).is_dir()]
        if missing:
            raise UserError(f"{path}: a Stable Diffusion pipeline directory (it has vae/) but it lacks "
                            f"{', '.join(m + '/' for m in missing)}; expected unet/ vae/ text_encoder/ tokenizer/ "
                            "scheduler/ (`aptp config show sd21_coco_base` prints the layouts)")
        if any((path / p).is_dir() for p in SDXL_PARTS):
            missing = [p for p in SDXL_PARTS if not (path / p).is_dir()]
            if missing:
                raise UserError(f"{path}: a Stable Diffusion XL pipeline directory but it lacks "
                                f"{', '.join(m + '/' for m in missing)}; expected also text_encoder_2/ tokenizer_2/ "
                                "(`aptp config show sdxl_coco_base` prints the layout)")
        return "latent"
    missing = [p for p in ("unet", "scheduler") if not (path / p).is_dir()]
    if missing:
        raise UserError(f"{path}: not a model directory: it lacks {' and '.join(m + '/' for m in missing)}. Expected a "
                        "Stable Diffusion pipeline (unet/ vae/ text_encoder/ tokenizer/ scheduler/) or the toy layout "
                        "(unet/ scheduler/ text_encoder.json); `aptp config show sd21_coco_base` prints the layouts")
    if not (path / "text_encoder.json").is_file():
        raise UserError(f"{path}: pixel-space model without text_encoder.json (how its captions are encoded)")
    return "pixel"


BUILTIN_TEACHERS = {"builtin:toy-teacher": "v1", "builtin:toy-teacher-v2": "v2"}  # model.path names


def resolve_model_path(path: str | None) -> Path:
    if path in BUILTIN_TEACHERS:
        return teacher_dir(BUILTIN_TEACHERS[path])
    if path is None:

        d = teacher_dir()
        if not (d / "unet").is_dir():
            raise UserError(f"the built-in toy teacher is not present in {d}; set model.path")
        return d
    return Path(os.path.expanduser(path))


def load_base_model(mcfg, device="cpu") -> BaseModel:
    """Load the dense model described by a ModelConfig (training/config.py). Weights are frozen (eval mode)."""
    base = _load_base_model(mcfg, device)
    base.timestep_sampling = getattr(mcfg, "timestep_sampling", "uniform")
    return base


def _load_base_model(mcfg, device) -> BaseModel:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = resolve_model_path(mcfg.path)
    kind = detect_layout(path)
    device = torch.device(device)
    if kind == "sd3":
        return _load_sd3(path, mcfg, device)
    if kind == "transformer":
        from diffusers import PixArtTransformer2DModel

        unet = PixArtTransformer2DModel.from_pretrained(str(path), subfolder="transformer", local_files_only=True)
    else:
        unet = UNet2DConditionModel.from_pretrained(str(path), subfolder="unet", local_files_only=True)
    unet = unet.to(device)
    unet.eval().requires_grad_(False)
    file_cfg = dict(DDPMScheduler.load_config(str(path), subfolder="scheduler", local_files_only=True))
    scheduler = DDPMScheduler.from_config({k: v for k, v in file_cfg.items() if k != "set_alpha_to_one"})
    prediction_type = mcfg.prediction_type or scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise UserError(f"{path}/scheduler: unsupported prediction_type {prediction_type!r} (epsilon or v_prediction)")
    sampling_cfg = {**file_cfg, "prediction_type": prediction_type}
    if kind == "transformer":
        vae, factor, image_size = _load_vae(path, mcfg, unet, device)
        family = detect_family(unet.config, has_vae=True)
        text = _T5Tokens(path, mcfg.text_max_length, device)
        return BaseModel(path, "latent", unet, scheduler, prediction_type, image_size, image_size // factor,
                         text.max_length, text, vae, int(vae.config.latent_channels),
                         float(vae.config.scaling_factor), family=family.name, scheduler_config=sampling_cfg)
    if kind == "latent":
        vae, factor, image_size = _load_vae(path, mcfg, unet, device)
        family = detect_family(unet.config, has_vae=True)  # decided once, here (aptp_export/families.py)
        xl = family.second_text_encoder
        if xl != (path / "text_encoder_2").is_dir():
            raise UserError(f"{path}: " + ("the UNet reads SDXL's text_embeds/time_ids but there is no "
                                           "text_encoder_2/" if xl else "text_encoder_2/ is there but the UNet "
                                           "does not read text_embeds/time_ids"))
        text = (_SdxlClipTokens if xl else _ClipTokens)(path, mcfg.text_max_length, device)
        return BaseModel(path, kind, unet, scheduler, prediction_type, image_size, image_size // factor,
                         text.max_length, text, vae, int(vae.config.latent_channels),
                         float(vae.config.scaling_factor), family=family.name,
                         force_zeros_for_empty_prompt=xl and _force_zeros(path), scheduler_config=sampling_cfg)
    te = json.loads((path / "text_encoder.json").read_text())
    if te.get("type") != "token_states":
        raise UserError(f"{path}/text_encoder.json: unsupported type {te.get('type')!r} (token_states)")
    max_len = int(mcfg.text_max_length or te.get("max_length", 16))
    text = _MiniLMTokens(max_len, device)
    image_size = int(mcfg.resolution or unet.config.sample_size)
    return BaseModel(path, kind, unet, scheduler, prediction_type, image_size, image_size, max_len, text,
                     family=detect_family(unet.config, has_vae=False).name, scheduler_config=sampling_cfg)


def _load_vae(path: Path, mcfg, unet, device):
    """(frozen VAE, its down-sampling factor, the training image size: model.resolution, else the denoiser's
    sample size in pixels) of a latent model directory."""
    vae = AutoencoderKL.from_pretrained(str(path), subfolder="vae", local_files_only=True).to(device)
    vae.eval().requires_grad_(False)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    image_size = int(mcfg.resolution or unet.config.sample_size * factor)
    if image_size % factor:
        raise UserError(f"model.resolution {image_size} must be a multiple of the VAE factor {factor}")
    return vae, factor, image_size


def _load_sd3(path: Path, mcfg, device) -> BaseModel:
    """An SD3 pipeline directory (module doc): the transformer, the VAE with its latent shift, the three text
    encoders, and flow-matching training on the scheduler's shifted sigmas."""
    from diffusers import SD3Transformer2DModel

    unet = SD3Transformer2DModel.from_pretrained(str(path), subfolder="transformer", local_files_only=True)
    unet = unet.to(device).eval().requires_grad_(False)
    file_cfg = dict(DDPMScheduler.load_config(str(path), subfolder="scheduler", local_files_only=True))
    if not str(file_cfg.get("_class_name", "")).startswith("FlowMatch"):
        raise UserError(f"{path}/scheduler: an SD3 model needs a FlowMatch scheduler config, got "
                        f"{file_cfg.get('_class_name')!r}")
    if mcfg.prediction_type not in (None, "flow_prediction"):
        raise UserError(f"model.prediction_type {mcfg.prediction_type!r}: an SD3 model predicts the flow "
                        "velocity (leave it null)")
    vae, factor, image_size = _load_vae(path, mcfg, unet, device)
    family = detect_family(unet.config, has_vae=True)
    text = _Sd3Tokens(path, mcfg.text_max_length, unet.config.joint_attention_dim, device)
    return BaseModel(path, "latent", unet, FlowMatchTraining(file_cfg), "flow_prediction", image_size,
                     image_size // factor, text.max_length, text, vae, int(vae.config.latent_channels),
                     float(vae.config.scaling_factor), family=family.name, scheduler_config=file_cfg,
                     shift_factor=float(vae.config.shift_factor or 0.0))
