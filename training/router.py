"""The prompt router (docs/method.md §3): architecture predictor, K architecture codes, cosine routing.

    layout = ArchLayout.from_space(space)
    router = Router(layout, embed_dim=384, num_experts=8)
    logits = router.predict(z)                       # [B, D] gate logits from prompt embeddings z [B, E]
    gates = router.gates(logits, noise)              # straight-through 0/1 gates [B, D]
    vecs = router.arch_vectors(gates)                # L2-normalised architecture vectors [B, D]
    scores = vecs @ router.arch_vectors(code_gates).T    # cosine [B, K]
    router.inference_scores(z)                       # [B, K], noise-free, pure torch (ONNX-exportable)

Architecture vectors: each width group is multiplied by the gate of the depth unit of its block (a
removed block keeps no width) and by 1/sqrt(units in the group) (so a group counts the same whatever
its granularity), depth units count 1; then the vector is L2-normalised.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from aptp_export.unit_kinds import DEPTH_KINDS
from engines.errors import UserError
from engines.fileio import atomic_path, write_json

from .gumbel import gumbel_sigmoid, hard_gates, keep_min_units
from .sinkhorn import balancing_bias

ROUTER_FORMAT = "aptp-router/1"


@dataclass
class ArchLayout:
    """What the router needs to know of an architecture space.

    num_units: D; width_slices: (start, stop) of every width group; depth_index: int64 [D], index of the
    depth unit that gates each unit's block (D = none); unit_scale: float32 [D], 1/sqrt(group size).
    """

    num_units: int
    width_slices: list[tuple[int, int]]
    depth_index: torch.Tensor
    unit_scale: torch.Tensor

    @classmethod
    def from_space(cls, space) -> ArchLayout:
        d = int(space.num_units)
        depth_index = torch.full((d,), d, dtype=torch.int64)
        unit_scale = torch.ones(d, dtype=torch.float32)
        width_slices = []
        covered = torch.zeros(d, dtype=torch.bool)
        for g in space.groups:
            start, stop = int(g.start), int(g.stop)
            covered[start:stop] = True
            if g.kind in DEPTH_KINDS:
                continue
            width_slices.append((start, stop))
            unit_scale[start:stop] = 1.0 / math.sqrt(stop - start)
            if g.depth_unit is not None:
                depth_index[start:stop] = int(g.depth_unit)
        if not bool(covered.all()):
            raise ValueError("ArchLayout: the space's groups do not cover every unit")
        return cls(d, width_slices, depth_index, unit_scale)

    def to_dict(self) -> dict:
        return {"num_units": self.num_units, "width_slices": [list(s) for s in self.width_slices]}


def normalized_arch_vectors(gates: torch.Tensor, depth_index: torch.Tensor, unit_scale: torch.Tensor) -> torch.Tensor:
    """gates [B, D] (0/1 or soft) -> L2-normalised architecture vectors [B, D] (see module docstring)."""
    ones = torch.ones_like(gates[..., :1])
    depth_mult = torch.cat([gates, ones], dim=-1).index_select(-1, depth_index)
    v = gates * depth_mult * unit_scale
    return v / v.norm(dim=-1, keepdim=True).clamp(min=1e-12)


class Router(nn.Module):
    """Linear architecture predictor E -> D (orthogonal init, bias) and K code logit vectors (orthogonal)."""

    def __init__(self, layout: ArchLayout, embed_dim: int, num_experts: int, tau: float = 0.4,
                 offset: float = 3.0, min_width_units: int = 1, seed: int = 0):
        super().__init__()
        if num_experts < 1:
            raise ValueError("num_experts must be >= 1")
        self.layout = layout
        self.embed_dim = int(embed_dim)
        self.num_experts = int(num_experts)
        self.tau = float(tau)
        self.offset = float(offset)
        self.min_width_units = int(min_width_units)
        d = layout.num_units
        self.predictor = nn.Linear(self.embed_dim, d, bias=True)
        self.codes = nn.Parameter(torch.empty(self.num_experts, d))
        g = torch.Generator().manual_seed(int(seed))
        nn.init.orthogonal_(self.predictor.weight, generator=g)
        nn.init.zeros_(self.predictor.bias)
        nn.init.orthogonal_(self.codes, generator=g)
        self.register_buffer("depth_index", layout.depth_index.clone(), persistent=False)
        self.register_buffer("unit_scale", layout.unit_scale.clone(), persistent=False)
        # per-expert score offsets added at inference (zeros = plain cosine argmax, the reference)
        self.register_buffer("code_bias", torch.zeros(self.num_experts), persistent=False)

    # --- training-time pieces ---------------------------------------------------------------------
    def predict(self, z: torch.Tensor) -> torch.Tensor:
        """Prompt embeddings z [B, E] -> gate logits [B, D]."""
        return self.predictor(z)

    def gates(self, logits: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Straight-through Gumbel-sigmoid gates [.., D] (noise None = evaluation), >= min_width_units per
        width group."""
        g, soft = gumbel_sigmoid(logits, self.tau, self.offset, noise=noise, hard=True)
        return keep_min_units(g, soft, self.layout.width_slices, self.min_width_units)

    def arch_vectors(self, gates: torch.Tensor) -> torch.Tensor:
        return normalized_arch_vectors(gates, self.depth_index, self.unit_scale)

    @torch.no_grad()
    def init_codes_from_predictor_(self, z: torch.Tensor, generator: torch.Generator, iterations: int = 10) -> torch.Tensor:
        """Set the codes to k-means centres of the predictor's logits for prompt embeddings z [N, E].

        Clusters are formed on the noise-free normalised architecture vectors (cosine, k-means++ seeding
        from `generator`, `iterations` Lloyd steps); each code becomes the mean logit vector of its
        cluster. Returns the cluster index of every row. Deterministic for a given generator state.
        """
        logits = self.predict(z)
        vec = self.arch_vectors(self.gates(logits, None))
        n, k = vec.shape[0], self.num_experts
        if n < k:
            raise ValueError(f"need >= {k} prompts to initialise {k} codes, got {n}")
        first = int(torch.randint(0, n, (1,), generator=generator))
        centres = [vec[first]]
        for _ in range(1, k):  # k-means++: the next centre with probability ~ squared distance
            d = (1 - vec @ torch.stack(centres).t()).clamp(min=0).amin(dim=1)
            p = d ** 2
            idx = int(torch.multinomial(p / p.sum(), 1, generator=generator)) if float(p.sum()) > 0 else \
                int(torch.randint(0, n, (1,), generator=generator))
            centres.append(vec[idx])
        c = torch.stack(centres)
        for _ in range(iterations):
            a = (vec @ c.t()).argmax(dim=1)
            for j in range(k):
                m = a == j
                if bool(m.any()):
                    c[j] = torch.nn.functional.normalize(vec[m].mean(0), dim=0)
        a = (vec @ c.t()).argmax(dim=1)
        # an empty cluster takes the logits of the prompt nearest to its centre (c[j] is a centre in
        # embedding space: its own argmax is a feature index, not a prompt)
        codes = torch.stack([logits[a == j].mean(0) if bool((a == j).any()) else logits[int((vec @ c[j]).argmax())]
                             for j in range(k)])
        self.codes.copy_(codes)
        return a

    @torch.no_grad()
    def ladder_codes(self, logits: torch.Tensor, fractions: list[float], macs_fraction) -> torch.Tensor:
        """Nested codes [len(fractions), D] cut from one code's logits [D] at MACs `fractions` (beyond the
        paper; `router.codes_init: ladder`).

        Units are ranked by `logits`; code k keeps the top of that ranking down to the cut whose MACs
        fraction (`macs_fraction(gates [D]) -> float`, min_width_units applied) is nearest fractions[k]. Each
        code is `logits - theta_k` with theta_k halfway between two adjacent logit values, so its noise-free
        gates are exactly that cut and a smaller expert is a sub-network of every larger one.
        """
        x = logits.detach().float() + self.offset
        cand = torch.unique(x)  # sorted ascending; a cut at cand[j] keeps the units with x >= cand[j]
        below = torch.cat([cand[:1] - 1.0, cand[:-1]])
        thetas = (cand + below) / 2  # gate on iff x > theta

        def frac(j: int) -> float:
            g = (x > thetas[j]).float()
            g = keep_min_units(g, x, self.layout.width_slices, self.min_width_units)
            return float(macs_fraction(g))

        codes = []
        for target in fractions:
            lo, hi = 0, len(cand) - 1  # frac(lo) is the largest, frac(hi) the smallest
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if frac(mid) >= target:
                    lo = mid
                else:
                    hi = mid
            j = lo if abs(frac(lo) - target) <= abs(frac(hi) - target) else hi
            codes.append(logits.detach().float() - thetas[j])
        return torch.stack(codes)

    # --- inference ---------------------------------------------------------------------------------
    @torch.no_grad()
    def expert_gates(self) -> torch.Tensor:
        """Binary noise-free gates of the K codes [K, D]: the experts' architecture vectors."""
        soft = torch.sigmoid((self.codes + self.offset) / self.tau)
        return keep_min_units(hard_gates(self.codes, self.offset), soft, self.layout.width_slices,
                              self.min_width_units)

    @torch.no_grad()
    def code_vectors(self) -> torch.Tensor:
        return self.arch_vectors(self.expert_gates())

    def scorer(self) -> RouterScorer:
        """A standalone, buffers-only module computing `inference_scores` (for ONNX export)."""
        return RouterScorer(self.predictor.weight.detach().clone(), self.predictor.bias.detach().clone(),
                            self.code_vectors().clone(), self.depth_index.clone(), self.unit_scale.clone(),
                            self.offset, self.code_bias.clone())

    @torch.no_grad()
    def calibrate_(self, z: torch.Tensor, epsilon: float = 0.05) -> torch.Tensor:
        """Set `code_bias` so that inference routing of prompt embeddings z [N, E] (the training set) is
        the balanced optimal-transport assignment (see sinkhorn.balancing_bias). Returns the bias [K]."""

        self.code_bias.zero_()
        self.code_bias.copy_(balancing_bias(self.inference_scores(z), epsilon))
        return self.code_bias.clone()

    @torch.no_grad()
    def inference_scores(self, z: torch.Tensor) -> torch.Tensor:
        """Prompt embeddings [B, E] -> cosine similarity [B, K] of the noise-free predicted architecture
        vector to each expert's vector, plus the per-expert `code_bias` (zeros unless calibrated).
        Route with `.argmax(1)`."""
        return self.scorer().to(z.device)(z)

    @torch.no_grad()
    def route(self, z: torch.Tensor) -> torch.Tensor:
        """Expert index per prompt embedding: int64 [B]."""
        return self.inference_scores(z).argmax(dim=1)

    # --- files -------------------------------------------------------------------------------------
    def save(self, out_dir: str | os.PathLike, extra: dict | None = None) -> None:
        """Write router.safetensors, codes.safetensors and router.json into `out_dir` (atomically)."""

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / "router.safetensors") as tmp:
            save_file({"predictor.weight": self.predictor.weight.detach().contiguous(),
                       "predictor.bias": self.predictor.bias.detach().contiguous(),
                       "depth_index": self.depth_index.contiguous(),
                       "unit_scale": self.unit_scale.contiguous()}, str(tmp))
        gates = self.expert_gates()
        with atomic_path(out / "codes.safetensors") as tmp:
            save_file({"logits": self.codes.detach().contiguous(), "gates": gates.contiguous(),
                       "vectors": self.arch_vectors(gates).contiguous(), "bias": self.code_bias.contiguous()},
                      str(tmp))
        meta = {"format": ROUTER_FORMAT, "num_experts": self.num_experts, "num_units": self.layout.num_units,
                "embedding_dim": self.embed_dim, "gumbel_tau": self.tau, "gumbel_offset": self.offset,
                "min_width_units": self.min_width_units, "width_slices": [list(s) for s in self.layout.width_slices],
                "scores": "cosine(normalize(g(W z + b) * depth * unit_scale), code_vectors) + code_bias; "
                          "g(x) = 1[x + offset > 0]"}
        meta.update(extra or {})
        write_json(out / "router.json", meta)

    @classmethod
    def load(cls, in_dir: str | os.PathLike) -> Router:
        """Rebuild a Router from `save`'s files."""

        d = Path(in_dir)
        for f in ("router.json", "router.safetensors", "codes.safetensors"):
            if not (d / f).is_file():
                raise UserError(f"router file missing: {d / f}")
        meta = json.loads((d / "router.json").read_text())
        if meta.get("format") != ROUTER_FORMAT:
            raise UserError(f"{d / 'router.json'}: unknown format {meta.get('format')!r}")
        r = load_file(str(d / "router.safetensors"))
        c = load_file(str(d / "codes.safetensors"))
        layout = ArchLayout(int(meta["num_units"]), [tuple(s) for s in meta["width_slices"]], r["depth_index"],
                            r["unit_scale"])
        router = cls(layout, int(meta["embedding_dim"]), int(meta["num_experts"]), meta["gumbel_tau"],
                     meta["gumbel_offset"], int(meta["min_width_units"]))
        with torch.no_grad():
            router.predictor.weight.copy_(r["predictor.weight"])
            router.predictor.bias.copy_(r["predictor.bias"])
            router.codes.copy_(c["logits"])
            if "bias" in c:
                router.code_bias.copy_(c["bias"])
        return router


class RouterScorer(nn.Module):
    """scores = cosine(normalised noise-free architecture vector of W z + b, code vectors) + code_bias:
    [B, E] -> [B, K].

    Only buffers and elementwise/matmul ops, so `torch.onnx.export` handles it; the exporter puts the
    sentence encoder in front of it.
    """

    def __init__(self, weight, bias, code_vectors, depth_index, unit_scale, offset: float, code_bias=None):
        super().__init__()
        self.register_buffer("code_bias", code_bias if code_bias is not None else torch.zeros(code_vectors.shape[0]))
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.register_buffer("code_vectors", code_vectors)
        self.register_buffer("depth_index", depth_index)
        self.register_buffer("unit_scale", unit_scale)
        self.offset = float(offset)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        logits = embeddings @ self.weight.t() + self.bias
        gates = (logits + self.offset > 0).to(embeddings.dtype)
        vec = normalized_arch_vectors(gates, self.depth_index, self.unit_scale)
        return vec @ self.code_vectors.t() + self.code_bias
