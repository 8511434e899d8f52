"""Property-based fuzzing of layout dicts, layout YAML and job YAML: random and mutated inputs give a result or
the project's own one-line error, never another exception, quickly."""

import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxreshard.config import read_job
from jaxreshard.errors import JaxreshardError
from jaxreshard.layout import layout_from_dict, read_layout

REPO = Path(__file__).parents[1]
YAML_SEEDS = [p.read_text() for p in sorted((REPO / "configs").rglob("*.yaml"))]
FUZZ = settings(max_examples=200, deadline=2000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-5, 2**40), st.floats(), st.text(max_size=8),
                    st.sampled_from(["dp", "mp", "by_layer", r"l\.(\d+)", ".*", "(a+)+", "[", r"(\w+)"]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=10)
NAMES = st.lists(st.one_of(st.text(max_size=20), st.from_regex(r"l\.[0-9]{1,3}\.w", fullmatch=True)), max_size=8)


@st.composite
def layout_dicts(draw):
    """Mostly well-formed layouts with random sizes, specs, stages and patterns; sometimes anything at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(VALUES)
    mesh = draw(st.dictionaries(st.sampled_from(["dp", "mp", "pp", "x"]),
                                st.one_of(st.integers(-1, 70000), SCALARS), max_size=3))
    rule = st.fixed_dictionaries(
        {"match": st.one_of(st.sampled_from([r"l\.(\d+)\.w", ".*", r"(.*)*x", "[", r"(\w)+"]), SCALARS),
         "spec": st.one_of(st.lists(st.one_of(st.none(), st.sampled_from(["dp", "mp", "zz"]), SCALARS), max_size=3),
                           SCALARS)},
        optional={"stage": st.one_of(st.integers(-3, 3), st.just("by_layer"), SCALARS)})
    data = {"mesh": mesh, "params": draw(st.lists(rule, max_size=4))}
    if draw(st.booleans()):
        data["pipeline_stages"] = draw(st.one_of(st.integers(-1, 20000), SCALARS))
    return data


def only_project_errors(fn, *args):
    start = time.monotonic()
    try:
        fn(*args)
    except JaxreshardError as e:
        assert "\n" not in str(e)
    assert time.monotonic() - start < 2


@FUZZ
@given(data=layout_dicts(), names=NAMES)
def test_layout_dicts(data, names):
    def build_and_resolve():
        layout = layout_from_dict(data, "fuzz.yaml")
        for name, param in layout.resolve(names).items():
            assert all(0 <= s < layout.pipeline_stages for s in param.stages), name
            assert len(param.global_ranks()) <= layout.num_ranks
    only_project_errors(build_and_resolve)


@st.composite
def mutated_yaml(draw):
    """A shipped config or layout with characters replaced, inserted or cut."""
    text = list(draw(st.sampled_from(YAML_SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        pos = draw(st.integers(0, max(len(text) - 1, 0)))
        kind = draw(st.sampled_from(["set", "insert", "cut"]))
        piece = draw(st.sampled_from(list("[]{}:-&*!|>'\"\t\n#%@` ,?0") + ["\x00", "\xff", "&a", "*a", "<<: "]))
        if kind == "set" and text:
            text[pos] = piece
        elif kind == "insert":
            text.insert(pos, piece)
        else:
            del text[pos:pos + draw(st.integers(1, 40))]
    return "".join(text)


YAML_TEXTS = st.one_of(mutated_yaml(), st.text(max_size=200))


@FUZZ
@given(text=YAML_TEXTS, raw=st.booleans())
def test_layout_yaml(tmp_path_factory, text, raw):
    path = tmp_path_factory.mktemp("fuzz") / "layout.yaml"
    path.write_bytes(text.encode("latin-1", "replace") if raw else text.encode("utf-8", "surrogatepass"))
    only_project_errors(read_layout, path)


@FUZZ
@given(text=YAML_TEXTS)
def test_job_yaml(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "job.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    only_project_errors(read_job, path)
