"""`RunDir`: the one owner of a training run directory's layout.

    runs/NAME/
      config.yaml                  the resolved config that produced the run (every key)
      prune/                       router.safetensors, codes.safetensors, router.json, summary.json,
                                   log.jsonl, checkpoints/latest.json (+ the state it names)
      experts/expert_00/           arch.json + model.safetensors (+ finetune.json)
      experts/experts.json         summary of the fine-tuning phase

Every module that reads or writes a run goes through this type; nothing else spells these names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from engines.errors import UserError

from .config import RunConfig, load_config


@dataclass(frozen=True)
class RunDir:
    """Paths of one run directory and the checks of which phases it has finished."""

    root: Path

    def __init__(self, root: str | os.PathLike):
        object.__setattr__(self, "root", Path(root))

    # ------------------------------------------------------------ paths
    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def prune_dir(self) -> Path:
        """Where the router and codes are saved (Router.save / Router.load take this directory)."""
        return self.root / "prune"

    @property
    def router_meta(self) -> Path:
        return self.prune_dir / "router.json"

    @property
    def prune_summary(self) -> Path:
        return self.prune_dir / "summary.json"

    @property
    def checkpoints(self) -> Path:
        return self.prune_dir / "checkpoints"

    @property
    def latest_checkpoint(self) -> Path:
        return self.checkpoints / "latest.json"

    @property
    def experts_dir(self) -> Path:
        return self.root / "experts"

    @property
    def experts_summary(self) -> Path:
        return self.experts_dir / "experts.json"

    def expert(self, k: int) -> Path:
        """Directory of expert k (arch.json + model.safetensors)."""
        return self.experts_dir / self.expert_name(k)

    @staticmethod
    def expert_name(k: int) -> str:
        return f"expert_{k:02d}"

    # ------------------------------------------------------------ state
    def has_config(self) -> bool:
        return self.config_path.is_file()

    def is_pruned(self) -> bool:
        """The pruning phase finished (router and codes saved)."""
        return self.router_meta.is_file()

    def is_finetuned(self) -> bool:
        return self.experts_summary.is_file()

    def config(self) -> RunConfig:
        """The run's resolved config, read and validated by the one config loader."""
        if not self.has_config():
            raise UserError(f"{self.root}: not a training run (no config.yaml)")
        return load_config(self.config_path)

    def require_pruned(self) -> None:
        """Raise UserError unless the run has a config and a finished pruning phase."""
        if not self.has_config():
            raise UserError(f"{self.root}: not a training run (no config.yaml)")
        if not self.is_pruned():
            raise UserError(f"{self.root}: the pruning phase has not finished (no prune/router.json); "
                            "run `aptp prune` first")
