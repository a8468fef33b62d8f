"""The packaged configs and the layouts they expect, for `aptp prune --help` and `aptp config`.

Light on purpose (reads the YAML files' leading comments, imports no torch): argument definitions use it.

    catalog()            # [(name, one-line description)] of training/configs/*.yaml
    show("sd21_coco_base")   # the YAML text, then the model and data layouts it needs
"""

from __future__ import annotations

from pathlib import Path

from engines.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
PLACEHOLDER = "/path/to/"  # what the packaged configs write where a user's path goes

MODEL_LAYOUTS = {
    "toy": """\
model.path: null = the built-in toy teacher; or a directory in the toy layout:
  unet/                  diffusers UNet2DConditionModel (config.json + weights), pixel space
  scheduler/             diffusers scheduler config
  text_encoder.json      how captions are encoded (the packaged MiniLM, its token length)
  sampling.json          optional: recommended steps, guidance scale, scheduler""",
    "sd": """\
model.path: a Stable Diffusion 1.x / 2.x pipeline directory (diffusers' save_pretrained layout):
  unet/  vae/  text_encoder/  tokenizer/  scheduler/   (model_index.json optional)""",
    "sdxl": """\
model.path: a Stable Diffusion XL base pipeline directory (diffusers' save_pretrained layout):
  unet/  vae/  text_encoder/  tokenizer/  text_encoder_2/  tokenizer_2/  scheduler/   (model_index.json:
  force_zeros_for_empty_prompt is read when present)""",
    "pixart": """\
model.path: a PixArt-alpha / PixArt-Sigma pipeline directory (diffusers' save_pretrained layout):
  transformer/  vae/  text_encoder/ (T5EncoderModel)  tokenizer/ (T5)  scheduler/   (model_index.json optional)""",
    "sd3": """\
model.path: a Stable Diffusion 3 / 3.5 pipeline directory (diffusers' save_pretrained layout):
  transformer/  vae/  text_encoder/  text_encoder_2/ (CLIPTextModelWithProjection)  tokenizer/  tokenizer_2/
  scheduler/ (FlowMatchEulerDiscreteScheduler); text_encoder_3/ + tokenizer_3/ (T5) optional""",
}

DATA_LAYOUT = """\
data.type: imagefolder (data.path = a directory):
  metadata.jsonl         one JSON object per line: {"file_name": "0001.jpg", "text": "a caption"}
                         (file_name relative to the directory; data.text_column names the caption key)
  0001.jpg ...           the images (any size: resized on the shorter side and centre-cropped)
data.type: hf (data.path = a Hugging Face dataset saved with save_to_disk, or a hub name with the `data`
  extra and a local cache; data.split, data.image_column, data.text_column)
data.type: toy (the built-in procedural world; data.num_samples, data.toy_seed, data.toy_world)"""


_MODELS = {"sd15": "SD 1.5", "sd21": "SD 2.1", "sdxl": "SDXL", "pixa": "PixArt-Sigma", "sd3_": "SD3"}


def _description(path: Path) -> str:
    """One line: the model, the config's own title (its leading comment up to the first colon or sentence
    end), the MACs budget and the number of experts."""
    import yaml

    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    title = " ".join(lines).split(": ")[0].split(". ")[0].split(" (")[0].rstrip(".:") or "(no description)"
    cfg = yaml.safe_load(path.read_text()) or {}
    budget = (cfg.get("prune") or {}).get("budget")
    k = (cfg.get("router") or {}).get("num_experts")
    model = _MODELS.get(path.stem[:4], "toy")
    return f"{model}: {title}; budget {budget}, {k} experts"


def catalog() -> list[tuple[str, str]]:
    """(name, one-line description) of every packaged config, sorted by name."""
    return [(p.stem, _description(p)) for p in sorted(CONFIG_DIR.glob("*.yaml"))]


def catalog_text(width: int = 100) -> str:
    rows = catalog()
    pad = max(len(n) for n, _ in rows) + 2
    out = []
    for name, desc in rows:
        line = f"  {name:<{pad}}{desc}"
        out.append(line if len(line) <= width else line[:width - 3] + "...")
    return "\n".join(out)


def family_of(text: str) -> str:
    if "text_encoder_3" in text or "stable-diffusion-3" in text:
        return "sd3"
    if "pixart" in text.split("\n", 30)[0].lower() or "transformer/" in text:
        return "pixart"
    if "sdxl" in text.split("\n", 30)[0].lower() or "text_encoder_2" in text:
        return "sdxl"
    if PLACEHOLDER in text:
        return "sd"
    return "toy"


def show(name: str) -> str:
    """The packaged config `name` (or a YAML file path) followed by the layouts its paths must have."""
    path = Path(name)
    if not path.is_file():
        path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"no packaged config {name!r} (known: {', '.join(n for n, _ in catalog())})")
    text = path.read_text()
    fam = ("sdxl" if path.stem.startswith("sdxl") else "sd3" if path.stem.startswith("sd3_")
           else "sd" if path.stem.startswith("sd") else "pixart" if path.stem.startswith("pixart")
           else family_of(text))
    hint = ""
    if PLACEHOLDER in text:
        hint = ("\n# Replace the /path/to/ placeholders on the command line, e.g.\n"
                f"#   aptp prune --config {path.stem} --set model.path=/models/... --set data.path=/data/...\n")
    return (f"# --- {path} ---\n{text.rstrip()}\n{hint}\n# --- the model directory ---\n{MODEL_LAYOUTS[fam]}\n\n"
            f"# --- the data ---\n{DATA_LAYOUT}\n")
