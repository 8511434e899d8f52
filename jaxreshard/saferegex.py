"""A static check that a layout rule's `match` regex cannot backtrack catastrophically.

Python's `re` backtracks: `(a+)+$` or `(a|aa)*b` take exponential time on a name that almost matches, and
`k` unbounded repeats in a row take time ~ n^k. The check walks the parsed pattern (`re._parser`, the
parser `re.compile` itself uses) and refuses a repeat nested in an unbounded repeat, an alternation inside an
unbounded repeat, more than `MAX_UNBOUNDED_REPEATS` unbounded repeats in all, and bounded repeats and
alternations that could split a name in more than `MAX_BOUNDED_CHOICES` ways (`(a?){30}a{30}` is exponential
too). Together with the cap on name
length (`MAX_NAME_CHARS`, checked where names are matched) every match then takes at most a few milliseconds.
Alternations of single characters (`(q|k|v)`) are compiled to character classes and stay allowed.
"""

from __future__ import annotations

import re

# re's own parser (private modules since Python 3.11, the oldest this package supports; typeshed omits them)
from re import _constants as sre_constants  # pyright: ignore[reportAttributeAccessIssue]
from re import _parser as sre_parse  # pyright: ignore[reportAttributeAccessIssue]
from typing import Any

from .caps import MAX_BOUNDED_CHOICES, MAX_PATTERN_CHARS, MAX_UNBOUNDED_REPEATS

_REPEATS = {sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT} | (
    {sre_constants.POSSESSIVE_REPEAT} if hasattr(sre_constants, "POSSESSIVE_REPEAT") else set()
)
_LARGE = 64  # a bounded repeat with more iterations than this is treated as unbounded


def backtracking_risk(pattern: str) -> str | None:
    """Why `pattern` may backtrack catastrophically (None when it cannot); it must already compile."""
    if len(pattern) > MAX_PATTERN_CHARS:
        return f"it is {len(pattern)} characters long, over the cap of {MAX_PATTERN_CHARS}"
    count = [0]
    parsed = sre_parse.parse(pattern)
    problem = _walk(parsed, in_repeat=False, in_unbounded=False, count=count)
    if problem is None and count[0] > MAX_UNBOUNDED_REPEATS:
        problem = (f"it has {count[0]} unbounded repeats (*, +, {{n,}}); at most {MAX_UNBOUNDED_REPEATS} keep "
                   "matching fast")
    if problem is None and _choices(parsed) > MAX_BOUNDED_CHOICES:
        problem = (f"its bounded repeats and alternations allow over {MAX_BOUNDED_CHOICES} ways to split a name "
                   "(like (a?){30}a{30} or (a{1,30}){1,30}b)")
    return problem


def _choices(parsed: Any) -> int:
    """How many ways the bounded repeats and alternations of `parsed` can divide a name between them (the
    backtracking a failed match may try), capped just above `MAX_BOUNDED_CHOICES`. Unbounded repeats count 1
    here: they are limited by `_walk` and the count of them."""
    total = 1
    for op, av in parsed:
        if op in _REPEATS:
            low, high, body = av
            if high == sre_constants.MAXREPEAT or high > _LARGE:
                continue
            inner = _choices(body)
            total *= inner ** high * (high - low + 1)
        elif op in (sre_constants.BRANCH, sre_constants.GROUPREF_EXISTS):
            total *= sum(_choices(child) for child in _children(op, av))
        else:
            for child in _children(op, av):
                total *= _choices(child)
        total = min(total, MAX_BOUNDED_CHOICES + 1)
    return total


def _children(op: Any, av: Any) -> list[Any]:
    """The sub-patterns of one parsed node."""
    if op == sre_constants.SUBPATTERN:
        return [av[3]]
    if op == sre_constants.BRANCH:
        return list(av[1])
    if op in (sre_constants.ASSERT, sre_constants.ASSERT_NOT):
        return [av[1]]
    if op == getattr(sre_constants, "ATOMIC_GROUP", None):
        return [av]
    if op == sre_constants.GROUPREF_EXISTS:
        return [p for p in av[1:] if p is not None]
    return []


def _walk(parsed: Any, *, in_repeat: bool, in_unbounded: bool, count: list[int]) -> str | None:
    for op, av in parsed:
        if op in _REPEATS:
            _, high, body = av
            unbounded = high == sre_constants.MAXREPEAT or high > _LARGE
            if high > 1 and (in_unbounded or (in_repeat and unbounded)):
                return "it nests a repeat inside an unbounded repeat (like (a+)+ or (.*)*)"
            count[0] += unbounded and op != getattr(sre_constants, "POSSESSIVE_REPEAT", None)  # never backtracks
            found = _walk(body, in_repeat=in_repeat or high > 1, in_unbounded=in_unbounded or unbounded,
                          count=count)
        elif op == sre_constants.BRANCH and in_unbounded:
            return "it repeats an alternation without bound (like (a|aa)*); use a character class or one branch"
        else:
            found = None
            for child in _children(op, av):
                found = found or _walk(child, in_repeat=in_repeat, in_unbounded=in_unbounded, count=count)
        if found:
            return found
    return None


def compile_safe(pattern: Any, where: str, error: type[Exception]) -> re.Pattern[str]:
    """`re.compile(pattern)` for a layout rule, or `error` naming `where` if it is not a safe regex string."""
    if not isinstance(pattern, str):
        raise error(f"{where}: match must be a regex string, got {type(pattern).__name__} {pattern!r:.80}")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise error(f"{where}: match regex is {len(pattern)} characters long, over the cap of {MAX_PATTERN_CHARS}")
    try:
        compiled = re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        raise error(f"{where}: bad regex {pattern!r:.200}: {e}") from None
    risk = backtracking_risk(pattern)
    if risk:
        raise error(f"{where}: match regex {pattern!r:.200} could take exponential or very long time to match: "
                    f"{risk}; simplify it")
    return compiled
