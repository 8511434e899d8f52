"""Every fenced block of README.md is executed or checked (issue 11: the README stays honest).

`BLOCKS` classifies each block by its section and a snippet it contains. A block without an entry, or an entry
without its block, fails `test_every_block_is_classified`; a new example must be given a way to be checked.

- "run": a bash block run with bash in a sandbox folder holding the inputs it names (`PREPARE`), `python` and
  `jaxreshard` on PATH and `~` in that folder;
- "tested": run as written by the named test elsewhere (the test must exist and read the README);
- "synopsis": every `jaxreshard CMD` / `tools/X.py` it names exists and takes every `--flag` written after it;
  python synopses (needing a multi-process job) compile and their keyword arguments bind to the functions;
- "data": a layout, job, transform or manifest file that must parse as one (the manifest with the real keys);
- "setup": install and environment commands, whose files, extras and variables must exist;
- "diagram": the Development drawing, whose module names must exist.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

import jaxreshard as jr
from jaxreshard.commands import COMMANDS, make_parser, read_job
from jaxreshard.example import write_llama_checkpoint
from jaxreshard.formats.manifest import MANIFEST_NAME, read_manifest
from jaxreshard.layout import read_layout
from jaxreshard.rules import Rules

from .readme_sandbox import RUN

REPO = Path(__file__).parents[1]
README = (REPO / "README.md").read_text()
FENCE = re.compile(r"^( *)```(\w*)[ \t]*$")


@dataclass(frozen=True)
class Block:
    section: str
    lang: str
    text: str
    line: int


def readme_blocks(text: str = README) -> list[Block]:
    """Every fenced block (indented ones in lists too), with the `## ` section it sits in."""
    blocks, section, open_at = [], "", None
    lines = text.splitlines()
    for number, line in enumerate(lines, 1):
        if open_at is None and line.startswith("## "):
            section = line[3:].strip()
        match = FENCE.match(line)
        if not match:
            continue
        if open_at is None:
            open_at = (number, match.group(1), match.group(2))
        elif match.group(2) == "":
            start, indent, lang = open_at
            body = [raw[len(indent):] if raw.startswith(indent) else raw for raw in lines[start:number - 1]]
            blocks.append(Block(section, lang, "\n".join(body) + "\n", start))
            open_at = None
    assert open_at is None, f"README.md:{open_at[0]}: a fence that is never closed"
    return blocks


# (section, snippet, language, kind, how/why)
BLOCKS = [
    ("", "pip install -e .", "bash", "setup",
     "installs into a new venv and runs the whole suite; its quickstart command is run by "
     "tests/test_cli.py::test_end_to_end_quickstart_subprocess"),
    ("Layout files", "mesh: {dp: 2, mp: 4}", "yaml", "data", "a layout file"),
    ("Command line", "python -m jaxreshard convert --src SRC", "", "synopsis", "placeholders"),
    ("Command line", "task: convert", "yaml", "data", "a job file"),
    ("Library", "write_llama_checkpoint", "python", "tested", "tests/test_readme.py::test_library_example_runs"),
    ("Use from training code", "jr.load(ckpt, target", "python", "tested",
     "tests/test_readme.py::test_training_code_example_runs"),
    ("Self-describing outputs and --resume", '"format": "jaxreshard.manifest"', "json", "data", "a manifest"),
    ("Verify", "python -m jaxreshard verify ckpt/dp2mp4", "bash", "run", ""),
    ("MindSpore checkpoints and strategies", "--dst-strategy strategy/dp2mp4.ckpt", "bash", "run", ""),
    ("MindSpore checkpoints and strategies", "jaxreshard strategy --src model.safetensors", "bash", "run", ""),
    ("MindSpore checkpoints and strategies", "for c in configs/scenarios/*.yaml", "bash", "tested",
     "tests/test_configs.py::test_seed_scenarios_run_in_order (the same configs in order, in process)"),
    ("Drop-in MindFormers tools", "tools/transform_checkpoint.py", "bash", "synopsis", "placeholders"),
    ("Several processes and several nodes", "--coordinator-address h0:7777", "bash", "synopsis",
     "two hosts side by side; tests/test_distributed.py::test_two_processes_equal_one runs 2 processes"),
    ("Object storage", "s3://ckpts/llama/step-1000", "bash", "tested",
     "tests/remote/test_readme_remote.py::test_readme_object_storage_block_runs (against the test S3 server)"),
    ("Automatic conversion at load time", "jr.auto_convert(load_checkpoint=", "python", "synopsis",
     "one process of a multi-process job (rank, world come from the job)"),
    ("Automatic conversion at load time", "cfg = yaml.safe_load(", "python", "tested",
     "tests/test_auto_nodes.py::test_shipped_auto_configs_run (this config, every rank of both nodes)"),
    ("Automatic conversion at load time", "for r in $(seq 0 15)", "bash", "tested",
     "tests/test_auto_nodes.py::test_shipped_auto_configs_run (16 ranks as threads of 2 node processes)"),
    ("LoRA merge", "python -m jaxreshard merge-lora", "bash", "synopsis", "placeholders"),
    ("Unify distributed safetensors", "python -m jaxreshard unify", "bash", "synopsis", "placeholders"),
    ("Hugging Face models", "~/models/Llama-3-8B", "bash", "run", ""),
    ("Hugging Face models", "hf_llama", "python", "tested",
     "tests/test_hf_folders.py::test_readme_hugging_face_example_runs"),
    ("Hugging Face models", "/tmp/hfenv", "bash", "setup", "a venv with transformers (downloads)"),
    ("Transforms", "rules:", "yaml", "data", "a transform file"),
    ("Transforms", "hf_llama_to_flax.yaml", "python", "tested", "tests/test_readme.py::test_transforms_example_runs"),
    ("MoE", "mixtral_ep/", "bash", "run", ""),
    ("MoE", "block_sparse_moe", "python", "tested", "tests/test_readme.py::test_moe_example_runs"),
    ("FP8", "~/models/DeepSeek-V3", "bash", "run", ""),
    ("FP8", "write_fp8_checkpoint", "python", "tested", "tests/test_fp8.py::test_readme_fp8_example_runs"),
    ("Performance", "tools/bench/bench.py", "bash", "synopsis", "a benchmark of GiBs (and MindSpore)"),
    ("Performance", "tools/bench/plan_scale.py", "bash", "synopsis", "a benchmark of terabyte-sized sparse folders"),
    ("Development", "library API", "", "diagram", "the layers"),
    ("Development", "class HelloOptions", "python", "tested",
     "tests/test_commands.py::test_readme_adding_a_command_example_runs"),
    ("Development", "/tmp/msenv", "bash", "setup", "a venv with MindSpore (downloads)"),
]


def classified(strict: bool = True, text: str = README) -> list[tuple[Block, tuple]]:
    """Each block with its one entry (by section, language and snippet); strict: a block without one fails."""
    pairs = []
    for block in readme_blocks(text):
        entries = [e for e in BLOCKS if (e[0], e[2]) == (block.section, block.lang) and e[1] in block.text]
        if len(entries) == 1:
            pairs.append((block, entries[0]))
        else:
            assert not strict, (f"README.md:{block.line} ({block.section or 'top'}, ```{block.lang}): "
                                f"{len(entries)} entries in BLOCKS; give it exactly one (how it is checked)")
    return pairs


def of_kind(kind: str) -> list[tuple[Block, tuple]]:
    return [(b, e) for b, e in classified(strict=False) if e[3] == kind]


def ids(pairs: list) -> list[str]:
    return [f"{b.line}-{e[0] or 'top'}" for b, e in pairs]


def test_every_block_is_classified():
    pairs = classified()
    assert len(pairs) == len(BLOCKS) == len({id(e) for _, e in pairs})  # no stale entry, none used twice
    assert {e[3] for e in BLOCKS} <= {"run", "tested", "synopsis", "data", "setup", "diagram"}


def test_a_new_block_must_be_classified():
    """The check itself: an unclassified block is found (with its line), a fence left open too."""
    text = README + "\n## MoE\n```bash\njaxreshard convert --src new\n```\n"
    blocks = readme_blocks(text)
    assert blocks[-1] == Block("MoE", "bash", "jaxreshard convert --src new\n", len(text.splitlines()) - 2)
    with pytest.raises(AssertionError, match=rf"README.md:{blocks[-1].line} \(MoE, ```bash\): 0 entries in BLOCKS"):
        classified(text=text)
    assert len(classified(strict=False, text=text)) == len(BLOCKS)
    with pytest.raises(AssertionError, match="never closed"):
        readme_blocks("## A\n```bash\nx\n")


# ------------------------------------------------------------------------------------------------- "tested"
@pytest.mark.parametrize("block,entry", of_kind("tested"), ids=ids(of_kind("tested")))
def test_tested_blocks_name_a_test_that_reads_the_readme(block, entry):
    path, name = entry[4].split(" ")[0].split("::")
    source = (REPO / path).read_text()
    functions = {f.name: f for f in ast.walk(ast.parse(source)) if isinstance(f, ast.FunctionDef)}
    assert name in functions, entry
    function = functions[name]
    first = min([function.lineno] + [d.lineno for d in function.decorator_list])
    body = "\n".join(source.splitlines()[first - 1:function.end_lineno])  # decorators included
    # it reads the block from the README (by its section, or the heading above it in "Development"), or runs
    # every shipped config the block runs (configs/scenarios, configs/auto)
    marks = [block.section, "**Adding a command**"] if block.lang in ("python", "bash") else []
    assert any(m in body for m in [*marks, "in SCENARIOS", "AUTO_CONFIGS,"]), entry


# ------------------------------------------------------------------------------------------------- "data"
@pytest.mark.parametrize("block,entry", of_kind("data"), ids=ids(of_kind("data")))
def test_data_blocks_parse(block, entry, tmp_path):
    kind = entry[4]
    if kind == "a layout file":
        path = tmp_path / "layout.yaml"
        path.write_text(block.text)
        layout = read_layout(path)
        assert layout.num_ranks == 8
    elif kind == "a job file":
        path = tmp_path / "job.yaml"
        path.write_text(block.text)
        task, opts = read_job(path)
        assert task == "convert" and opts.workers == 2 and (REPO / opts.dst_layout).is_file()
    elif kind == "a transform file":
        assert len(Rules.load(yaml.safe_load(block.text)).rules) == 4
    else:
        data = json.loads(block.text)
        (tmp_path / MANIFEST_NAME).write_text(block.text)
        manifest = read_manifest(tmp_path)
        assert manifest is not None and manifest.num_ranks == 8
        real = json.loads((sandbox_manifest_dir(tmp_path) / MANIFEST_NAME).read_text())
        assert set(data) <= set(real) and set(real) - set(data) <= {"extra"}, (set(data), set(real))
        assert set(next(iter(data["params"].values()))) == set(next(iter(real["params"].values())))
        assert set(next(iter(data["files"].values()))) == set(next(iter(real["files"].values())))


def sandbox_manifest_dir(tmp_path: Path) -> Path:
    """A real dp2mp4 output, to hold the README's manifest against."""
    src = write_llama_checkpoint(tmp_path / "src" / "model.safetensors")
    jr.convert(src, tmp_path / "dp2mp4", dst_layout=REPO / "configs" / "layouts" / "llama_dp2mp4.yaml")
    return tmp_path / "dp2mp4"


# ------------------------------------------------------------------------------------------------- "synopsis"
def command_flags(command: str | None) -> set[str]:
    parser = make_parser()
    if command is not None:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[command]
    return {s for action in parser._actions for s in action.option_strings}


def tool_flags(tool: str) -> set[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, tool, "--help"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return set(re.findall(r"--[a-z][\w-]*", done.stdout))


def synopsis_flags(text: str) -> list[tuple[str, str]]:
    """(program, flag) for every --flag, the program being the last `jaxreshard CMD` or `tools/X` before it."""
    found, program = [], None
    for line in text.splitlines():
        code = line.split("# ")[0] if not line.lstrip().startswith("#") else ""
        tokens = code.replace("[", " ").replace("]", " ").replace("|", " ").split()
        for i, token in enumerate(tokens):
            if token == "jaxreshard" and i + 1 < len(tokens):
                following = tokens[i + 1]
                program = f"jaxreshard {following}" if following in COMMANDS else "jaxreshard"
                assert following.startswith("-") or following in COMMANDS or following == "...", line
            elif token.startswith("tools/"):
                program = token
                assert (REPO / token).is_file(), token
            elif token.startswith("--"):
                assert program is not None, line
                found.append((program, re.match(r"--[\w-]*", token).group()))
    return found


def test_synopsis_parser_finds_unknown_flags():
    found = synopsis_flags("python -m jaxreshard convert --src A [--nope] \\\n    --dst B  # --comment\n"
                           "python tools/bench/bench.py --size-gib 2")
    assert found == [("jaxreshard convert", "--src"), ("jaxreshard convert", "--nope"),
                     ("jaxreshard convert", "--dst"), ("tools/bench/bench.py", "--size-gib")]
    assert "--nope" not in command_flags("convert")


@pytest.mark.parametrize("block,entry", of_kind("synopsis"), ids=ids(of_kind("synopsis")))
def test_synopsis_names_real_commands_and_flags(block, entry):
    if block.lang == "python":
        tree = ast.parse(block.text)
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)]
        assert calls
        for call in calls:
            if isinstance(call.func.value, ast.Name) and call.func.value.id == "jr":
                signature = inspect.signature(getattr(jr, call.func.attr))
                signature.bind(*[None] * len(call.args), **{k.arg: None for k in call.keywords if k.arg})
        return
    found = synopsis_flags(block.text)
    assert found, block.text
    cache: dict[str, set[str]] = {}
    for program, flag in found:
        if program not in cache:
            words = program.split()
            cache[program] = (command_flags(words[1] if len(words) > 1 else None) if words[0] == "jaxreshard"
                              else tool_flags(program))
        assert flag in cache[program], (program, flag)
    for script in re.findall(r"tools/\S+\.sh", block.text):
        assert (REPO / script).is_file(), script


# ------------------------------------------------------------------------------------------------- "setup"
@pytest.mark.parametrize("block,entry", of_kind("setup"), ids=ids(of_kind("setup")))
def test_setup_blocks_name_what_exists(block, entry):
    pyproject = (REPO / "pyproject.toml").read_text()
    for extra in re.findall(r"\.\[(\w+)\]", block.text):
        assert re.search(rf"^{extra} = \[", pyproject, re.M), extra
    paths = re.findall(r"(?:tests|configs)/[\w/.-]+\.(?:py|yaml)", block.text)
    assert paths
    for path in paths:
        assert (REPO / path).is_file(), path
    for path, name in re.findall(r"(tests/\w+\.py)::(\w+)", entry[4]):  # a command of the block run elsewhere
        assert re.search(rf"^def {name}\(", (REPO / path).read_text(), re.M), (path, name)
    tests = [(REPO / p).read_text() for p in paths if p.startswith("tests/")]
    for variable in re.findall(r"\b([A-Z][A-Z_]+)=", block.text):
        assert any(variable in t for t in tests), variable


# ------------------------------------------------------------------------------------------------- "diagram"
@pytest.mark.parametrize("block,entry", of_kind("diagram"), ids=ids(of_kind("diagram")))
def test_diagram_names_real_modules(block, entry):
    modules = {p.name for p in (REPO / "jaxreshard").rglob("*.py")}
    folders = {p.name for p in (REPO / "jaxreshard").rglob("*") if p.is_dir()} | {"tools"}
    named = re.findall(r"\b([a-z_]+\.py)\b", block.text)
    assert len(named) > 20
    assert set(named) <= modules, set(named) - modules
    assert set(re.findall(r"\b([a-z_]+)/", block.text)) <= folders


# ------------------------------------------------------------------------------------------------- "run"
@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A bin folder with `python` and `jaxreshard` (this checkout, this interpreter)."""
    root = tmp_path_factory.mktemp("readme")
    bin_dir = root / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')  # a link would lose the venv
    (bin_dir / "python").chmod(0o755)
    (bin_dir / "jaxreshard").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m jaxreshard "$@"\n')
    (bin_dir / "jaxreshard").chmod(0o755)
    return root


def test_each_run_block_has_its_sandbox():
    keys = [k for b, e in of_kind("run") for k in RUN if k in (b.section, f"{b.section}/{e[1]}")]
    assert sorted(keys) == sorted(RUN), "one RUN entry (prepare, check) for each 'run' block, none left over"


@pytest.mark.parametrize("block,entry", of_kind("run"), ids=ids(of_kind("run")))
def test_bash_example_runs(block, entry, sandbox):
    prepare, check = next(RUN[k] for k in RUN if k in (block.section, f"{block.section}/{entry[1]}"))
    root = sandbox / f"block_{block.line}"
    root.mkdir()
    (root / "configs").symlink_to(REPO / "configs")
    prepare(root)
    (root / "example.sh").write_text("set -euo pipefail\n" + block.text)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(HOME=str(root), PATH=f"{sandbox / 'bin'}{os.pathsep}{env['PATH']}",
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    done = subprocess.run(["bash", "example.sh"], cwd=root, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    check(root, done.stdout + done.stderr)
