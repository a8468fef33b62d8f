"""Experts as files: `arch.json` (base UNet config, space settings, binary vector, size) + `model.safetensors`.

    save_expert("runs/x/experts/expert_00", space, arch, expert)
    expert = load_expert("runs/x/experts/expert_00")      # rebuilt from config, pruning re-applied, strict load

A pruned UNet no longer matches any `UNet2DConditionModel` config, so it is never pickled: loading builds the
base UNet on the meta device (no memory, no init), re-applies the vector (materialize.apply_arch_), checks
that every tensor of the file has the shape the vector implies, and assigns the weights (strict). A file whose
vector does not match its weights fails with a UserError naming both files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from engines.errors import UserError
from engines.fileio import atomic_path, write_json

from .arch_space import ArchSpace
from .materialize import apply_arch_
from .unet_configs import build_unet, fill_position_tables

ARCH_FILE = "arch.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "aptp-expert"
FORMAT_VERSION = 1


def _keep_vector(space, arch) -> np.ndarray:
    a = space.as_tensor(arch)
    if a.ndim != 1:
        raise UserError(f"an expert has one architecture vector [D], got shape {list(a.shape)}")
    return a.detach().cpu().numpy() > 0.5


def expected_shapes(space, keep: np.ndarray) -> dict[str, tuple]:
    """Tensor shapes of the expert `keep` (bool [D]) of `space`, from a meta-device rebuild."""

    model = apply_arch_(space, build_unet(space.unet_config, device="meta"), keep)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _first_difference(expected: dict, got: dict) -> str:
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    if missing:
        return f"tensor {missing[0]} is missing" + (f" ({len(missing)} missing)" if len(missing) > 1 else "")
    if extra:
        return f"unexpected tensor {extra[0]}" + (f" ({len(extra)} unexpected)" if len(extra) > 1 else "")
    n = next(k for k in expected if expected[k] != got[k])
    return f"{n} has shape {list(got[n])}, the vector implies {list(expected[n])}"


def save_expert(path, space, arch, expert, *, height: int | None = None, width: int | None = None,
                text_len: int = 77, metadata: dict | None = None) -> Path:
    """Write the expert directory `path` (arch.json + model.safetensors, each written atomically).

    arch: the expert's vector [D] (binarised at 0.5); expert: the module `space.materialize(unet, arch)`
    returned (possibly fine-tuned). height/width/text_len: the reference size for the MACs recorded in
    arch.json (default: the UNet's sample_size, 77 tokens). metadata: extra JSON-able facts to record.
    Returns the directory.
    """

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path}: exists and is not a directory")
    keep = _keep_vector(space, arch)
    state = expert.state_dict()
    got = {k: tuple(v.shape) for k, v in state.items()}
    want = expected_shapes(space, keep)
    if got != want:
        raise UserError(f"the expert does not match its architecture vector: {_first_difference(want, got)}")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in tensors.values()})
    h, w = space.resolve_hw(height, width)
    macs = float(space.macs(keep.astype(np.float32).tolist(), h, w, text_len))
    dense = space.dense_macs(h, w, text_len)
    info = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "base_unet_config": space.unet_config,
        "space": {"depth_blocks": space.depth_blocks, "ff_groups": space.ff_groups, "layer_depth": space.layer_depth,
                  "num_units": space.num_units},
        "arch": [int(x) for x in keep],
        "kept_units": int(keep.sum()),
        "params": int(sum(v.numel() for v in tensors.values())),
        "dense_params": space.dense_params,
        "macs": {"height": h, "width": w, "text_len": text_len, "batch": 1, "macs": macs, "dense_macs": dense,
                 "ratio": macs / dense, "convention": "true MACs, attention products counted once"},
        "weights": WEIGHTS_FILE,
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
    }
    if metadata:
        info["metadata"] = metadata
    with atomic_path(path / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "aptp": FORMAT})
    write_json(path / ARCH_FILE, info)  # last: its presence marks a complete expert
    return path


def read_expert_info(path):
    """(space, arch float32 tensor [D], arch.json dict) of an expert directory, without loading weights."""

    arch_file = _arch_file(path)
    try:
        info = json.loads(arch_file.read_text())
    except FileNotFoundError:
        raise UserError(f"{arch_file}: no such file (not an expert directory)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{arch_file}: cannot read expert description: {e}") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise UserError(f"{arch_file}: not an aptp expert description (format {info.get('format')!r})"
                        if isinstance(info, dict) else f"{arch_file}: not an aptp expert description")
    if info.get("version") != FORMAT_VERSION:
        raise UserError(f"{arch_file}: expert format version {info.get('version')!r} is not supported")
    for key in ("base_unet_config", "space", "arch"):
        if key not in info:
            raise UserError(f"{arch_file}: missing key {key!r}")
    sp = info["space"]
    if not isinstance(sp, dict):
        raise UserError(f"{arch_file}: 'space' must be an object")
    try:
        space = ArchSpace.from_dict({"format": "aptp-arch-space", "version": 1, "unet_config": info["base_unet_config"],
                                     **sp})
    except UserError as e:
        raise UserError(f"{arch_file}: {e}") from None
    arch = info["arch"]
    if not isinstance(arch, list) or any(x not in (0, 1) or isinstance(x, bool) for x in arch):
        raise UserError(f"{arch_file}: 'arch' must be a list of 0/1")
    if len(arch) != space.num_units:
        raise UserError(f"{arch_file}: 'arch' has {len(arch)} entries, the space has D={space.num_units} units")
    return space, torch.tensor(arch, dtype=torch.float32), info


def load_expert(path, device: str = "cpu", dtype=None):
    """Rebuild the expert saved in directory `path` (or its arch.json): meta-device base UNet from the config,
    pruning re-applied, weights loaded strictly. Returns the pruned `UNet2DConditionModel` (or
    `PixArtTransformer2DModel`) in eval mode."""

    space, arch, info = read_expert_info(path)
    arch_file = _arch_file(path)
    weights = arch_file.parent / str(info.get("weights", WEIGHTS_FILE))
    if not weights.is_file():
        raise UserError(f"{weights}: no such file (the expert's weights)")
    try:
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{weights}: cannot read safetensors: {e}") from None
    model = apply_arch_(space, build_unet(space.unet_config, device="meta"), arch.numpy() > 0.5)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if want != got:
        raise UserError(f"{weights}: the weights do not match the architecture vector in {arch_file} "
                        f"({_first_difference(want, got)})")
    model.load_state_dict(state, strict=True, assign=True)
    fill_position_tables(model, device)  # not in the checkpoint: PixArt's table is not persistent
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # pragma: no cover - strict loading makes this impossible
        raise RuntimeError(f"{weights}: tensors left uninitialised: {left[:3]}")
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def _arch_file(path) -> Path:
    p = Path(path)
    return p if p.name == ARCH_FILE or p.suffix == ".json" else p / ARCH_FILE
