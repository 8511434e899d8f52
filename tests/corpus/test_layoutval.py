"""Bad layouts, strategies, job files and numeric options: each refused with exit 2 and one line, in seconds."""

from __future__ import annotations

import json
import os
from pathlib import Path

from jaxreshard.caps import MAX_RANKS, MAX_YAML_BYTES
from jaxreshard.formats.mindspore_strategy import ParallelStrategyMap

from .harness import Case, corpus_test

STRATEGIES = Path(__file__).parents[1] / "fixtures" / "mindspore" / "strategy"
BOMB = "\n".join(['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]'] + [
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]) + "\n"


def layout(text: str | bytes):
    """Setup writing {tmp}/l.yaml with `text` (a mesh/params layout)."""
    def setup(tmp: Path) -> None:
        (tmp / "l.yaml").write_bytes(text if isinstance(text, bytes) else text.encode())
    return setup


def job(text: str | bytes):
    """Setup writing {tmp}/job.yaml: a `plan` job on the example checkpoint plus `text`."""
    def setup(tmp: Path) -> dict[str, str]:
        body = text if isinstance(text, bytes) else text.encode()
        (tmp / "job.yaml").write_bytes(body.replace(b"LLAMA", str(tmp / "llama").encode()))
        return {}
    return setup


def fifo(name: str):
    def setup(tmp: Path) -> None:
        os.mkfifo(tmp / name)
    return setup


def proto(edit, base: str = "dp2mp2.ckpt"):
    """Setup writing {tmp}/s.ckpt: a fixture strategy with `edit(layouts by name)` applied."""
    def setup(tmp: Path) -> None:
        msg = ParallelStrategyMap()
        msg.ParseFromString((STRATEGIES / base).read_bytes())
        edit({i.param_name: i.parallel_layouts for i in msg.parallel_layout_item})
        (tmp / "s.ckpt").write_bytes(msg.SerializeToString())
    return setup


def as_json(edit):
    """Setup writing {tmp}/s.json: the JSON fixture strategy with `edit(layouts by name)` applied."""
    def setup(tmp: Path) -> None:
        doc = json.loads((STRATEGIES / "dp2mp2.json").read_text())
        edit(doc["parallel_layout_item"])
        (tmp / "s.json").write_text(json.dumps(doc))
    return setup


def dims(field, values) -> None:
    del field.dim[:]
    field.dim.extend(values)


def _folder_of_two_jobs(tmp: Path) -> None:
    """A pipeline strategy folder whose stage-1 file comes from a job 4 times larger."""
    (tmp / "pp").mkdir()
    src = STRATEGIES / "pp_stages"
    (tmp / "pp" / "ckpt_strategy_rank_0.ckpt").write_bytes((src / "ckpt_strategy_rank_0.ckpt").read_bytes())
    msg = ParallelStrategyMap()
    msg.ParseFromString((src / "ckpt_strategy_rank_2.ckpt").read_bytes())
    for item in msg.parallel_layout_item:
        first, *rest = item.parallel_layouts.dev_matrix[0].dim
        dims(item.parallel_layouts.dev_matrix[0], [first * 4, *rest])
    (tmp / "pp" / "ckpt_strategy_rank_2.ckpt").write_bytes(msg.SerializeToString())


PLAN_L = ["plan", "--src", "{llama}", "--dst-layout", "{tmp}/l.yaml"]
PLAN_S = ["plan", "--src", "{llama}", "--dst-strategy", "{tmp}/s.ckpt"]
PLAN_J = ["plan", "--src", "{llama}", "--dst-strategy", "{tmp}/s.json"]
CONVERT = ["convert", "--src", "{llama}", "--dst", "{tmp}/out"]
JOB = ["--config", "{tmp}/job.yaml"]
RULE = "params:\n  - {match: '%s', spec: []}\n"

CASES = [
    # native layouts
    Case("layout-mesh-zero", PLAN_L, 2, r"l\.yaml: mesh axis 'dp' has size 0; sizes must be positive integers",
         layout("mesh: {dp: 0}\n")),
    Case("layout-mesh-bool", PLAN_L, 2, r"l\.yaml: mesh axis 'dp' has size True", layout("mesh: {dp: true}\n")),
    Case("layout-mesh-float", PLAN_L, 2, r"mesh axis 'mp' has size 2\.5", layout("mesh: {dp: 2, mp: 2.5}\n")),
    Case("layout-mesh-65536", PLAN_L, 2, rf"l\.yaml: mesh \{{'dp': 65536\}} has over {MAX_RANKS} devices",
         layout("mesh: {dp: 65536}\n")),
    Case("layout-mesh-2pow20", PLAN_L, 2, rf"over {MAX_RANKS} devices", layout("mesh: {dp: 1024, mp: 1024}\n")),
    Case("layout-too-many-axes", PLAN_L, 2, r"40 axes, over the cap of 32",
         layout("mesh: {" + ", ".join(f"a{i}: 1" for i in range(40)) + "}\n")),
    Case("layout-stages-cap", PLAN_L, 2, r"100000 pipeline stages x 8 devices = 800000 ranks, over the cap",
         layout("mesh: {dp: 8}\npipeline_stages: 100000\n")),
    Case("layout-regex-nested-plus", PLAN_L, 2, r"params\[0\]: match regex '\(a\+\)\+\$' could take exponential",
         layout(RULE % "(a+)+$")),
    Case("layout-regex-nested-star", PLAN_L, 2, r"nests a repeat inside an unbounded repeat", layout(RULE % "(.*)*x")),
    Case("layout-regex-alternation", PLAN_L, 2, r"repeats an alternation", layout(RULE % "(a|aa)*b")),
    Case("layout-regex-not-string", PLAN_L, 2, r"params\[0\]: match must be a regex string, got int",
         layout("params:\n  - {match: 5, spec: []}\n")),
    Case("layout-stage-bool", PLAN_L, 2, r"params\[0\]: stage must be an integer", layout(
        "pipeline_stages: 2\nparams:\n  - {match: '.*', spec: [], stage: true}\n")),
    Case("layout-alias-bomb", PLAN_L, 2, r"l\.yaml: layout file is not valid YAML: line \d+, column \d+: expands",
         layout(BOMB)),
    Case("layout-non-utf8", PLAN_L, 2, r"l\.yaml: layout file is not UTF-8 text \(byte 0xff",
         layout(b"mesh: {\xff: 2}\n")),
    Case("layout-deep", PLAN_L, 2, r"nested deeper than 64 levels", layout("params: " + "[" * 5000 + "]" * 5000)),
    Case("layout-multiline-yaml-error", PLAN_L, 2, r"l\.yaml: layout file is not valid YAML: line 2, column \d+: ",
         layout("mesh: {dp: 2\nparams: []\n")),
    Case("layout-too-big", PLAN_L, 2, rf"over the cap of {MAX_YAML_BYTES}", layout("#" * (MAX_YAML_BYTES + 1))),
    Case("layout-fifo", ["plan", "--src", "{llama}", "--dst-layout", "{tmp}/fifo.yaml"], 2,
         r"fifo\.yaml: layout file is not a regular file", fifo("fifo.yaml")),
    Case("layout-dev-null", ["plan", "--src", "{llama}", "--dst-layout", "/dev/null"], 2,
         r"/dev/null: layout file is not a regular file"),
    # job files
    Case("job-alias-bomb", JOB, 2, r"job\.yaml: job config is not valid YAML: line \d+, column \d+: expands",
         job(BOMB)),
    Case("job-non-utf8", JOB, 2, r"job\.yaml: job config is not UTF-8 text", job(b"task: plan\nsrc: \xc3\x28\n")),
    Case("job-fifo", ["--config", "{tmp}/fifo.yaml"], 2, r"fifo\.yaml: job config is not a regular file",
         fifo("fifo.yaml")),
    Case("job-dtype-list", JOB, 2, r"job\.yaml: dtype must be a single value, got a list \['bf16', 'fp16'\]",
         job("task: plan\nsrc: LLAMA\ndtype: [bf16, fp16]\n")),
    Case("job-duplicate-key", JOB, 2, r"job\.yaml: job config is not valid YAML: line 3, column 1: duplicate key 'src'",
         job("task: plan\nsrc: a\nsrc: b\n")),
    Case("job-multiline-yaml-error", JOB, 2, r"job\.yaml: .* line 3, column 1: while scanning a quoted scalar "
         r"\(started at line 2, column 6\); found unexpected end", job("task: plan\nsrc: 'a\n")),
    Case("job-deep", JOB, 2, r"nested deeper than 64 levels", job("src: " + "{a: " * 100 + "1" + "}" * 100)),
    # numbers
    Case("ranks-300-million", CONVERT + ["--ranks", "0-300000000"], 2,
         rf"--ranks '0-300000000': rank 300000000 is beyond the cap of {MAX_RANKS} ranks"),
    Case("ranks-non-ascii-digit", ["plan", "--src", "{llama}", "--ranks", "\u0663"], 2, r"is not a rank list"),
    Case("process-num-zero", CONVERT + ["--process-num", "0"], 2,
         r"--process-num must be an integer in 1\.\.1024, got 0"),
    Case("process-num-negative", CONVERT + ["--process-num", "-4"], 2, r"--process-num must be an integer in 1\.\.\d+"),
    Case("process-num-huge", CONVERT + ["--process-num", "9" * 30], 2, r"--process-num must be an integer in 1\.\.\d+"),
    Case("num-processes-zero", CONVERT + ["--coordinator-address", "localhost:1234", "--num-processes", "0",
                                          "--process-id", "0"], 2, r"--num-processes must be an integer in 1\.\."),
    Case("process-id-negative", CONVERT + ["--coordinator-address", "localhost:1234", "--num-processes", "2",
                                           "--process-id", "-1"], 2, r"--process-id must be an integer in 0\.\."),
    Case("coordinator-no-port", CONVERT + ["--coordinator-address", "localhost", "--num-processes", "2",
                                           "--process-id", "0"], 2,
                                           r"--coordinator-address 'localhost' must be host:port"),
    Case("coordinator-port-zero", CONVERT + ["--coordinator-address", "10.0.0.1:0", "--num-processes", "2",
                                             "--process-id", "0"], 2, r"with a port in 1\.\.65535"),
    Case("max-file-size-zero", CONVERT + ["--hf", "--max-file-size", "0"], 2,
         r"--max-file-size must be at least 1 byte"),
    Case("lora-scaling-nan", ["merge-lora", "--src", "{llama}", "--dst", "{tmp}/out", "--adapter", "{tmp}",
                              "--lora-scaling", "nan"], 2, r"--lora-scaling must be a finite number, got 'nan'"),
    # MindSpore strategies
    Case("strategy-dev-matrix-zero", PLAN_S, 2, r"s\.ckpt: parameter 'layer1\.bias': dev_matrix \[2, 0\] holds 0",
         proto(lambda L: dims(L["layer1.bias"].dev_matrix[0], [2, 0]))),
    Case("strategy-device-counts-differ", PLAN_S, 2,
         r"'layer1\.weight' \(stage 0\) is laid out on 16 devices but 'embedding\.embedding_table' on 4",
         proto(lambda L: dims(L["layer1.weight"].dev_matrix[0], [4, 2, 2]))),
    Case("strategy-2pow20-devices", PLAN_S, 2, rf"has over {MAX_RANKS} devices, the cap",
         proto(lambda L: [dims(x.dev_matrix[0], [1024, 1024]) for x in L.values()])),
    Case("strategy-tensor-map-out-of-range", PLAN_S, 2, r"'layer1\.bias': tensor_map \[7\] holds 7",
         proto(lambda L: dims(L["layer1.bias"].tensor_map[0], [7]))),
    Case("strategy-tensor-map-duplicated", PLAN_S, 2, r"uses device axis 1 twice",
         proto(lambda L: dims(L["layer1.weight"].tensor_map[0], [1, 1]))),
    Case("strategy-opt-shard-size", PLAN_S, 2, r"opt_weight_shard_size -7 must be",
         proto(lambda L: setattr(L["layer1.bias"], "opt_weight_shard_size", -7))),
    Case("strategy-json-float", PLAN_J, 2, r"s\.json: parameter 'layer1\.bias': dev_matrix \[2, 2\.5\] holds 2\.5",
         as_json(lambda L: L["layer1.bias"].update(dev_matrix=[2, 2.5]))),
    Case("strategy-json-string", PLAN_J, 2, r"dev_matrix \['2', 2\] holds '2'",
         as_json(lambda L: L["layer1.bias"].update(dev_matrix=["2", 2]))),
    Case("strategy-json-deep", PLAN_J, 2, r"s\.json: the JSON strategy file is nested too deeply",
         lambda tmp: (tmp / "s.json").write_text("[" * 100000 + "]" * 100000) and None),
    Case("strategy-fifo", ["plan", "--src", "{llama}", "--dst-strategy", "{tmp}/fifo.ckpt"], 2,
         r"fifo\.ckpt: the strategy file is not a regular file", fifo("fifo.ckpt")),
    Case("strategy-folder-two-jobs", ["plan", "--src", "{llama}", "--dst-strategy", "{tmp}/pp"], 2,
         r"pp: parameter .* \(stage 1\) is laid out on 8 devices but .* on 2", _folder_of_two_jobs),
]

test_case = corpus_test(CASES)
