"""Reading a PEFT `adapter_config.json`: every key the LoRA merge uses is checked before it is trusted.

The file decides the scale of every merged weight (lora_alpha / r, per-module alpha_pattern / rank_pattern) and
the orientation of square bases (fan_in_fan_out), so a wrong type must be an error naming the file and key, not
a traceback and not a silently different merge. The file is small: its size is capped before it is read.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError

MAX_CONFIG_BYTES = 1 << 20  # PEFT writes ~1 KB; anything near this is not an adapter config
MAX_RANK = 1 << 24  # LoRA ranks are small; a bigger one is a typo (and would overflow float math)
MAX_PATTERN_CHARS = 1000  # a module-name regex
NESTED_QUANTIFIER = re.compile(r"\([^()]*[*+}][^()]*\)\s*[*+{]")  # (a+)+ and kin: catastrophic backtracking


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_number(value: Any) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer beyond float range
        return False


def _is_rank(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_RANK


def _read_text(path: Path) -> str:
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path}: not a regular file; the adapter's config must be a JSON file")
        if st.st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {st.st_size} bytes, more than the {MAX_CONFIG_BYTES} an adapter config may "
                              "have; is this the right file?")
        data = path.read_bytes()[: MAX_CONFIG_BYTES + 1]
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the adapter config: {e.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); an adapter config is a JSON file") from None


def _check_patterns(path: Path, key: str, value: Any, valid: Any, what: str) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: {key} must be a mapping of module-name patterns to {what}, got {_show(value)}")
    for pattern, item in value.items():
        if len(pattern) > MAX_PATTERN_CHARS:
            raise ConfigError(f"{path}: {key} pattern {_show(pattern)} is longer than {MAX_PATTERN_CHARS} characters")
        if NESTED_QUANTIFIER.search(pattern):
            raise ConfigError(f"{path}: {key} pattern {_show(pattern)} repeats a group that itself repeats, which "
                              "can take exponential time to match; write the module name (or a simple regex)")
        try:
            re.compile(rf"(.*\.)?{pattern}$")  # as PEFT matches it (lora._pattern)
        except (re.error, RecursionError, OverflowError) as e:
            raise ConfigError(f"{path}: {key} pattern {_show(pattern)} is not a valid regular expression "
                              f"({e})") from None
        if not valid(item):
            raise ConfigError(f"{path}: {key}[{_show(pattern)}] must be {what}, got {_show(item)}")


def check_adapter_config(path: Path, cfg: Any) -> Mapping[str, Any]:
    """The config if every key the merge uses has the right type (one-line ConfigError naming the key if not)."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: an adapter config must be a JSON object, got {type(cfg).__name__}")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if r is not None and not _is_rank(r):
        raise ConfigError(f"{path}: r must be a whole number from 1 to {MAX_RANK}, got {_show(r)}")
    if alpha is not None and not _is_number(alpha):
        raise ConfigError(f"{path}: lora_alpha must be a finite number, got {_show(alpha)}")
    for key in ("use_rslora", "fan_in_fan_out"):
        if cfg.get(key) is not None and not isinstance(cfg[key], bool):
            raise ConfigError(f"{path}: {key} must be true or false, got {_show(cfg[key])}")
    targets = cfg.get("target_modules")
    if targets is not None and not isinstance(targets, str) and not (
        isinstance(targets, list) and all(isinstance(t, str) for t in targets)
    ):
        raise ConfigError(f"{path}: target_modules must be a string or a list of strings, got {_show(targets)}")
    _check_patterns(path, "rank_pattern", cfg.get("rank_pattern"), _is_rank, f"whole numbers from 1 to {MAX_RANK}")
    _check_patterns(path, "alpha_pattern", cfg.get("alpha_pattern"), _is_number, "finite numbers")
    return cfg


def read_adapter_config(path: Path) -> Mapping[str, Any]:
    """Parse and check `adapter_config.json` (size-capped, UTF-8, bounded nesting)."""
    text = _read_text(path)
    try:
        cfg = json.loads(text)
    except RecursionError:
        raise ConfigError(f"{path}: JSON nested too deeply; an adapter config is a flat object") from None
    except ValueError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
    return check_adapter_config(path, cfg)
