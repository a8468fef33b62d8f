"""Training checkpoints: safetensors for tensors, JSON for the rest, written so a kill never corrupts one.

    save_checkpoint(root, step, tensors, state)     # root/step_00000040/{tensors.safetensors, state.json}
    tensors, state = load_latest(root)              # or None when there is no complete checkpoint

A checkpoint directory is written under a temporary name and renamed when complete; `root/latest.json`
(atomically replaced) then names it, and older checkpoints are deleted. Helpers turn an AdamW
optimizer and RNG generators into tensors + JSON and back (no pickle).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from engines.fileio import write_json

LATEST = "latest.json"


def save_checkpoint(root: str | os.PathLike, step: int, tensors: dict[str, torch.Tensor], state: dict,
                    keep: int = 1) -> Path:

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{int(step):08d}"
    final = root / name
    tmp = root / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp / "tensors.safetensors"))
    (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_json(root / LATEST, {"checkpoint": name, "step": int(step)})
    # keep the newest `keep` complete checkpoints
    done = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_latest(root: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict] | None:
    root = Path(root)
    if not (root / LATEST).is_file():
        return None
    name = json.loads((root / LATEST).read_text())["checkpoint"]
    d = root / name
    tensors = load_file(str(d / "tensors.safetensors"))
    state = json.loads((d / "state.json").read_text())
    return tensors, state


def optimizer_to_tensors(opt: torch.optim.Optimizer, names: dict[int, str], prefix: str = "optim.") -> tuple[dict, dict]:
    """AdamW/Adam state -> ({prefix+name+'.'+key: tensor}, {"param_groups": [hyper-parameters]}).

    names maps id(param) -> a stable parameter name."""
    tensors = {}
    for p, st in opt.state.items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{prefix}{names[id(p)]}.{k}"] = v.detach().clone()
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return tensors, {"param_groups": groups}


def optimizer_from_tensors(opt: torch.optim.Optimizer, names: dict[int, str], tensors: dict, meta: dict,
                           prefix: str = "optim.") -> None:
    """Inverse of `optimizer_to_tensors` (same parameters, same order)."""
    sd = opt.state_dict()
    index = 0
    state = {}
    for g in opt.param_groups:
        for p in g["params"]:
            key = f"{prefix}{names[id(p)]}."
            st = {k[len(key):]: v for k, v in tensors.items() if k.startswith(key)}
            if st:
                state[index] = st
            index += 1
    groups = []
    for g_sd, g_meta in zip(sd["param_groups"], meta["param_groups"], strict=True):
        g = dict(g_meta)
        g["params"] = g_sd["params"]
        groups.append(g)
    opt.load_state_dict({"state": state, "param_groups": groups})


def generator_state(gen: torch.Generator) -> torch.Tensor:
    return gen.get_state().clone()


def set_generator_state(gen: torch.Generator, state: torch.Tensor) -> None:
    gen.set_state(state.to(torch.uint8))
