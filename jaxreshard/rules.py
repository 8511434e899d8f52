"""Transform rules (`--transform T.yaml`): rename, transpose, stack and concat source tensors, both ways.

```yaml
rules:
  - {from: 'model.embed_tokens.weight', to: 'model.embed_tokens.embedding'}
  - {from: '{p}_proj.weight', to: '{p}_proj.kernel', transpose: [1, 0]}
  - {from: '{p}.experts.{e}.{w}.weight', to: '{p}.experts.{w}', stack: e, axis: 0}
  - {from: '{p}.{x}_proj.weight', to: '{p}.qkv_proj.weight', concat: {x: [q, k, v]}, axis: 0, groups: 2}
```

A placeholder matches one or more characters (a `stack` one: digits; a `concat` one: its listed values); the
first rule whose `from` matches a name wins; unmatched names pass unchanged. `reverse` matches `to` and
produces `from` (unstack, split, transpose back), so one file maps both ways; `order` (the source order a
forward conversion recorded, see rulemap.ORDER_KEY) is the order reversed names are written in. Only names and
shapes are handled here: the result is, per destination name, its shape and the `Part`s it is made of (composed.py).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .yamlfile import load_yaml

PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
MAX_RULES = 10_000
KEYS = {"from", "to", "transpose", "stack", "concat", "axis", "groups", "sizes"}


@dataclass(frozen=True)
class Rule:
    number: int  # 1-based, for messages
    src: str
    dst: str
    transpose: tuple[int, ...] | None = None
    stack: str | None = None
    concat: str | None = None
    values: tuple[str, ...] = ()  # the concat placeholder's values, in order
    axis: int = 0
    groups: int = 1
    sizes: Mapping[str, int] | None = None
    _regex: dict[bool, re.Pattern[str]] = field(default_factory=dict, compare=False, repr=False)

    def __str__(self) -> str:
        return f"rule {self.number} ({self.src!r} -> {self.dst!r})"

    @property
    def joined(self) -> str | None:
        """The placeholder that `from` has and `to` lacks (stack or concat)."""
        return self.stack or self.concat

    def match(self, name: str, reverse: bool) -> dict[str, str] | None:
        if reverse not in self._regex:
            self._regex[reverse] = compile_pattern(self.dst if reverse else self.src, self)
        m = self._regex[reverse].fullmatch(name)
        return m.groupdict() if m else None


def compile_pattern(pattern: str, rule: Rule) -> re.Pattern[str]:
    out, pos = [], 0
    for m in PLACEHOLDER.finditer(pattern):
        out.append(re.escape(pattern[pos : m.start()]))
        name = m.group(1)
        if name == rule.stack:
            out.append(f"(?P<{name}>0|[1-9][0-9]*)")
        elif name == rule.concat:
            out.append(f"(?P<{name}>{'|'.join(re.escape(v) for v in rule.values)})")
        else:
            out.append(f"(?P<{name}>.+?)")
        pos = m.end()
    out.append(re.escape(pattern[pos:]))
    return re.compile("".join(out), re.DOTALL)


@dataclass(frozen=True)
class Rules:
    rules: tuple[Rule, ...]
    source: str = "<rules>"  # the file, for messages
    order: tuple[str, ...] = ()  # reversed: the original names in their original order (recorded), if known

    @staticmethod
    def load(arg: str | Path | Rules | Mapping[str, Any]) -> Rules:
        """Rules from a YAML path, a parsed mapping, or `Rules` as they are."""
        if isinstance(arg, Rules):
            return arg
        if isinstance(arg, Mapping):
            return parse_rules(arg, "transform")
        return parse_rules(load_yaml(arg, ConfigError, "transform file"), str(arg))


def parse_rules(data: Any, where: str) -> Rules:
    if not isinstance(data, Mapping) or set(data) != {"rules"} or not isinstance(data["rules"], list):
        raise ConfigError(f"{where}: a transform file is a mapping with one key, rules: a list of rules")
    if not data["rules"] or len(data["rules"]) > MAX_RULES:
        raise ConfigError(f"{where}: rules must list 1 to {MAX_RULES} rules, found {len(data['rules'])}")
    return Rules(tuple(parse_rule(i + 1, raw, where) for i, raw in enumerate(data["rules"])), where)


def parse_rule(number: int, raw: Any, where: str) -> Rule:
    def bad(what: str) -> ConfigError:
        return ConfigError(f"{where}: rule {number}: {what}")

    if not isinstance(raw, Mapping):
        raise bad("a rule is a mapping with from: and to:")
    unknown = sorted(set(map(str, raw)) - KEYS)
    if unknown:
        raise bad(f"unknown keys {unknown}; a rule has {sorted(KEYS)}")
    src, dst = raw.get("from"), raw.get("to")
    if not isinstance(src, str) or not isinstance(dst, str) or not src or not dst:
        raise bad("from: and to: must be non-empty name patterns")
    transpose = raw.get("transpose")
    if transpose is not None:
        if not isinstance(transpose, list) or any(type(a) is not int for a in transpose) or \
                sorted(transpose) != list(range(len(transpose))):  # fmt: skip
            raise bad(f"transpose {transpose!r} is not a permutation of 0..n-1 (e.g. [1, 0])")
        transpose = tuple(transpose)
    stack, concat, values = raw.get("stack"), None, ()
    if "concat" in raw:
        c = raw["concat"]
        if not (isinstance(c, Mapping) and len(c) == 1 and isinstance(next(iter(c.values())), list)):
            raise bad("concat must be {placeholder: [values, ...]}, e.g. {x: [q, k, v]}")
        concat, listed = next(iter(c.items()))
        values = tuple(str(v) for v in listed)
        if len(values) < 2 or len(set(values)) != len(values):
            raise bad(f"concat {concat!r} needs two or more distinct values, found {list(values)}")
    if stack is not None and concat is not None:
        raise bad("a rule either stacks or concatenates, not both")
    if stack is not None and not isinstance(stack, str):
        raise bad(f"stack must name a placeholder, found {stack!r}")
    axis, groups = raw.get("axis", 0), raw.get("groups", 1)
    if type(axis) is not int or axis < 0 or type(groups) is not int or groups < 1:
        raise bad(f"axis must be an integer >= 0 and groups >= 1 (found axis {axis!r}, groups {groups!r})")
    sizes = raw.get("sizes")
    if sizes is not None:
        if concat is None or not isinstance(sizes, Mapping) or {str(k) for k in sizes} != set(values) or \
                any(type(v) is not int or v < 1 for v in sizes.values()):  # fmt: skip
            raise bad(f"sizes must give a positive length for each concat value {list(values)}")
        sizes = {str(k): v for k, v in sizes.items()}
    rule = Rule(number, src, dst, transpose, stack, concat, values, axis, groups, sizes)
    check_placeholders(rule, bad)
    return rule


def check_placeholders(rule: Rule, bad: Any) -> None:
    src, dst = PLACEHOLDER.findall(rule.src), PLACEHOLDER.findall(rule.dst)
    for side, names in (("from", src), ("to", dst)):
        if len(set(names)) != len(names):
            raise bad(f"{side} uses a placeholder twice: {names}")
    joined = rule.joined
    if joined is not None and (joined not in src or joined in dst):
        raise bad(f"the {'stack' if rule.stack else 'concat'} placeholder {{{joined}}} must appear in from and "
                  "not in to")
    if set(src) - {joined} != set(dst):
        raise bad(f"from and to must use the same placeholders (from {sorted(src)}, to {sorted(dst)})")


def fill(pattern: str, binding: Mapping[str, str]) -> str:
    return PLACEHOLDER.sub(lambda m: binding[m.group(1)], pattern)
