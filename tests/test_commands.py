"""The command table (`jaxreshard.commands`): each command's options are its flags and its job keys, typed once,
and a command added to the table is parsed, read from job files and dispatched with nothing else to edit."""

from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from jaxreshard import cli
from jaxreshard.commands import COMMANDS, common, make_parser, options_from, options_from_args, read_job
from jaxreshard.commands.options import (
    PROCESS_COUNT,
    PROCESS_INDEX,
    WORKER_COUNT,
    Command,
    flag_name,
    job_keys,
    option,
    option_fields,
    parse_bytes,
    parse_number,
    parse_rank_list,
    parse_text,
    parse_truth,
    spec,
)
from jaxreshard.errors import ConfigError

# A YAML value for each kind of option, and the typed value it must become (computed by hand, not by the parsers)
SAMPLES = {
    parse_text: ("some/path", "some/path"),
    WORKER_COUNT: (3, 3),
    PROCESS_COUNT: ("4", 4),
    PROCESS_INDEX: (0, 0),
    parse_number: ("0.25", 0.25),
    parse_bytes: ("3KiB", 3072),
    parse_truth: ("false", False),
    parse_rank_list: ("4-6,1", (1, 4, 5, 6)),
    None: (True, True),  # an on/off flag
}


def subparser(name: str) -> argparse.ArgumentParser:
    parser = make_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def required(options: type) -> dict[str, str]:
    return {n: "x" for n, f in option_fields(options).items() if f.default is dataclasses.MISSING}


def test_the_table_holds_every_command():
    assert list(COMMANDS) == ["convert", "plan", "inspect", "strategy", "merge-lora", "unify", "quickstart", "verify"]


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_option_is_a_flag_of_its_command_and_nothing_else(name):
    command = COMMANDS[name]
    flags = {s for a in subparser(name)._actions for s in a.option_strings} - {"-h", "--help", "-q"}
    fields = option_fields(command.options)
    positional_only = command.positional.field if command.positional and command.positional.required else None
    wanted = {flag_name(n) for n in fields if n != positional_only}
    wanted |= {flag_name(alias) for f in fields.values() for alias in spec(f).aliases}
    assert flags == wanted


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_option_is_a_job_key_with_a_typed_value(name):
    options = COMMANDS[name].options
    for key, f in option_fields(options).items():
        opt = spec(f)
        given, want = SAMPLES[opt.parse]
        if opt.many:
            given, want = [given, given], (want, want)
        opts = options_from(name, {**required(options), key: given}, "job.yaml")
        assert getattr(opts, key) == want and type(getattr(opts, key)) is type(want), (name, key)


@pytest.mark.parametrize("name", list(COMMANDS))
def test_a_key_of_another_command_is_refused_naming_it(name):
    mine = set(job_keys(COMMANDS[name].options))
    foreign = {key for c in COMMANDS.values() for key in job_keys(c.options)} - mine
    assert foreign, "every command lacks some other command's option"
    for key in sorted(foreign):
        takers = [n for n, c in COMMANDS.items() if key in option_fields(c.options) or key == "process_num"
                  and "workers" in option_fields(c.options)]
        with pytest.raises(ConfigError) as info:
            options_from(name, {**required(COMMANDS[name].options), key: "x"}, "job.yaml")
        assert str(info.value).startswith(f"job.yaml: unknown keys ['{key}'] for task {name} ({key} is an option of "
                                          f"{', '.join(takers)}, not of {name}); valid keys are task, ")


def test_the_same_key_is_taken_where_it_belongs(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("task: merge-lora\nsrc: a\ndst: b\nadapter: peft\nlora_scaling: 2\nprocess_num: 2\n")
    task, opts = read_job(job)
    assert (task, opts.adapter, opts.lora_scaling, opts.workers) == ("merge-lora", "peft", 2.0, 2)
    job.write_text("task: convert\nsrc: a\ndst: b\nadapter: peft\n")
    with pytest.raises(ConfigError, match=r"job\.yaml: unknown keys \['adapter'\] for task convert \(adapter is an "
                                          r"option of merge-lora, not of convert\); valid keys are task, src, dst, "):
        read_job(job)


def test_command_line_values_are_typed():
    args = make_parser().parse_args(["convert", "--src", "a", "--dst", "b", "--process-num", "2", "--max-file-size",
                                     "1MB", "--ranks", "3,0-1", "--num-processes", "2", "--process-id", "1", "--hf"])
    opts = options_from_args("convert", {k: v for k, v in vars(args).items() if k != "task" and k != "config"})
    assert (opts.workers, opts.max_file_size, opts.ranks, opts.num_processes, opts.process_id, opts.hf) == \
        (2, 10**6, (0, 1, 3), 2, 1, True)
    assert (opts.prefix, opts.dtype, opts.quiet, opts.resume) == ("checkpoint_", None, False, False)  # defaults
    args = make_parser().parse_args(["unify", "--src", "a", "--dst", "b", "--has-redundancy", "no",
                                     "--filter-out-param-prefix", "adam_", "accu_"])
    opts = options_from_args("unify", {k: v for k, v in vars(args).items() if k != "task" and k != "config"})
    assert (opts.has_redundancy, opts.filter_out_param_prefix, opts.max_file_size) == (False, ("adam_", "accu_"),
                                                                                       5 * 10**9)


@pytest.mark.parametrize("argv, message", [
    (["--workers", "2", "--process-num", "3"], "give --workers or --process-num, not both"),
    (["--process-num", "0"], "--process-num must be an integer in 1..1024, got 0"),
    (["--workers", "x"], "--workers must be an integer, got 'x'"),
])
def test_workers_and_its_older_spelling(argv, message, capsys):
    assert cli.main(["convert", "--src", "a", "--dst", "b", *argv]) == 2
    assert capsys.readouterr().err == f"jaxreshard: error: {message}\n"


def test_the_handler_gets_the_typed_options(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setitem(COMMANDS, "unify", dataclasses.replace(COMMANDS["unify"], run=lambda o: seen.append(o) or 0))
    assert cli.main(["unify", "--src", "a", "--dst", "b", "--max-file-size", "2KB", "-q"]) == 0
    job = tmp_path / "job.yaml"
    job.write_text("task: unify\nsrc: a\ndst: b\nmax_file_size: 2KB\n")
    assert cli.main(["--config", str(job), "-q"]) == 0
    assert seen[0] == seen[1] and (seen[0].max_file_size, seen[0].quiet, seen[0].workers) == (2000, True, 1)


@dataclass(frozen=True, slots=True, kw_only=True)
class HelloOptions:
    name: str = option("who to greet")
    times: int = option("how often", WORKER_COUNT, 1)


def test_a_new_command_is_one_table_entry(monkeypatch, tmp_path, capsys):
    """The promise of the module docstring: a Command in the table gets its parser, job keys and dispatch."""
    hello = Command("hello", HelloOptions, lambda o: print(f"hello {o.name}" * o.times) or 0, "greet")
    monkeypatch.setitem(COMMANDS, "hello", hello)
    assert cli.main(["hello", "--name", "you", "--times", "2"]) == 0
    job = tmp_path / "job.yaml"
    job.write_text("task: hello\nname: me\n")
    assert cli.main(["--config", str(job)]) == 0
    assert capsys.readouterr().out == "hello youhello you\nhello me\n"
    job.write_text("task: hello\nname: me\nsrc: x\n")
    assert cli.main(["--config", str(job)]) == 2
    assert "unknown keys ['src'] for task hello (src is an option of convert, plan, " in capsys.readouterr().err


def test_each_subcommand_shows_only_its_options():
    text = subparser("inspect").format_help()
    assert "--src-layout" in text and "--adapter" not in text and "--dst" not in text and "--workers" not in text
    text = subparser("convert").format_help()
    assert "--workers N" in text and "--process-num N" in text and "the same as --workers" in text
    assert "--adapter" not in text and "--check-replicas" not in text


README = (Path(__file__).parents[1] / "README.md").read_text()


def test_readme_adding_a_command_example_runs(monkeypatch, capsys):
    block = README.split("**Adding a command**")[1].split("```python")[1].split("```")[0]
    namespace = {"dataclass": dataclass, "common": common, "option": option, "WORKER_COUNT": WORKER_COUNT,
                 "Command": Command}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own README's example, as a user would paste it
    monkeypatch.setitem(COMMANDS, "hello", namespace["COMMAND"])
    assert cli.main(["hello", "--src", "ckpt", "--times", "2"]) == 0
    assert capsys.readouterr().out == "hello ckpthello ckpt\n"
    assert cli.main(["hello", "--times", "2"]) == 2
    assert capsys.readouterr().err == "jaxreshard: error: missing required option(s) --src\n"


def test_readme_synopsis_names_only_real_flags():
    """Every flag in the README's "Command line" synopsis is one its command takes (comments aside)."""
    block = README.split("## Command line")[1].split("```")[1]
    command, checked = None, 0
    for line in block.splitlines():
        words = line.split("#")[0].split()
        if words[:3] == ["python", "-m", "jaxreshard"]:
            command = words[3] if words[3] in COMMANDS else None
        if command is None:
            continue
        flags = {s for a in subparser(command)._actions for s in a.option_strings}
        for word in re.findall(r"--[a-z][a-z-]*", " ".join(words)):
            assert word in flags, (command, word)
            checked += 1
    assert checked > 40
