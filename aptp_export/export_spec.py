"""One export spec per model: input/output names, dynamic axes, sample inputs, shape profile.

The same `ExportSpec` drives `torch.onnx.export` (names, `dynamic_axes` or `dynamic_shapes`, the
sample input it traces with), the check of the ONNX graph against torch (fresh inputs of other
sizes), and the TensorRT optimisation profile (min/opt/max shape of every input), as in
TensorRT's Diffusion demo. Tensor names and dtypes are the runtime's contract
(`engines.manifest`: UNET_INPUTS, ...).

Shapes are tuples of ints (static) and axis names (dynamic); an `Axis` gives the min/opt/max of a
dynamic axis and the multiple its sizes must be (UNet height/width: a multiple of the total
downsampling factor, otherwise the skip connections do not line up).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from engines.denoise import DEFAULT_BATCH_SIZE, unet_batch
from engines.errors import UserError
from engines.manifest import (
    ROUTER_INPUTS,
    ROUTER_OUTPUTS,
    TEXT_ENCODER_INPUT_2,
    TEXT_ENCODER_INPUT_3,
    TEXT_ENCODER_INPUTS,
    TEXT_ENCODER_OUTPUTS,
    TEXT_ENCODER_POOLED,
    UNET_ADDED_INPUTS,
    UNET_INPUTS,
    UNET_MASK_INPUT,
    UNET_POOLED_INPUT,
    UNET_OUTPUTS,
    VAE_DECODER_INPUTS,
    VAE_DECODER_OUTPUTS,
)

DTYPES = ("float32", "int64")
FILLS = ("normal", "timestep", "tokens", "mask")


@dataclass(frozen=True)
class Axis:
    """A dynamic axis: sizes in [min, max]; `opt` is what TensorRT tunes its kernels for; `trace` the size
    the ONNX export traces with (default `opt`; a UNet traces at a small batch, which gives the same graph
    at a fraction of the memory)."""

    name: str
    min: int
    opt: int
    max: int
    multiple_of: int = 1
    trace: int = 0  # 0: opt

    @property
    def traced(self) -> int:
        return self.trace or self.opt

    def __post_init__(self):
        if not 1 <= self.min <= self.opt <= self.max:
            raise UserError(f"axis {self.name}: need 1 <= min <= opt <= max, got {self.min}, {self.opt}, {self.max}")
        if self.multiple_of < 1 or any(v % self.multiple_of for v in (self.min, self.opt, self.max)):
            raise UserError(f"axis {self.name}: min/opt/max must be multiples of {self.multiple_of}")
        if self.trace and not (self.min <= self.trace <= self.max and self.trace % self.multiple_of == 0):
            raise UserError(f"axis {self.name}: trace size {self.trace} is outside [{self.min}, {self.max}]")

    def check(self, size: int) -> int:
        if not self.min <= size <= self.max or size % self.multiple_of:
            raise UserError(f"axis {self.name}: size {size} is outside [{self.min}, {self.max}] "
                            f"or not a multiple of {self.multiple_of}")
        return size


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. `fill` says how sample values are drawn: "normal" N(0,1),
    "timestep" uniform floats in [0, high), "tokens" ints in [0, high), "mask" a right-padded 0/1
    mask with at least one 1 per row."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str = "float32"
    fill: str = "normal"
    high: int | None = None

    def __post_init__(self):
        if self.dtype not in DTYPES or self.fill not in FILLS:
            raise UserError(f"tensor {self.name}: bad dtype/fill {self.dtype}/{self.fill}")


@dataclass(frozen=True)
class ExportSpec:
    """Everything export, verification and engine building need to know about one model's graph."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    axes: dict[str, Axis] = field(default_factory=dict)

    def __post_init__(self):
        for t in (*self.inputs, *self.outputs):
            for d in t.shape:
                if isinstance(d, str) and d not in self.axes:
                    raise UserError(f"{self.name}: tensor {t.name} uses undeclared axis {d!r}")

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def sizes(self, which: str = "traced", **override: int) -> dict[str, int]:
        """Axis sizes: each axis' `which` ("min" | "opt" | "max" | "traced") value, overrides checked."""
        sizes = {name: getattr(ax, which) for name, ax in self.axes.items()}
        for name, v in override.items():
            if name not in self.axes:
                raise UserError(f"{self.name}: no axis {name!r} (axes: {', '.join(self.axes)})")
            sizes[name] = self.axes[name].check(int(v))
        return sizes

    def shape(self, tensor: TensorSpec, sizes: dict[str, int]) -> tuple[int, ...]:
        return tuple(sizes[d] if isinstance(d, str) else d for d in tensor.shape)

    def sample_inputs(self, sizes: dict[str, int] | None = None, seed: int = 0) -> tuple:
        """Random torch tensors for every input (in order), from a seeded generator."""

        sizes = sizes or self.sizes()
        g = torch.Generator().manual_seed(seed)
        out = []
        for t in self.inputs:
            shape = self.shape(t, sizes)
            if t.fill == "normal":
                x = torch.randn(shape, generator=g)
            elif t.fill == "timestep":
                x = torch.rand(shape, generator=g) * (t.high or 1000)
            elif t.fill == "tokens":
                x = torch.randint(0, t.high or 2, shape, generator=g)
            else:  # mask: right padding, at least one token per row
                lengths = torch.randint(1, shape[-1] + 1, shape[:-1], generator=g)
                x = (torch.arange(shape[-1]) < lengths[..., None]).long()
            out.append(x.to(torch.int64 if t.dtype == "int64" else torch.float32))
        return tuple(out)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """`dynamic_axes` for the TorchScript exporter (inputs and outputs)."""
        return {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
                for t in (*self.inputs, *self.outputs) if any(isinstance(d, str) for d in t.shape)}

    def dynamic_shapes(self) -> tuple[dict, ...]:
        """`dynamic_shapes` for the torch.export-based exporter: one {dim: Dim} per input, positionally
        (so the forward's argument names need not match the tensor names)."""

        dims = {}
        for name, ax in self.axes.items():
            m = ax.multiple_of
            base = torch.export.Dim(name, min=max(1, ax.min // m), max=ax.max // m)
            dims[name] = base * m if m > 1 else base
        return tuple({i: dims[d] for i, d in enumerate(t.shape) if isinstance(d, str)} for t in self.inputs)

    def profile(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """TensorRT optimisation profile: input name -> (min shape, opt shape, max shape)."""
        lo, opt, hi = self.sizes("min"), self.sizes("opt"), self.sizes("max")
        return {t.name: (self.shape(t, lo), self.shape(t, opt), self.shape(t, hi)) for t in self.inputs}

    def to_dict(self) -> dict:
        """JSON-ready description (written next to the exported graph)."""
        return {
            "name": self.name,
            "inputs": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in self.inputs],
            "outputs": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in self.outputs],
            "axes": {n: {"min": a.min, "opt": a.opt, "max": a.max, "multiple_of": a.multiple_of, "trace": a.traced}
                     for n, a in self.axes.items()},
        }


# -- the four models ---------------------------------------------------------------------------
def _batch(name: str, batch: tuple[int, int, int], trace: int = 0) -> Axis:
    return Axis(name, *batch, trace=min(trace, batch[2]) if trace else 0)


def unet_batch_range(max_prompts: int, opt_prompts: int = DEFAULT_BATCH_SIZE) -> tuple[int, int, int]:
    """(min, opt, max) UNet batch of the profile for at most `max_prompts` prompts per call, tuned for the
    runtime's default call (`opt_prompts`, `engines.denoise.DEFAULT_BATCH_SIZE`): with classifier-free
    guidance a call of B prompts is a UNet batch of 2B (`engines.denoise.unet_batch`)."""
    hi = unet_batch(max_prompts, guidance_scale=2.0)
    return 1, min(unet_batch(opt_prompts, guidance_scale=2.0), hi), hi


def unet_spec(in_channels: int, sample_size: tuple[int, int], text_len: int, context_dim: int,
              batch: tuple[int, int, int] = unet_batch_range(DEFAULT_BATCH_SIZE), out_channels: int | None = None,
              size_range: tuple[int, int] | None = None, size_multiple: int = 8,
              num_train_timesteps: int = 1000, text_embeds_dim: int | None = None,
              time_ids_dim: int = 6, time_ids_high: int = 2048) -> ExportSpec:
    """UNet: (sample [N,C,H,W], timestep [N] float, encoder_hidden_states [N,L,E]) -> out_sample; with
    `text_embeds_dim` (SDXL-class UNets) two more inputs, text_embeds [N, text_embeds_dim] (pooled text
    embedding) and time_ids [N, time_ids_dim] (original size, crop top-left, target size; sample values are
    drawn in [0, time_ids_high) pixels, so the export check sees the magnitudes SDXL feeds).

    `batch` is (min, opt, max) of the UNet batch N (= 2 x prompts with CFG; `unet_batch_range`); the
    graph is traced at batch 2. Height and width are
    dynamic axes with opt = sample_size and [min, max] = `size_range` (default: sample_size only),
    multiples of `size_multiple` (2 ** number of downsamplings)."""
    h, w = sample_size
    lo, hi = size_range or (min(h, w), max(h, w))
    m = size_multiple
    axes = {
        "batch": _batch("batch", batch, trace=2),
        "height": Axis("height", min(lo, h), h, max(hi, h), m),
        "width": Axis("width", min(lo, w), w, max(hi, w), m),
    }
    return ExportSpec(
        name="unet",
        inputs=(
            TensorSpec(UNET_INPUTS[0], ("batch", in_channels, "height", "width")),
            TensorSpec(UNET_INPUTS[1], ("batch",), fill="timestep", high=num_train_timesteps),
            TensorSpec(UNET_INPUTS[2], ("batch", text_len, context_dim)),
            *((TensorSpec(UNET_ADDED_INPUTS[0], ("batch", text_embeds_dim)),
               TensorSpec(UNET_ADDED_INPUTS[1], ("batch", time_ids_dim), fill="timestep", high=time_ids_high))
              if text_embeds_dim else ()),
        ),
        outputs=(TensorSpec(UNET_OUTPUTS[0], ("batch", out_channels or in_channels, "height", "width")),),
        axes=axes,
    )


def dit_unet_spec(unet_config, sample_size: tuple[int, int], text_len: int,
                  batch: tuple[int, int, int] = unet_batch_range(DEFAULT_BATCH_SIZE)) -> ExportSpec:
    """A diffusion transformer's denoiser graph (`UNetGraph` of a PixArt or SD3 transformer): the UNet's
    (sample, timestep, encoder_hidden_states) and then PixArt's encoder_attention_mask [N, L] (int64 0/1, the
    T5 padding mask) or SD3's pooled_projections [N, P]; out_sample has the latent's channels (PixArt's
    learned-sigma half is dropped in the graph, as its pipelines do). Height and width are fixed at
    `sample_size`: the transformers derive their position table from the size in Python, so a traced graph
    holds the table of one size. Batch is dynamic."""
    from .unet_configs import backbone_of

    c = dict(unet_config)
    kind = backbone_of(c)
    if kind == "pixart":
        extra = (TensorSpec(UNET_MASK_INPUT, ("batch", text_len), "int64", "mask"),)
        context = int(c["caption_channels"])
        timesteps = 1000
    elif kind == "sd3":
        extra = (TensorSpec(UNET_POOLED_INPUT, ("batch", int(c["pooled_projection_dim"]))),)
        context = int(c["joint_attention_dim"])
        timesteps = 1000  # flow matching: t = 1000 sigma, fractional
    else:
        raise UserError(f"dit_unet_spec takes a PixArt or SD3 transformer config, got a {kind}")
    h, w = sample_size
    p = int(c.get("patch_size", 2))
    if h % p or w % p:
        raise UserError(f"a {h}x{w} latent is not a whole number of {p}x{p} patches")
    spec = unet_spec(int(c["in_channels"]), (h, w), text_len, context, batch=batch, out_channels=int(c["in_channels"]),
                     size_multiple=p, num_train_timesteps=timesteps)
    # static height and width, each its own size (unet_spec gives a non-square latent a [min, max] range)
    axes = {**spec.axes, "height": Axis("height", h, h, h, p), "width": Axis("width", w, w, w, p)}
    return dataclasses.replace(spec, inputs=spec.inputs + extra, axes=axes)


def text_encoder_spec(text_len: int, hidden_size: int, vocab_size: int,
                      batch: tuple[int, int, int] = (1, 2, 64), pooled_dim: int | None = None,
                      vocab_size_2: int | None = None) -> ExportSpec:
    """Text encoder: (input_ids, attention_mask [B, text_len]) -> last_hidden_state [B, text_len, E]. With
    `pooled_dim` (SDXL's two encoders, `DualTextEncoderGraph`) also input_ids_2 [B, text_len] (ids of the
    second tokenizer, vocabulary `vocab_size_2`) and output text_embeds [B, pooled_dim]."""
    dual = pooled_dim is not None
    return ExportSpec(
        name="text_encoder",
        inputs=(
            TensorSpec(TEXT_ENCODER_INPUTS[0], ("batch", text_len), "int64", "tokens", vocab_size),
            TensorSpec(TEXT_ENCODER_INPUTS[1], ("batch", text_len), "int64", "mask"),
            *((TensorSpec(TEXT_ENCODER_INPUT_2, ("batch", text_len), "int64", "tokens", vocab_size_2 or vocab_size),)
              if dual else ()),
        ),
        outputs=(TensorSpec(TEXT_ENCODER_OUTPUTS[0], ("batch", text_len, hidden_size)),
                 *((TensorSpec(TEXT_ENCODER_POOLED, ("batch", pooled_dim)),) if dual else ())),
        axes={"batch": _batch("batch", batch)},
    )


def sd3_text_encoder_spec(clip_length: int, t5_length: int, joint_dim: int, pooled_dim: int,
                          vocab_sizes: tuple[int, int, int | None], batch: tuple[int, int, int] = (1, 2, 64)) -> ExportSpec:
    """SD3's text encoder (`Sd3TextEncoderGraph`): (input_ids, attention_mask, input_ids_2 [B, clip_length],
    input_ids_3 [B, t5_length]) -> last_hidden_state [B, clip_length + t5_length, joint_dim], text_embeds
    [B, pooled_dim]. `vocab_sizes`: the three tokenizers' (None for the third: no T5, no input_ids_3)."""
    v1, v2, v3 = vocab_sizes
    ids3 = () if v3 is None else (TensorSpec(TEXT_ENCODER_INPUT_3, ("batch", t5_length), "int64", "tokens", v3),)
    return ExportSpec(
        name="text_encoder",
        inputs=(TensorSpec(TEXT_ENCODER_INPUTS[0], ("batch", clip_length), "int64", "tokens", v1),
                TensorSpec(TEXT_ENCODER_INPUTS[1], ("batch", clip_length), "int64", "mask"),
                TensorSpec(TEXT_ENCODER_INPUT_2, ("batch", clip_length), "int64", "tokens", v2), *ids3),
        outputs=(TensorSpec(TEXT_ENCODER_OUTPUTS[0], ("batch", clip_length + t5_length, joint_dim)),
                 TensorSpec(TEXT_ENCODER_POOLED, ("batch", pooled_dim))),
        axes={"batch": _batch("batch", batch)},
    )


def router_spec(max_length: int, vocab_size: int, num_experts: int, embedding_dim: int,
                batch: tuple[int, int, int] = (1, 2, 64), opt_length: int = 16) -> ExportSpec:
    """Router: (input_ids, attention_mask [B, S]) -> scores [B, K], embedding [B, E]; S dynamic
    (padded to the longest prompt of the batch, at most `max_length`)."""
    return ExportSpec(
        name="router",
        inputs=(
            TensorSpec(ROUTER_INPUTS[0], ("batch", "sequence"), "int64", "tokens", vocab_size),
            TensorSpec(ROUTER_INPUTS[1], ("batch", "sequence"), "int64", "mask"),
        ),
        outputs=(
            TensorSpec(ROUTER_OUTPUTS[0], ("batch", num_experts)),
            TensorSpec(ROUTER_OUTPUTS[1], ("batch", embedding_dim)),
        ),
        axes={"batch": _batch("batch", batch),
              "sequence": Axis("sequence", 2, min(opt_length, max_length), max_length)},
    )


def vae_decoder_spec(latent_channels: int, latent_size: tuple[int, int], upscale: int = 8,
                     batch: tuple[int, int, int] = (1, 1, 8), out_channels: int = 3) -> ExportSpec:
    """VAE decoder: latent_sample [B, C, h, w] (already / scaling_factor) -> sample [B, 3, h*up, w*up]."""
    h, w = latent_size
    return ExportSpec(
        name="vae_decoder",
        inputs=(TensorSpec(VAE_DECODER_INPUTS[0], ("batch", latent_channels, h, w)),),
        outputs=(TensorSpec(VAE_DECODER_OUTPUTS[0], ("batch", out_channels, h * upscale, w * upscale)),),
        axes={"batch": _batch("batch", batch)},
    )
