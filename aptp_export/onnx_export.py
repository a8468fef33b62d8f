"""Export torch models to ONNX from an `ExportSpec`, check the graph, compare it with torch.

    from aptp_export.onnx_export import UNetGraph, export_onnx
    result = export_onnx(UNetGraph(expert), spec, "export/x/experts/expert_00.onnx")
    result.max_rel_error      # {"out_sample": 1.3e-6}; > 1e-4 in fp32 raises ExportVerificationError

Exporter choice (measured on the toy teacher UNet, torch 2.13 CPU, diffusers 0.42, opset 17/18):
the TorchScript exporter (`exporter="torchscript"`, the default) took 6-9 s, the torch.export-based
one (`exporter="dynamo"`) 16-39 s; both gave graphs that match torch to ~1.4e-6 relative, with
dynamic batch *and* dynamic height/width, with diffusers' default SDPA attention processor and with
the classic `AttnProcessor`, so the model is exported with the processor it has. The TorchScript
exporter is deprecated upstream but is what TensorRT's Diffusion demo uses; `dynamo` is one
argument away when it goes.

Precision: "fp32", or "fp16" = the fp32 graph converted with onnxruntime's float16 converter
(`onnxruntime.transformers.float16.convert_float_to_float16`, keep_io_types=True: inputs and outputs
stay float32, initialisers and compute become float16, the ops on its block list stay fp32 behind
Cast nodes). This is what a strongly typed TensorRT network then builds in fp16. onnxruntime's CPU
provider lacks fp16 kernels for some ops; the check against torch runs when the CPU can execute the
graph (tolerance `FP16_RTOL`) and is otherwise recorded as skipped, to be run on the GPU.

Relative error = max |onnx - torch| / max |torch| per output, on inputs drawn fresh (another seed,
and other batch/size values than the traced ones where the spec allows). Files are written to a
temporary directory next to the target and renamed into place (external data first, graph last), so
an interrupted export never leaves a half graph under the final name. Graphs over 1.8 GB are saved
with their weights in one external-data file `<name>.onnx.data`; an fp32 graph that torch's exporter already
wrote with external data (> 2 GB, e.g. SDXL) is copied into it tensor by tensor, never loaded whole, so the
export's peak memory stays near the torch module's.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import external_data_helper
from onnxruntime.transformers.float16 import convert_float_to_float16
from onnxruntime.transformers.onnx_model import OnnxModel
from torch import nn

from engines.manifest import PRECISIONS, sha256_file

from .export_spec import ExportSpec
from .families import unet_extra_inputs
from .unet_configs import backbone_of, sd3_text_condition

DEFAULT_OPSET = 17
FP32_RTOL = 1e-4
FP16_RTOL = 2e-2
EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # bytes of initialisers; protobuf's hard limit is 2 GiB
EXPORTERS = ("torchscript", "dynamo")


class ExportVerificationError(RuntimeError):
    """The exported graph does not reproduce the torch model within tolerance (message says by how much)."""


# -- graph wrappers: fixed signatures matching the specs -------------------------------------------
class UNetGraph(nn.Module):
    """(sample, timestep [N] float, encoder_hidden_states[, extra inputs]) -> out_sample, for any
    diffusers-style UNet (dense or physically pruned) whose forward is `unet(sample, timestep,
    encoder_hidden_states)`. UNets whose family has extra inputs (families.py; SDXL-class,
    `addition_embed_type="text_time"`) take the pooled text embedding [N, P] and the size conditioning
    time_ids [N, 6], passed as diffusers' `added_cond_kwargs` (`extra_inputs` names them, `has_added_cond`
    says whether a graph has any).

    Diffusion transformers (export_spec.dit_unet_spec): a PixArt transformer takes the caption's padding mask
    encoder_attention_mask [N, L] and its learned-sigma output half is dropped (the pipelines' `chunk(2)[0]`);
    an SD3 transformer takes pooled_projections [N, P]."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet
        config = getattr(unet, "config", None) or {}
        self.backbone = backbone_of(config)
        self.extra_inputs = unet_extra_inputs(config)
        self.has_added_cond = self.backbone == "unet" and bool(self.extra_inputs)

    def forward(self, sample, timestep, encoder_hidden_states, *extra):
        if self.backbone == "pixart":
            return _pixart_noise(self.unet, sample, timestep, encoder_hidden_states, extra[0])
        if self.backbone == "sd3":
            return self.unet(sample, encoder_hidden_states=encoder_hidden_states, pooled_projections=extra[0],
                             timestep=timestep, return_dict=False)[0]
        kwargs = {}
        if self.has_added_cond:
            kwargs["added_cond_kwargs"] = {"text_embeds": extra[0], "time_ids": extra[1]}
        out = self.unet(sample, timestep, encoder_hidden_states, return_dict=False, **kwargs)
        return out[0]


def _pixart_noise(t: nn.Module, sample, timestep, context, mask):
    """`PixArtTransformer2DModel.forward` (diffusers 0.3x-0.4x, no resolution conditioning) returning the
    noise half of a learned-sigma output, written out for export: diffusers ends with
    `hidden_states.squeeze(1)` on [N, tokens, C], which the TorchScript exporter turns into an If on the
    token count whose squeeze branch fails ONNX shape inference. Same modules, same operations, no squeeze
    (tests/aptp_export/test_dit_space.py compares it with diffusers' forward)."""
    bias = ((1 - mask.to(sample.dtype)) * -10000.0).unsqueeze(1)  # [N, 1, L]: padded caption tokens masked
    n, c = sample.shape[0], sample.shape[1]
    p = t.config.patch_size
    h, w = sample.shape[-2] // p, sample.shape[-1] // p
    x = t.pos_embed(sample)
    temb, embedded = t.adaln_single(timestep, {"resolution": None, "aspect_ratio": None}, batch_size=n,
                                    hidden_dtype=x.dtype)
    if t.caption_projection is not None:
        context = t.caption_projection(context).view(n, -1, x.shape[-1])
    for block in t.transformer_blocks:
        x = block(x, attention_mask=None, encoder_hidden_states=context, encoder_attention_mask=bias,
                  timestep=temb, cross_attention_kwargs=None, class_labels=None)
    shift, scale = (t.scale_shift_table[None] + embedded[:, None]).chunk(2, dim=1)
    x = t.proj_out(t.norm_out(x) * (1 + scale) + shift)
    out_c = t.out_channels
    x = torch.einsum("nhwpqc->nchpwq", x.reshape(-1, h, w, p, p, out_c)).reshape(-1, out_c, h * p, w * p)
    return x[:, :c] if out_c == 2 * c else x


def _last_hidden_state(encoder: nn.Module, input_ids, attention_mask):
    out = encoder(input_ids=input_ids, attention_mask=attention_mask)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


class TextEncoderGraph(nn.Module):
    """(input_ids, attention_mask) -> last_hidden_state of a transformers-style encoder.

    `use_attention_mask=False` reproduces pipelines that call the encoder without a mask (Stable
    Diffusion's CLIP text encoder): the exported graph then has no attention_mask input, and the
    runtime feeds only the inputs a graph has."""

    def __init__(self, encoder: nn.Module, use_attention_mask: bool = True):
        super().__init__()
        self.encoder = encoder
        self.use_attention_mask = use_attention_mask

    def forward(self, input_ids, attention_mask):
        return _last_hidden_state(self.encoder, input_ids, attention_mask if self.use_attention_mask else None)


class DualTextEncoderGraph(nn.Module):
    """SDXL's text conditioning: (input_ids, attention_mask, input_ids_2) -> (last_hidden_state [B, L, E1 + E2],
    text_embeds [B, P]).

    last_hidden_state concatenates both encoders' penultimate hidden states (what StableDiffusionXLPipeline
    feeds the UNet without clip_skip); text_embeds is the second encoder's projected pooled output
    (`CLIPTextModelWithProjection`). input_ids are the first tokenizer's, input_ids_2 the second's; both
    encoders run without an attention mask, as the pipeline calls them, so the graph has no attention_mask
    input."""

    def __init__(self, encoder: nn.Module, encoder_2: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.encoder_2 = encoder_2

    def forward(self, input_ids, attention_mask, input_ids_2):
        h1 = self.encoder(input_ids, output_hidden_states=True).hidden_states[-2]
        out2 = self.encoder_2(input_ids_2, output_hidden_states=True)
        return torch.cat([h1, out2.hidden_states[-2]], dim=-1), out2[0]


class Sd3TextEncoderGraph(nn.Module):
    """SD3's text conditioning, as StableDiffusion3Pipeline.encode_prompt (no clip_skip): (input_ids, attention_mask,
    input_ids_2[, input_ids_3]) -> (last_hidden_state [B, S1 + S3, E], text_embeds [B, P1 + P2]).

    Both CLIPs (`CLIPTextModelWithProjection`, run without a mask) give their penultimate hidden states,
    concatenated and zero-padded to T5's width E (the transformer's joint_attention_dim), followed by T5's last
    hidden state over its own S3 tokens (run without a mask, as the pipeline does); without a T5 encoder those
    S3 rows are zeros and the graph has no input_ids_3. text_embeds concatenates both CLIPs' projected pooled
    outputs (the transformer's pooled_projections). attention_mask is unused (the exported graph drops it).
    The computation is `unet_configs.sd3_text_condition`, the one training conditions with."""

    def __init__(self, encoder: nn.Module, encoder_2: nn.Module, encoder_3: nn.Module | None, joint_dim: int,
                 t5_length: int):
        super().__init__()
        self.encoder, self.encoder_2, self.encoder_3 = encoder, encoder_2, encoder_3
        self.joint_dim, self.t5_length = int(joint_dim), int(t5_length)

    def forward(self, input_ids, attention_mask, input_ids_2, *input_ids_3):
        return sd3_text_condition((self.encoder, self.encoder_2, self.encoder_3),
                                  (input_ids, input_ids_2, input_ids_3[0] if input_ids_3 else None),
                                  self.joint_dim, self.t5_length)


def mean_pool_normalize(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' mean pooling then L2 normalisation: [B,S,E], [B,S] -> [B,E]."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * mask).sum(dim=1)
    counts = mask.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(summed / counts, p=2, dim=1)


class RouterGraph(nn.Module):
    """(input_ids, attention_mask) -> (scores [B, K], embedding [B, E]).

    embedding = L2-normalised mean pooling of `encoder`'s last hidden state (the
    sentence-transformers recipe); scores = `head(embedding)`, any module mapping [B, E] -> [B, K]
    (the router's predictor + comparison with the architecture codes). The runtime routes to the
    argmax of the scores."""

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, input_ids, attention_mask):
        emb = mean_pool_normalize(_last_hidden_state(self.encoder, input_ids, attention_mask), attention_mask)
        return self.head(emb), emb


class VaeDecoderGraph(nn.Module):
    """latent_sample (already divided by the scaling factor) -> image in [-1, 1] (diffusers AutoencoderKL)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


# -- export --------------------------------------------------------------------------------------
@dataclass
class ExportResult:
    """What `export_onnx` wrote and measured."""

    path: Path
    files: dict[str, Path]  # "onnx" and, for big graphs, "onnx_data"
    sha256: dict[str, str]
    precision: str
    exporter: str
    opset: int
    seconds: float
    max_rel_error: dict[str, float] = field(default_factory=dict)
    verified: bool = False
    note: str = ""


def _fresh_sizes(spec: ExportSpec) -> dict[str, int]:
    """Axis sizes for the check: differ from the traced (opt) ones where the axis allows."""
    sizes = {}
    for name, ax in spec.axes.items():
        cand = ax.traced + ax.multiple_of
        sizes[name] = cand if cand <= ax.max else (ax.traced - ax.multiple_of if ax.traced - ax.multiple_of >= ax.min
                                                   else ax.traced)
    return sizes


def _torch_export(module: nn.Module, spec: ExportSpec, path: Path, opset: int, exporter: str) -> None:
    args = spec.sample_inputs(seed=0)
    if exporter == "torchscript":

        with warnings.catch_warnings():
            # diffusers' shape asserts and size checks are constants for the traced shapes; the graph is verified
            # against torch on fresh shapes afterwards, which is what these warnings ask for
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(
                module, args, str(path), input_names=spec.input_names, output_names=spec.output_names,
                dynamic_axes=spec.dynamic_axes(), opset_version=opset, do_constant_folding=True, dynamo=False,
            )
    else:
        torch.onnx.export(
            module, args, str(path), input_names=spec.input_names, output_names=spec.output_names,
            dynamic_shapes=spec.dynamic_shapes(), opset_version=max(opset, 18), dynamo=True,
            external_data=False, optimize=True,
        )


def _save(model, path: Path) -> dict[str, Path]:
    size = sum(t.ByteSize() for t in model.graph.initializer)
    if size > EXTERNAL_DATA_THRESHOLD:
        data = path.with_name(path.name + ".data")
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
        return {"onnx": path, "onnx_data": data}
    onnx.save_model(model, str(path))
    return {"onnx": path}


def _save_streaming(model, src_dir: Path, path: Path) -> dict[str, Path]:
    """Save `model` (loaded without its external data, which lies under `src_dir`, one file per tensor as
    torch's exporter writes it) with every external tensor copied, one at a time, into one data file
    `<name>.onnx.data`: the weights are never all in memory (what `_save` needs), so a multi-GB UNet exports
    next to its torch module. Inline tensors stay inline."""

    data = path.with_name(path.name + ".data")
    offset = 0
    with open(data, "wb") as out:
        for tensor in external_data_helper._get_all_tensors(model):
            if not external_data_helper.uses_external_data(tensor):
                continue
            info = external_data_helper.ExternalDataInfo(tensor)
            with open(src_dir / info.location, "rb") as f:
                f.seek(info.offset or 0)
                blob = f.read(info.length) if info.length else f.read()
            out.write(blob)
            del tensor.external_data[:]  # (onnx's set_external_data wants the bytes in the tensor)
            for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(len(blob)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            offset += len(blob)
            del blob
    onnx.save_model(model, str(path))
    return {"onnx": path, "onnx_data": data}


def _has_external_data(model) -> bool:
    return any(external_data_helper.uses_external_data(t) for t in external_data_helper._get_all_tensors(model))


def to_fp16(model):
    """fp16 ONNX model with float32 inputs/outputs (see module doc)."""

    model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False)
    wrapped = OnnxModel(model)
    wrapped.topological_sort()  # the converter appends the input Casts after their consumers
    return wrapped.model


def check_inputs(spec: ExportSpec, seed: int) -> list[torch.Tensor]:
    """The inputs `export_onnx` checks a graph on: drawn with `seed`, at other axis sizes than the traced ones
    where the spec allows (`_fresh_sizes`)."""
    return spec.sample_inputs(_fresh_sizes(spec), seed=seed)


def torch_reference(module: nn.Module, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """`module`'s outputs on `inputs` as a tuple (computed once, before a big module is freed)."""
    with torch.no_grad():
        ref = module(*inputs)
    return tuple(ref) if isinstance(ref, (tuple, list)) else (ref,)


def relative_errors(path: Path, spec: ExportSpec, inputs: list[torch.Tensor], ref, run) -> dict[str, float]:
    """max |onnx - torch| / max |torch| per output; `run(feeds)` returns the graph's outputs in the spec's order
    and gets only the inputs in `feeds` (the caller leaves out those its graph lacks)."""
    outs = run({t.name: x.numpy() for t, x in zip(spec.inputs, inputs, strict=True)})
    errors = {}
    for name, o, r in zip(spec.output_names, outs, ref, strict=True):
        r = r.detach().float().numpy()
        if o.shape != r.shape:
            raise ExportVerificationError(f"{path}: output {name} has shape {o.shape}, torch gives {r.shape}")
        errors[name] = float(np.abs(o.astype(np.float32) - r).max() / max(float(np.abs(r).max()), 1e-12))
    return errors


def _compare(path: Path, module: nn.Module, spec: ExportSpec, seed: int) -> dict[str, float]:
    inputs = check_inputs(spec, seed)
    ref = torch_reference(module, inputs)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph_inputs = {i.name for i in sess.get_inputs()}  # an input torch never reads is not in the graph

    def run(feeds):
        return sess.run(spec.output_names, {k: v for k, v in feeds.items() if k in graph_inputs})

    return relative_errors(path, spec, inputs, ref, run)


def export_onnx(module: nn.Module, spec: ExportSpec, path: str | os.PathLike, *, precision: str = "fp32",
                opset: int = DEFAULT_OPSET, exporter: str = "torchscript", verify: bool = True,
                rtol: float | None = None, seed: int = 1) -> ExportResult:
    """Export `module` (whose forward takes the spec's inputs in order) to `path`.

    Args:
        module: a torch module, e.g. UNetGraph(unet); put in eval mode here.
        spec: its ExportSpec (names, dynamic axes, sample input).
        path: target .onnx path (parent created).
        precision: "fp32" | "fp16" (see module doc).
        opset: ONNX opset (>= 17; the dynamo exporter uses >= 18).
        exporter: "torchscript" | "dynamo".
        verify: compare onnxruntime with torch on fresh inputs and raise if the error exceeds
            `rtol` (default 1e-4 for fp32, 2e-2 for fp16).
        seed: seed of the fresh verification inputs (the traced sample uses seed 0).
    Returns: ExportResult (files, sha256, measured errors).
    Raises: ExportVerificationError if the graph does not match; onnx.checker errors if invalid.
    """

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    if opset < 17:
        raise ValueError(f"opset must be >= 17, got {opset}")
    t0 = time.perf_counter()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        raw = tmp / "raw" / path.name
        raw.parent.mkdir()
        with torch.no_grad():
            _torch_export(module, spec, raw, opset, exporter)
        model = onnx.load(str(raw), load_external_data=False)
        if precision == "fp32" and _has_external_data(model):  # > 2 GB: weights copied file to file
            staged = _save_streaming(model, raw.parent, tmp / path.name)
        else:
            external_data_helper.load_external_data_for_model(model, str(raw.parent))
            if precision == "fp16":
                model = to_fp16(model)
            staged = _save(model, tmp / path.name)
        del model
        onnx.checker.check_model(str(staged["onnx"]), full_check=True)

        errors, verified, note = {}, False, ""
        if verify:
            tol = rtol if rtol is not None else (FP32_RTOL if precision == "fp32" else FP16_RTOL)
            try:
                errors = _compare(staged["onnx"], module, spec, seed)
                verified = True
            except ExportVerificationError:
                raise
            except Exception as e:
                if precision == "fp32":
                    raise ExportVerificationError(f"{path}: onnxruntime cannot run the exported graph: {e}") from e
                note = f"fp16 graph not checked on CPU (onnxruntime: {str(e).strip()[:200]})"
            bad = {k: v for k, v in errors.items() if not v <= tol}
            if bad:
                raise ExportVerificationError(
                    f"{path}: ONNX ({precision}) differs from torch: relative error "
                    + ", ".join(f"{k}={v:.2e}" for k, v in bad.items()) + f" > {tol:.0e}"
                )

        final = {}
        for kind in ("onnx_data", "onnx"):  # data first: the graph never points at a missing file
            if kind in staged:
                target = path.with_name(staged[kind].name)
                os.replace(staged[kind], target)
                final[kind] = target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    mask = os.umask(0)
    os.umask(mask)
    for p in final.values():  # onnx writes external data 0600; graphs are meant to be shipped
        os.chmod(p, 0o666 & ~mask)
    return ExportResult(
        path=path, files=final, sha256={k: sha256_file(p) for k, p in final.items()},
        precision=precision, exporter=exporter, opset=opset if exporter == "torchscript" else max(opset, 18),
        seconds=time.perf_counter() - t0, max_rel_error=errors, verified=verified, note=note,
    )
