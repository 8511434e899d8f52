"""Bad inputs of the LoRA merge (merge-lora via the CLI): integer or bool bases, malformed PEFT adapter configs.

(Automatic conversion has no command line; its bad inputs are tested in tests/test_auto.py.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from .harness import Case, corpus_test

MERGE = ["merge-lora", "--src", "{tmp}/base.safetensors", "--adapter", "{tmp}/adapter", "--dst", "{tmp}/out", "-q"]
CFG = r"adapter[/\\]adapter_config\.json: "


def _model(tmp: Path, base_dtype=np.float32) -> None:
    """A one-weight base model and a PEFT adapter of rank 2 for it (adapter_config.json written by the case)."""
    base = (np.arange(16).reshape(4, 4) * 10).astype(base_dtype)
    save_file({"m.q.weight": base}, str(tmp / "base.safetensors"))
    (tmp / "adapter").mkdir()
    save_file({"base_model.model.m.q.lora_A.weight": np.ones((2, 4), np.float32),
               "base_model.model.m.q.lora_B.weight": np.full((4, 2), 20.0, np.float32)},
              str(tmp / "adapter" / "adapter_model.safetensors"))


def base_of(dtype):
    def setup(tmp: Path) -> None:
        _model(tmp, dtype)
        (tmp / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 2}))

    return setup


def config(content: object = None, *, raw: bytes | None = None):
    """The adapter's config: `content` as JSON, or `raw` bytes as they are."""

    def setup(tmp: Path) -> None:
        _model(tmp)
        data = raw if raw is not None else json.dumps(content).encode()
        (tmp / "adapter" / "adapter_config.json").write_bytes(data)

    return setup


def config_dir(tmp: Path) -> None:
    _model(tmp)
    (tmp / "adapter" / "adapter_config.json").mkdir()


def config_fifo(tmp: Path) -> None:
    _model(tmp)
    os.mkfifo(tmp / "adapter" / "adapter_config.json")


OK = {"r": 2, "lora_alpha": 4}
CASES = [
    Case("lora-int8-base", MERGE, 2, r"base weight 'm\.q\.weight' is int8, not floating point; .*dequantize",
         base_of(np.int8)),
    Case("lora-int32-base", MERGE, 2, r"base weight 'm\.q\.weight' is int32, not floating point", base_of(np.int32)),
    Case("lora-uint8-base", MERGE, 2, r"base weight 'm\.q\.weight' is uint8, not floating point", base_of(np.uint8)),
    Case("lora-bool-base", MERGE, 2, r"base weight 'm\.q\.weight' is bool, not floating point", base_of(np.bool_)),
    Case("adapter-config-a-list", MERGE, 2, CFG + r"an adapter config must be a JSON object, got list", config([1, 2])),
    Case("adapter-config-a-string", MERGE, 2, CFG + r"an adapter config must be a JSON object, got str", config("r=8")),
    Case("adapter-r-zero", MERGE, 2, CFG + r"r must be a whole number from 1 to 16777216, got 0",
         config({**OK, "r": 0})),
    Case("adapter-r-negative", MERGE, 2, CFG + r"r must be a whole number from 1 to 16777216, got -4",
         config({**OK, "r": -4})),
    Case("adapter-r-float", MERGE, 2, CFG + r"r must be a whole number from 1 to 16777216, got 2\.5",
         config({**OK, "r": 2.5})),
    Case("adapter-r-string", MERGE, 2, CFG + r"r must be .* got '8'", config({**OK, "r": "8"})),
    Case("adapter-r-bool", MERGE, 2, CFG + r"r must be .* got True", config({**OK, "r": True})),
    Case("adapter-alpha-string", MERGE, 2, CFG + r"lora_alpha must be a finite number, got '16'",
         config({**OK, "lora_alpha": "16"})),
    Case("adapter-alpha-infinite", MERGE, 2, CFG + r"lora_alpha must be a finite number, got inf",
         config(raw=b'{"r": 2, "lora_alpha": Infinity}')),
    Case("adapter-alpha-list", MERGE, 2, CFG + r"lora_alpha must be a finite number, got \[16\]",
         config({**OK, "lora_alpha": [16]})),
    Case("adapter-target-modules-number", MERGE, 2, CFG + r"target_modules must be a string or a list of strings, "
         r"got 5", config({**OK, "target_modules": 5})),
    Case("adapter-target-modules-mixed", MERGE, 2, CFG + r"target_modules must be .* got \['q', 1\]",
         config({**OK, "target_modules": ["q", 1]})),
    Case("adapter-alpha-pattern-list", MERGE, 2, CFG + r"alpha_pattern must be a mapping of module-name patterns",
         config({**OK, "alpha_pattern": ["q"]})),
    Case("adapter-rank-pattern-string", MERGE, 2, CFG + r"rank_pattern must be a mapping .* got 'q'",
         config({**OK, "rank_pattern": "q"})),
    Case("adapter-rank-pattern-zero", MERGE, 2, CFG + r"rank_pattern\['q'\] must be whole numbers from 1 to 16777216, "
         r"got 0", config({**OK, "rank_pattern": {"q": 0}})),
    Case("adapter-alpha-pattern-text", MERGE, 2, CFG + r"alpha_pattern\['q'\] must be finite numbers, got 'x'",
         config({**OK, "alpha_pattern": {"q": "x"}})),
    Case("adapter-pattern-bad-regex", MERGE, 2, CFG + r"alpha_pattern pattern '\(q' is not a valid regular "
         r"expression", config({**OK, "alpha_pattern": {"(q": 2}})),
    Case("adapter-pattern-backtracking", MERGE, 2, CFG + r"rank_pattern pattern '\(a\+\)\+q' repeats a group that "
         r"itself repeats", config({**OK, "rank_pattern": {"(a+)+q": 2}})),
    Case("adapter-rslora-string", MERGE, 2, CFG + r"use_rslora must be true or false, got 'yes'",
         config({**OK, "use_rslora": "yes"})),
    Case("adapter-fan-in-fan-out-number", MERGE, 2, CFG + r"fan_in_fan_out must be true or false, got 1",
         config({**OK, "fan_in_fan_out": 1})),
    Case("adapter-config-not-json", MERGE, 2, CFG + r"not valid JSON: Expecting", config(raw=b'{"r": 2,')),
    Case("adapter-config-not-utf8", MERGE, 2, CFG + r"not UTF-8 text \(byte 7\)", config(raw=b'{"r": 2\xff\xfe}')),
    Case("adapter-config-deeply-nested", MERGE, 2, CFG + r"JSON nested too deeply",
         config(raw=b'{"r": ' + b"[" * 200_000 + b"]" * 200_000 + b"}")),
    Case("adapter-config-huge", MERGE, 2, CFG + r"\d+ bytes, more than the 1048576 an adapter config may have",
         config(raw=b"{" + b" " * (2 << 20) + b"}")),
    Case("adapter-config-a-folder", MERGE, 2, CFG + r"not a regular file", config_dir),
    Case("adapter-config-a-fifo", MERGE, 2, CFG + r"not a regular file", config_fifo),
    Case("lora-scaling-nan", [*MERGE, "--lora-scaling", "nan"], 2,
         r"--lora-scaling must be a finite number, got '?nan'?",
         config(OK)),
    Case("lora-scaling-text", [*MERGE, "--lora-scaling", "half"], 2, r"--lora-scaling must be a number, got 'half'",
         config(OK)),
]

test_case = corpus_test(CASES)
