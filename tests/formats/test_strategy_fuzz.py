"""Property-based fuzzing of the strategy readers: random and mutated protobuf bytes and JSON documents give a
`Strategy` or a `FormatError` (never another exception), quickly. A read strategy is then planned against
shapes built from its own tensor maps, which may only raise the project's errors too."""

import json
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxreshard.errors import JaxreshardError
from jaxreshard.formats.mindspore_strategy import read_strategy
from jaxreshard.mindspore import StrategyLayout

FIX = Path(__file__).parents[1] / "fixtures" / "mindspore" / "strategy"
SEEDS = [p.read_bytes() for p in sorted(FIX.glob("*.ckpt"))]
JSON_SEED = json.loads((FIX / "dp2mp2.json").read_text())
FUZZ = settings(max_examples=200, deadline=2000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def read_and_plan(path: Path) -> None:
    """Read, then resolve every parameter on a tensor whose dims suit its tensor map (project errors allowed)."""
    start = time.monotonic()
    try:
        strategy = read_strategy(path)
        ndims = {name: len(p.tensor_map) for name, p in strategy.params.items()}
        layout = StrategyLayout(strategy, ndims)
        for param in layout.resolve(ndims).values():
            param.global_ranks()
    except JaxreshardError as e:
        assert "\n" not in str(e)
    assert time.monotonic() - start < 2


@st.composite
def mutated(draw):
    """A fixture strategy with some bytes flipped, cut short, or with random bytes spliced in."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["flip", "cut", "splice"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[pos] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[pos:]
        else:
            data[pos:pos] = draw(st.binary(max_size=16))
    return bytes(data)


@FUZZ
@given(data=st.one_of(mutated(), st.binary(max_size=256)))
def test_protobuf_strategies(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "s.ckpt"
    path.write_bytes(data)
    read_and_plan(path)


VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-3, 2**33), st.floats(allow_nan=True), st.text(max_size=4)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=12,
)
LAYOUT_KEYS = ["dev_matrix", "tensor_map", "opt_weight_shard_step", "opt_weight_shard_size"]


@st.composite
def json_documents(draw):
    """The JSON fixture with some layout values replaced by random JSON values (or keys removed)."""
    doc = json.loads(json.dumps(JSON_SEED))
    layouts = doc["parallel_layout_item"]
    for _ in range(draw(st.integers(1, 4))):
        name = draw(st.sampled_from(sorted(layouts)))
        key = draw(st.sampled_from(LAYOUT_KEYS))
        if draw(st.booleans()):
            layouts[name][key] = draw(VALUES)
        elif key in layouts[name]:
            del layouts[name][key]
    if draw(st.integers(0, 9)) == 0:
        doc["parallel_strategy_item"] = draw(VALUES)
    if draw(st.integers(0, 9)) == 0:
        doc = draw(VALUES)
    return doc


@FUZZ
@given(doc=json_documents())
def test_json_strategies(tmp_path_factory, doc):
    path = tmp_path_factory.mktemp("fuzz") / "s.json"
    path.write_text(json.dumps(doc))
    read_and_plan(path)


@FUZZ
@given(dev=st.lists(st.integers(0, 64), min_size=0, max_size=5),
       tmap=st.lists(st.one_of(st.integers(-2, 5), st.lists(st.integers(-2, 5), max_size=3)), max_size=4),
       step=st.integers(-2, 64), size=st.integers(-2, 64))
def test_json_layout_values(tmp_path_factory, dev, tmap, step, size):
    """Every combination of small raw values: the reader and the expansion raise only project errors."""
    doc = {"current_stage": 1, "parallel_strategy_item": {"op": {"stage": 0, "parallel_strategy": [[1]]}},
           "parallel_layout_item": {"w": {"dev_matrix": dev, "tensor_map": tmap, "opt_weight_shard_step": step,
                                          "opt_weight_shard_size": size}}}
    path = tmp_path_factory.mktemp("fuzz") / "s.json"
    path.write_text(json.dumps(doc))
    read_and_plan(path)
