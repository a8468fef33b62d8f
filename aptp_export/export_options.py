"""`ExportOptions`: the one set of export settings and their defaults.

`aptp export` builds it from its flags, `training.export_run.export_run` and
`manifest_writer.write_export_dir` take it (what is exported is `export_parts.ExportParts`). The lists
of valid choices are the runtime's own (engines owns the export format): precisions from
`engines.manifest`, samplers from `engines.schedulers`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from engines.denoise import DEFAULT_BATCH_SIZE
from engines.errors import UserError
from engines.manifest import BACKENDS, PRECISIONS
from engines.schedulers import SCHEDULERS, scheduler_name
from engines.validation import Checks, is_int, is_number

EXPORTERS = ("torchscript", "dynamo")


@dataclass(frozen=True)
class ExportOptions:
    """How to export a run.

    backend: "onnx", or "tensorrt" (ONNX + a TensorRT plan per UNet; needs a GPU and the tensorrt extra).
    precision: "fp32" | "fp16" for the UNets and VAE decoder (router and text encoder stay fp32).
    scheduler: default sampler recorded in the manifest (the runtime can override it); None: "ddim", or
        "flow_euler" for a flow-matching model (SD3), engines.schedulers.default_sampler.
    max_batch: most prompts per UNet call the ONNX/TensorRT profiles allow (the UNet batch is twice that);
        TensorRT tunes for the runtime's default call (engines.denoise.DEFAULT_BATCH_SIZE prompts) or this.
    size_range: (min, max) UNet input height/width the graphs' dynamic axes and TensorRT profiles allow
        (None: the model's sample size only).
    with_dense: also export the dense UNet as the latency reference (experts/dense.onnx).
    round_to: round every expert's kept channels per width group up to a multiple of this (1 = off).
    exporter: torch.onnx exporter. progress: show a progress bar.
    steps / guidance_scale: the sampling defaults recorded in the manifest (None: the model's own
        sampling.json, else 25 steps and guidance 7.5).
    """

    backend: str = "onnx"
    precision: str = "fp32"
    scheduler: str | None = None
    max_batch: int = DEFAULT_BATCH_SIZE
    size_range: tuple[int, int] | None = None
    with_dense: bool = False
    round_to: int = 1
    exporter: str = "torchscript"
    progress: bool = True
    steps: int | None = None
    guidance_scale: float | None = None

    def __post_init__(self):
        c = Checks(UserError, sep=" ")
        for name, choices in (("backend", BACKENDS), ("precision", PRECISIONS), ("exporter", EXPORTERS)):
            c.require(getattr(self, name) in choices, name, f"must be one of {', '.join(choices)}", getattr(self, name))
        if self.scheduler is not None and self.scheduler.lower() not in SCHEDULERS:
            scheduler_name(self.scheduler)  # accepts diffusers class names too; raises naming the choices
        c.require(is_int(self.max_batch) and self.max_batch >= 1, "max_batch", "must be an integer >= 1", self.max_batch)
        c.require(self.size_range is None or (
            isinstance(self.size_range, tuple) and len(self.size_range) == 2
            and all(is_int(v) and v >= 1 for v in self.size_range) and self.size_range[0] <= self.size_range[1]),
            "size_range", "must be None or a pair (min, max) of integers 1 <= min <= max", self.size_range)
        c.require(self.steps is None or (is_int(self.steps) and self.steps >= 1), "steps",
                  "must be None or an integer >= 1", self.steps)
        c.require(self.guidance_scale is None or (is_number(self.guidance_scale) and 0 <= self.guidance_scale <= 100),
                  "guidance_scale", "must be None or a number in [0, 100]", self.guidance_scale)
        c.require(is_int(self.round_to) and self.round_to >= 1, "round_to", "must be an integer >= 1 (1 = no rounding)",
                  self.round_to)

    def replace(self, **changes) -> ExportOptions:
        """A copy with some fields changed (validated again); unknown names raise UserError."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise UserError(f"unknown export option {unknown[0]!r}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
