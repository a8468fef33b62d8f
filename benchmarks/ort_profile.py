"""Per-node onnxruntime profile of one graph: where the time of one call goes, by operator type.

    from benchmarks.ort_profile import profile_graph, compare_profiles
    p = profile_graph("dense.onnx", feeds, runs=2)      # {"total_ms", "by_op": {op: ms}, "nodes": [...]}
    rows = compare_profiles({"dense": p0, "keep_0.50": p1}, reference="dense")

The session is opened as the benchmarks open it (ORT_ENABLE_ALL, so after NCHWc and fusion
rewrites) with `SessionOptions.enable_profiling`; one untimed call, then `runs` profiled calls whose
node events (category "Node", `*_kernel_time`) give each node's median time per call. Operator types are those of the
optimised graph: an NCHWc convolution shows as `Conv` with provider tag `nchwc`, onnxruntime's
im2col fallback as `FusedConv`/`Conv` without it, so the report separates them as `Conv(nchwc)`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort


def _op_key(event: dict) -> str:
    args = event.get("args", {})
    op = args.get("op_name", "?")
    name = event.get("name", "")
    # NCHWc kernels are registered in their own domain; the profiler reports the op name only, but
    # the optimiser names the nodes it rewrote (`..._nchwc`) and reorders are their own op types.
    if op == "Conv" and ("nchwc" in name.lower() or args.get("provider", "") == "nchwc"):
        return "Conv(nchwc)"
    return op


def profile_graph(path: str | os.PathLike, feeds: dict[str, np.ndarray], runs: int = 2, threads: int = 0,
                  optimized_model_path: str | os.PathLike | None = None) -> dict:
    """Profile `runs` calls of the graph at `path` (after one warm-up call); times in ms per call."""

    with tempfile.TemporaryDirectory(prefix="ortprof.") as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "prof")
        if threads:
            so.intra_op_num_threads = threads
        if optimized_model_path is not None:
            so.optimized_model_filepath = str(optimized_model_path)
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        names = {i.name for i in sess.get_inputs()}
        feeds = {k: v for k, v in feeds.items() if k in names}
        for _ in range(1 + runs):
            sess.run(None, feeds)
        trace = sess.end_profiling()
        events = json.loads(Path(trace).read_text())
        del sess
    run_events = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                        key=lambda e: e["ts"])[-runs:]
    windows = [(e["ts"], e["ts"] + e["dur"]) for e in run_events]
    total_ms = float(np.mean([e["dur"] for e in run_events])) / 1e3
    per_node: dict[str, dict] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        if not any(lo <= e["ts"] <= hi for lo, hi in windows):
            continue
        name = e["name"][: -len("_kernel_time")]
        n = per_node.setdefault(name, {"node": name, "op": _op_key(e), "durs": [],
                                       "shapes": e.get("args", {}).get("input_type_shape")})
        n["durs"].append(e["dur"] / 1e3)
    # a node's time per call: the median over the profiled calls (robust to a preempted call)
    by_op: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    nodes = {}
    for name, n in per_node.items():
        durs = n.pop("durs")
        n["ms"] = float(np.median(durs)) * len(durs) / runs  # a node run k times per call counts k times
        by_op[n["op"]] += n["ms"]
        count[n["op"]] += max(1, round(len(durs) / runs))
        nodes[name] = n
    node_ms = sum(by_op.values())
    return {
        "path": str(path), "runs": runs, "total_ms": total_ms, "node_ms": node_ms,
        "by_op": dict(sorted(by_op.items(), key=lambda kv: -kv[1])),
        "count_by_op": dict(count),
        "nodes": sorted(nodes.values(), key=lambda n: -n["ms"]),
    }


def compare_profiles(profiles: dict[str, dict], reference: str = "dense", top: int = 14) -> list[dict]:
    """Rows (op type, ms per model, share of the reference's node time, ratio to the reference)."""
    ref = profiles[reference]
    ops = list(ref["by_op"])[:top]
    others = sorted({op for p in profiles.values() for op in p["by_op"]} - set(ops))
    rows = []
    for op in [*ops, "(other)"]:
        sel = others if op == "(other)" else [op]
        row = {"op": op, "share_of_dense": sum(ref["by_op"].get(o, 0.0) for o in sel) / ref["node_ms"]}
        r_ms = sum(ref["by_op"].get(o, 0.0) for o in sel)
        for name, p in profiles.items():
            ms = sum(p["by_op"].get(o, 0.0) for o in sel)
            row[f"{name}_ms"] = ms
            if name != reference:
                row[f"{name}_ratio"] = ms / r_ms if r_ms else float("nan")
        rows.append(row)
    return rows
