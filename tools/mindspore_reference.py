#!/usr/bin/env python
"""Make reference conversions with REAL MindSpore, for tests/test_mindspore_live.py.

Run it with an interpreter that has `mindspore` (not the project's: MindSpore needs numpy<2), e.g.

    /work/msvenv/bin/python tools/mindspore_reference.py job.json      # or: ... < job.json, or a JSON string

It never imports jaxreshard. A job is one case or {"cases": [case, ...], "result": "/path/result.json"}; a case:

    {"name": "c0", "dir": "/tmp/c0", "seed": 7,
     "params": [{"name": "w", "shape": [16, 32], "dtype": "bf16"}, ...],    # f32 f16 bf16 int32; [] = scalar
     "strategies": {"A": {"stages": [{"w": {"dev_matrix": [2, 2], "tensor_map": [1, -1],
                                             "opt_shard_step": 0, "opt_shard_size": 0}}, ...]}, ...},
     "conversions": [{"name": "complete_to_A", "src": "complete", "src_strategy": null, "dst_strategy": "A",
                      "prefix": "checkpoint_"}, ...]}

For each case it writes, under `dir`:
* `complete/rank_0/checkpoint_0.ckpt`: every param, random seeded values, by `mindspore.save_checkpoint`
  (params absent from every strategy are passed through by the transform);
* `strategy/<S>.ckpt`: a one-stage strategy, or for several stages `strategy/<S>_stages/ckpt_strategy_rank_<r>.ckpt`
  (one per rank, identical inside a stage) merged by `mindspore.merge_pipeline_strategys` into `strategy/<S>.ckpt`.
  Files are filled with MindSpore's own `node_strategy_pb2` classes as its C++ writer fills them. A
  tensor-map entry that is a list is a multi-axis (Layout) entry: one TensorMap per dim, plus an empty one for 1-D;
* `out/<conversion>/`: `mindspore.transform_checkpoints(src, out, prefix, src_strategy, dst_strategy)`, where
  `src` is "complete" or the name of an earlier conversion of the case (its output dir).

The result (JSON, to `result` or stdout) maps case -> {"complete", "strategies": {S: path}, "conversions":
{name: {"ok", "src", "out", "seconds"} or {"ok": false, "error"}}}. A conversion MindSpore rejects is recorded,
not raised; conversions whose source failed are recorded as failed too.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

import mindspore as ms
import numpy as np
from mindspore import Tensor
from mindspore.train import node_strategy_pb2 as pb

DTYPES = {"f32": ms.float32, "f16": ms.float16, "bf16": ms.bfloat16, "int32": ms.int32}


def random_tensor(rng: np.random.Generator, shape: list[int], dtype: str) -> Tensor:
    if dtype == "int32":
        return Tensor(rng.integers(-(2**31), 2**31 - 1, size=shape, dtype=np.int64).astype(np.int32))
    values = rng.standard_normal(shape).astype(np.float32)
    if dtype == "f16":
        return Tensor(values.astype(np.float16))
    if dtype == "bf16":  # fp32 -> bf16 inside MindSpore (its own rounding); the ckpt holds raw bf16 bits
        return Tensor(values, ms.bfloat16)
    return Tensor(values)


def write_complete(case: dict, path: str) -> None:
    rng = np.random.default_rng(case["seed"])
    items = [{"name": p["name"], "data": random_tensor(rng, list(p["shape"]), p["dtype"])} for p in case["params"]]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    ms.save_checkpoint(items, path)


def split_counts(dev_matrix: list[int], tensor_map: list) -> list[int]:
    out = []
    for m in tensor_map:
        axes = m if isinstance(m, list) else [m]
        k = 1
        for a in axes:
            if a != -1:
                k *= dev_matrix[len(dev_matrix) - 1 - a]
        out.append(k)
    return out


def stage_strategy(params: dict, stage: int) -> bytes:
    """One stage's ParallelStrategyMap, as the C++ StrategyCheckpointInfo::to_protobuf fills it."""
    msg = pb.ParallelStrategyMap()
    msg.current_stage = 1
    for i, (_name, lay) in enumerate(params.items()):  # one operator per parameter, first one carries the stage
        item = msg.parallel_strategy_item.add()
        item.node_name = f"Default/network-Net/Op{stage}_{i}-op{i}"
        item.parallel_strategys.stage = stage
        item.parallel_strategys.parallel_strategy.add().dim.extend(split_counts(lay["dev_matrix"], lay["tensor_map"]))
    for name, lay in params.items():
        item = msg.parallel_layout_item.add()
        item.param_name = name
        layouts = item.parallel_layouts
        layouts.dev_matrix.add().dim.extend(lay["dev_matrix"])
        tmap = lay["tensor_map"]
        if any(isinstance(m, list) for m in tmap):
            for m in tmap:
                layouts.tensor_map.add().dim.extend(m if isinstance(m, list) else [m])
            if len(tmap) == 1:
                layouts.tensor_map.add()
        else:
            layouts.tensor_map.add().dim.extend(tmap)
        layouts.param_split_shape.add()
        layouts.indices_offset.add()
        layouts.field = 0
        layouts.opt_weight_shard_step = int(lay.get("opt_shard_step", 0))
        layouts.opt_weight_shard_size = int(lay.get("opt_shard_size", 0))
    return msg.SerializeToString()


def write_strategy(root: str, name: str, spec: dict) -> str:
    stages = spec["stages"]
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, f"{name}.ckpt")
    if len(stages) == 1:
        with open(path, "wb") as f:
            f.write(stage_strategy(stages[0], 0))
        return path
    stage_dir = os.path.join(root, f"{name}_stages")
    os.makedirs(stage_dir, exist_ok=True)
    for stage, params in enumerate(stages):
        first = next(iter(params.values()))
        n = int(np.prod(first["dev_matrix"]))
        data = stage_strategy(params, stage)
        for local in range(n):  # every rank of a stage saves the same file
            with open(os.path.join(stage_dir, f"ckpt_strategy_rank_{stage * n + local}.ckpt"), "wb") as f:
                f.write(data)
    ms.merge_pipeline_strategys(stage_dir, path)
    return path


def run_case(case: dict) -> dict:
    root = case["dir"]
    complete = os.path.join(root, "complete", "rank_0", "checkpoint_0.ckpt")
    write_complete(case, complete)
    strategies = {n: write_strategy(os.path.join(root, "strategy"), n, s) for n, s in case["strategies"].items()}
    dirs = {"complete": os.path.dirname(os.path.dirname(complete))}
    results: dict = {}
    for conv in case["conversions"]:
        name, src = conv["name"], conv["src"]
        if src not in dirs:
            results[name] = {"ok": False, "error": f"source {src!r} was not produced"}
            continue
        out = os.path.join(root, "out", name)
        src_strategy = strategies[conv["src_strategy"]] if conv.get("src_strategy") else None
        dst_strategy = strategies[conv["dst_strategy"]] if conv.get("dst_strategy") else None
        start = time.perf_counter()
        try:
            ms.transform_checkpoints(dirs[src], out, conv.get("prefix", "checkpoint_"),
                                     src_strategy_file=src_strategy, dst_strategy_file=dst_strategy)
        except Exception as e:  # noqa: BLE001  a MindSpore limitation, reported to the caller
            results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                             "traceback": traceback.format_exc(limit=3)}
            continue
        dirs[name] = out
        results[name] = {"ok": True, "src": dirs[src], "out": out, "src_strategy": src_strategy,
                         "dst_strategy": dst_strategy, "seconds": round(time.perf_counter() - start, 4)}
    return {"complete": complete, "strategies": strategies, "conversions": results}


def main(argv: list[str]) -> int:
    arg = argv[1] if len(argv) > 1 else sys.stdin.read()
    if os.path.isfile(arg):
        with open(arg) as f:
            arg = f.read()
    job = json.loads(arg)
    cases = job["cases"] if "cases" in job else [job]
    result = {"mindspore_version": ms.__version__, "numpy_version": np.__version__, "cases": {}}
    for case in cases:
        try:
            result["cases"][case["name"]] = run_case(case)
        except Exception as e:  # noqa: BLE001  writing inputs failed: report the case, go on with the others
            result["cases"][case["name"]] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    text = json.dumps(result, indent=1)
    if job.get("result"):
        with open(job["result"], "w") as f:
            f.write(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
