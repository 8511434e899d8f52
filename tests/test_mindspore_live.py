"""Optional live tier: fresh random cases converted by REAL MindSpore, reproduced byte for byte by jaxreshard.

MindSpore needs numpy<2, so it usually lives in another interpreter: set JAXRESHARD_MINDSPORE_PYTHON to a python
where `import mindspore` works (or run the tests under such a python). Without one every test here is skipped.

Each case draws, from its seed, parameters (f32/f16/bf16/int32, a scalar, passthrough `global_step` and
`learning_rate`), two layouts A and B (random dev_matrix factorizations of 2/4/8 devices, random tensor maps,
sometimes optimizer shard, a multi-axis Layout map, 2 pipeline stages, a parameter missing from one side) and three
conversions: complete -> A, A -> B, B -> complete. `tools/mindspore_reference.py` makes the checkpoint, the strategy
files and MindSpore's outputs in one subprocess; each test converts the same inputs with `jaxreshard.convert` and
compares every output file. A conversion MindSpore rejects is skipped; any difference from MindSpore fails.

Knobs: JAXRESHARD_LIVE_CASES (number of cases, default one per FEATURES entry = 12; case i forces FEATURES[i % 12]),
JAXRESHARD_LIVE_SEED (base seed, default 0; case i uses seed BASE*1000+i). A failure message lists the case's
params and layouts; rerun one case with -k "case3-".
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

import jaxreshard

from .helpers import tree as outputs  # every file but the manifest, by relative path
from .wire import fields

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "tools" / "mindspore_reference.py"
N_CASES = int(os.environ.get("JAXRESHARD_LIVE_CASES", "0"))  # 0: one case per entry of FEATURES
BASE_SEED = int(os.environ.get("JAXRESHARD_LIVE_SEED", "0"))
MAX_DEVICES = 8  # tests/conftest.py gives JAX 8 CPU devices: the most devices per pipeline stage
CONVERSIONS = [  # name, source (complete or an earlier conversion), src strategy, dst strategy
    ("complete_to_A", "complete", None, "A"),
    ("A_to_B", "complete_to_A", "A", "B"),
    ("B_to_complete", "A_to_B", "B", None),
]


# --------------------------------------------------------------------------------------------------------------
# Which interpreter has MindSpore


@functools.cache
def mindspore_python() -> tuple[str | None, str]:
    """(python with a working `import mindspore`, reason when there is none)."""
    env = os.environ.get("JAXRESHARD_MINDSPORE_PYTHON")
    if env:
        candidate = env
    elif importlib.util.find_spec("mindspore") is not None:
        candidate = sys.executable
    else:
        return None, ("no MindSpore: set JAXRESHARD_MINDSPORE_PYTHON to a python where `import mindspore` works "
                      "(MindSpore needs numpy<2, so not the project venv)")
    try:
        done = subprocess.run([candidate, "-c", "import mindspore"], capture_output=True, text=True, timeout=180)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"cannot run {candidate!r} to import mindspore: {e}"
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["?"]
        return None, f"`import mindspore` fails in {candidate!r}: {tail[0]}"
    return candidate, ""


# --------------------------------------------------------------------------------------------------------------
# Random cases (pure Python, deterministic per seed)


def factorizations(n: int, k: int) -> list[tuple[int, ...]]:
    """Ordered k-tuples of positive ints with product n."""
    if k == 1:
        return [(n,)]
    return [(d,) + rest for d in range(1, n + 1) if n % d == 0 for rest in factorizations(n // d, k - 1)]


def plain_layout(rng: random.Random, n: int, ndim: int) -> dict:
    """A random dev_matrix of n devices and a tensor map giving each tensor dim at most one distinct axis."""
    dev = list(rng.choice(factorizations(n, rng.randint(1, 3))))
    axes = list(range(len(dev)))  # tensor-map values count axes from the right
    rng.shuffle(axes)
    tmap = []
    for _ in range(ndim):
        tmap.append(axes.pop() if axes and rng.random() < 0.6 else -1)
    return {"dev_matrix": dev, "tensor_map": tmap, "opt_shard_step": 0, "opt_shard_size": 0}


def opt_layout(rng: random.Random, n: int, ndim: int, two_mp: bool = False) -> dict | None:
    """Optimizer shard, simple case of MindSpore's expansion: dev_matrix[0] is the only repeated axis, every other
    axis > 1 is a model-parallel axis; step = product of the other axes, size 2 or -1 (whole group). `two_mp` asks for
    two model-parallel axes of 2 (8 devices, 2-D+ tensor): with a map not in descending order that is the quirk of
    MindSpore's expansion (the expanded layout orders the axes by tensor dim)."""
    if two_mp and n == 8 and ndim >= 2:
        dp, mp_axes = 2, [2, 2]
    else:
        dps = [d for d in (2, 4, 8) if n % d == 0]
        for _ in range(10):
            dp = rng.choice(dps)
            mp_axes = [a for a in rng.choice(factorizations(n // dp, rng.randint(1, 2))) if a > 1]
            if len(mp_axes) <= ndim:
                break
        else:
            return None
    rest = mp_axes + [1] * rng.randint(0, 1)
    rng.shuffle(rest)
    dev = [dp] + rest
    tmap = [-1] * ndim
    dims = rng.sample(range(ndim), len(mp_axes))
    free = [j for j in range(1, len(dev)) if dev[j] == 1]
    for j in range(1, len(dev)):
        if dev[j] > 1:
            tmap[dims.pop()] = len(dev) - 1 - j
    for d in range(ndim):  # an axis of size 1 may be named too, as real files do (map [1, 0] on dev [dp, 1, 1])
        if tmap[d] == -1 and free and rng.random() < 0.5:
            tmap[d] = len(dev) - 1 - free.pop()
    return {"dev_matrix": dev, "tensor_map": tmap, "opt_shard_step": math.prod(dev[1:]),
            "opt_shard_size": rng.choice([2, -1])}


def multi_axis_layout(rng: random.Random, n: int, ndim: int) -> dict | None:
    """A mindspore.parallel.Layout map: one tensor dim split over two device axes."""
    pairs = [f for f in factorizations(n, 2) if f[0] > 1 and f[1] > 1]
    if not pairs:
        return None
    dev = list(rng.choice(pairs))
    tmap: list = [-1] * ndim
    tmap[rng.randrange(ndim)] = rng.choice([[1, 0], [0, 1]])
    return {"dev_matrix": dev, "tensor_map": tmap, "opt_shard_step": 0, "opt_shard_size": 0}


def make_params(rng: random.Random) -> tuple[list[dict], list[str]]:
    """(every param of the complete checkpoint, the names a strategy may lay out)."""
    params, sharded = [], []
    for i in range(rng.randint(3, 6)):
        shape = [rng.choice([8, 16, 32]) for _ in range(rng.randint(1, 3))]
        name = f"layers.{i}.{rng.choice(['weight', 'bias', 'table'])}"
        params.append({"name": name, "shape": shape, "dtype": rng.choice(["f32", "f16", "bf16", "int32"])})
        sharded.append(name)
        if i == 0 and rng.random() < 0.5:
            for moment in ("adam_m", "adam_v"):  # optimizer states, laid out like their weight
                params.append({"name": f"{moment}.{name}", "shape": shape, "dtype": "f32"})
                sharded.append(f"{moment}.{name}")
    params.append({"name": "scale", "shape": [], "dtype": "f32"})
    if rng.random() < 0.5:
        sharded.append("scale")  # a scalar in the strategy: dev_matrix only, empty tensor map
    params += [{"name": "global_step", "shape": [1], "dtype": "int32"},  # in no strategy: passed through
               {"name": "learning_rate", "shape": [], "dtype": "f32"}]
    return params, sharded


def make_strategy(rng: random.Random, shapes: dict, names: list[str], n: int, stages: int, opt: bool,
                  multi: bool, shared_differs: bool, two_mp: bool) -> dict:
    """{"stages": [{name: layout}]} over n devices per stage; with 2 stages names[0] is shared by both."""
    def layout(name: str) -> dict:
        ndim = len(shapes[name])
        if ndim == 0:
            return {"dev_matrix": list(rng.choice(factorizations(n, rng.randint(1, 2)))), "tensor_map": [],
                    "opt_shard_step": 0, "opt_shard_size": 0}
        made = None
        if opt and rng.random() < 0.7:
            made = opt_layout(rng, n, ndim, two_mp)
        elif multi and rng.random() < 0.5:
            made = multi_axis_layout(rng, n, ndim)
        return made or plain_layout(rng, n, ndim)

    base = [n for n in names if not n.startswith(("adam_m.", "adam_v."))]
    chosen = {name: layout(name) for name in base}
    for name in names:  # optimizer states copy their weight's layout
        if name not in chosen:
            chosen[name] = chosen[name.split(".", 1)[1]]
    if stages == 1:
        return {"stages": [{name: chosen[name] for name in names}]}
    owner = {name: rng.randrange(2) for name in base}
    owner[base[0]] = -1  # shared by both stages (an embedding used by the first and the last stage)
    for name in names:  # optimizer states live with their weight
        if name not in owner:
            owner[name] = owner[name.split(".", 1)[1]]
    per_stage: list[dict] = [{}, {}]
    for name in names:
        for stage in ((0, 1) if owner[name] == -1 else (owner[name],)):
            per_stage[stage][name] = chosen[name]
    if shared_differs and shapes[base[0]]:  # the shared param laid out differently in stage 1
        per_stage[1][base[0]] = plain_layout(rng, n, len(shapes[base[0]]))
    return {"stages": per_stage}


FEATURES = [  # case i forces features[i % len]; everything else is random
    {},
    {"opt_A": True},
    {"opt_B": True},
    {"pp_A": True, "opt_A": True},
    {"pp_B": True, "opt_B": True},
    {"pp_A": True, "pp_B": True},
    {"multi_A": True, "multi_B": True},
    {"drop_A": True},  # a param missing from A only: A -> B takes MindSpore's by-stage path
    {"drop_B": True},  # a param missing from B: its A slices are passed through verbatim
    {"pp_A": True, "pp_B": True, "opt_A": True, "opt_B": True},
    {"opt_A": True, "two_mp_A": True, "opt_B": True, "two_mp_B": True},
    # a param shared by both pipeline stages with a different layout in each (e.g. an embedding split one way by
    # the first stage's Gather, another way by the last stage's MatMul). MindSpore reads such a parameter only
    # from the stages laid out like its lowest stage; this case found that jaxreshard first got it wrong.
    {"pp_A": True, "shared_differs_A": True, "pp_B": True, "shared_differs_B": True},
]


def make_case(index: int, seed: int) -> dict:
    rng = random.Random(seed)
    forced = FEATURES[index % len(FEATURES)]
    flags = {f"{k}_{side}": forced.get(f"{k}_{side}", False) for side in "AB"
             for k in ("opt", "pp", "multi", "drop", "two_mp", "shared_differs")}
    params, sharded = make_params(rng)
    shapes = {p["name"]: p["shape"] for p in params}
    strategies = {}
    for side in "AB":
        stages = 2 if flags[f"pp_{side}"] else 1
        n = rng.choice([2, 4]) if stages == 2 else 8 if flags[f"two_mp_{side}"] else rng.choice([2, 4, 8])
        names = list(sharded)
        if flags[f"drop_{side}"]:
            names.remove(rng.choice([x for x in names[1:] if not x.startswith(("adam_m.", "adam_v."))] or names))
        strategies[side] = make_strategy(rng, shapes, names, n, stages, flags[f"opt_{side}"], flags[f"multi_{side}"],
                                         flags[f"shared_differs_{side}"], flags[f"two_mp_{side}"])
    return {
        "name": f"case{index}", "seed": seed, "flags": flags, "params": params, "strategies": strategies,
        "prefix": rng.choice(["checkpoint_", "ms_"]), "exact_replicas": rng.random() < 0.5,
    }


def with_conversions(case: dict) -> dict:
    case["conversions"] = [{"name": c, "src": s, "src_strategy": a, "dst_strategy": b, "prefix": case["prefix"]}
                           for c, s, a, b in CONVERSIONS]
    return case


CASES = [with_conversions(make_case(i, BASE_SEED * 1000 + i)) for i in range(N_CASES or len(FEATURES))]


# --------------------------------------------------------------------------------------------------------------
# Reference run (one MindSpore subprocess for every case) and comparison


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    python, reason = mindspore_python()
    if python is None:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("mindspore_live")
    job = {"cases": [dict(c, dir=str(root / c["name"])) for c in CASES], "result": str(root / "result.json")}
    (root / "job.json").write_text(json.dumps(job))
    env = dict(os.environ, GLOG_v="3")  # MindSpore's C++ logging: errors only
    done = subprocess.run([python, str(REFERENCE), str(root / "job.json")], capture_output=True, text=True,
                          timeout=600, env=env, cwd=root)
    if done.returncode != 0 or not (root / "result.json").exists():
        pytest.fail(f"{REFERENCE.name} failed (rc {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads((root / "result.json").read_text())["cases"]




def records(data: bytes) -> list[tuple[str, tuple[int, ...], str, bytes]]:
    """(tag, dims, tensor_type, content) per record of a .ckpt, for readable failure messages."""
    out = []
    for _, value in fields(data):
        tag, dims, ttype, content = "", [], "", b""
        for num, v in fields(value):
            if num == 1:
                tag = v.decode()
            elif num == 2:
                for tn, tv in fields(v):
                    if tn == 1:
                        dims.append(tv if tv < 2**63 else tv - 2**64)
                    elif tn == 2:
                        ttype = tv.decode()
                    elif tn == 3:
                        content = tv
        out.append((tag, tuple(dims), ttype, content))
    return out


def describe(name: str, got: bytes, want: bytes) -> str:
    try:
        g, w = records(got), records(want)
    except (IndexError, UnicodeDecodeError) as e:
        return f"{name}: bytes differ ({len(got)} vs {len(want)} B; not parseable: {e!r})"
    if [r[0] for r in g] != [r[0] for r in w]:
        return f"{name}: parameter order/names differ: got {[r[0] for r in g]}, MindSpore {[r[0] for r in w]}"
    diffs = [f"{a[0]}: got {a[2]}{list(a[1])} ({len(a[3])} B), MindSpore {b[2]}{list(b[1])} ({len(b[3])} B)"
             + (" — content differs" if a[3] != b[3] else "") for a, b in zip(g, w) if a != b]
    return f"{name}: " + ("; ".join(diffs) or "bytes differ outside the records")


def case_summary(case: dict) -> str:
    lines = [f"{case['name']} seed={case['seed']} flags={[k for k, v in case['flags'].items() if v]} "
             f"prefix={case['prefix']!r} exact_replicas={case['exact_replicas']}"]
    lines += [f"  param {p['name']} {p['dtype']}{p['shape']}" for p in case["params"]]
    for side, spec in case["strategies"].items():
        for stage, params in enumerate(spec["stages"]):
            for name, lay in params.items():
                lines.append(f"  {side} stage{stage} {name}: dev={lay['dev_matrix']} map={lay['tensor_map']} "
                             f"opt=({lay['opt_shard_step']},{lay['opt_shard_size']})")
    return "\n".join(lines)


PAIRS = [(case, conv[0]) for case in CASES for conv in CONVERSIONS]


@pytest.mark.parametrize(("case", "conversion"), PAIRS, ids=[f"{c['name']}-{n}" for c, n in PAIRS])
def test_live_conversion_matches_mindspore(reference, tmp_path, case, conversion):
    ref = reference[case["name"]]
    if "error" in ref:
        pytest.skip(f"MindSpore could not build the inputs of {case['name']}: {ref['error']}")
    done = ref["conversions"][conversion]
    if not done["ok"]:
        pytest.skip(f"MindSpore rejects {case['name']}/{conversion}: {done['error']}")
    dst = tmp_path / "out"
    try:
        jaxreshard.convert(
            done["src"], dst, src_strategy=done["src_strategy"], dst_strategy=done["dst_strategy"],
            output_format="ckpt", exact_replicas=case["exact_replicas"], prefix=case["prefix"],
        )  # fmt: skip
    except jaxreshard.JaxreshardError as e:
        pytest.fail(f"{conversion}: MindSpore converts this, jaxreshard raises {type(e).__name__}: {e}\n"
                    f"{case_summary(case)}")
    got, want = outputs(dst), outputs(Path(done["out"]))
    assert sorted(got) == sorted(want), f"output files differ\n{case_summary(case)}"
    bad = [describe(name, got[name], want[name]) for name in want if got[name] != want[name]]
    assert not bad, f"{conversion}: {len(bad)} of {len(want)} files differ from MindSpore:\n" + "\n".join(
        bad[:8]) + f"\n{case_summary(case)}"
