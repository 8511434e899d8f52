"""Names and shapes through transform rules (rules.py): per destination tensor, its shape, dtype and the
`Part`s of source tensors it is made of (composed.py). Headers only; errors name the rule and the tensor.

`apply_rules` groups the source names by the rule that matches them first (a forward `stack`/`concat` rule
collects the tensors it joins; backwards it expands one tensor into several), then builds each group's parts:
rename (one whole part), transpose (a permuted part), stack (one part per index along the new axis), concat
(one part per value, or G interleaved pieces of each with `groups`), and their reverses.

Order. Forwards, destination tensors follow their first source name. A forward conversion that joins tensors
records the source's names in order under the `__metadata__` key `ORDER_KEY` of every safetensors file it writes
(carried on by later reshards), and backwards `Rules.order` (that record) puts the reversed names back in their
original places, so a round trip gives the original file. Without a record covering every name, reversed names
follow a natural order (`family_of`): a joined tensor expands at the place of the first tensor of its family
(the tensors of one rule whose placeholders before the joined one agree: one layer's w1, w2, w3), index by index,
the family's tensors interleaved in file order (expert 0's w1, w2, w3, then expert 1's ...; q, k, v).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .box import Box
from .composed import Part, inverse
from .errors import FormatError, PlanError
from .rules import PLACEHOLDER, Rule, Rules, fill

MAX_PARTS = 1 << 16  # tensors one stacked tensor unstacks into, or pieces one fused tensor is cut into
ORDER_KEY = "jaxreshard.order"  # safetensors __metadata__: JSON list, the source names before a joining transform

Shape = tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Target:
    """One destination tensor: its shape and dtype and the parts it is made of (`rule` None: unchanged)."""

    shape: Shape
    dtype: np.dtype
    parts: tuple[Part, ...]
    rule: Rule | None


def apply_rules(rules: Rules, names: Sequence[str], shapes: Mapping[str, tuple[Shape, np.dtype]],
                reverse: bool = False) -> dict[str, Target]:  # fmt: skip
    """Every destination tensor, in the order of its first source name. Errors name the rule."""
    groups: dict[tuple[int, str], tuple[Rule | None, str, list[tuple[str, dict[str, str]]]]] = {}
    used: set[int] = set()
    for name in names:
        rule, binding = next(((r, b) for r in rules.rules if (b := r.match(name, reverse)) is not None), (None, {}))
        if rule is not None:
            used.add(rule.number)
        joins = rule is not None and rule.joined is not None
        dst = name if rule is None or (joins and reverse) else fill(rule.src if reverse else rule.dst, binding)
        # a forward join collects its members under one key (`rule is not None` again for the type checker)
        key = (rule.number, dst) if rule is not None and joins and not reverse else (-1, name)
        groups.setdefault(key, (rule, dst, []))[2].append((name, binding))
    unused = [r for r in rules.rules if r.number not in used]
    if unused:
        raise PlanError(f"{rules.source}: {unused[0]} matches no tensor of the source"
                        f"{' (reversed: its to: pattern is matched)' if reverse else ''}; fix or remove it")
    out: dict[str, Target] = {}
    origin: dict[str, str] = {}
    keys: dict[str, tuple[int, int, int]] = {}
    families: dict[tuple[int, tuple[str, ...]], int] = {}
    for at, (rule, dst, members) in enumerate(groups.values()):
        family = at
        if reverse and rule is not None and rule.joined is not None:
            family = families.setdefault(family_of(rule, members[0][1]), at)
        for index, (name, target) in enumerate(build(rule, dst, members, shapes, reverse)):
            if name in out:
                raise PlanError(f"{rules.source}: {origin[name]!r} and {members[0][0]!r} both map to {name!r}"
                                f"{'' if rule is None else f' ({rule})'}; two source tensors cannot share a name")
            out[name], origin[name], keys[name] = target, members[0][0], (family, index, at)
    if not reverse:
        return out
    position = {n: i for i, n in enumerate(rules.order)}
    recorded = bool(position) and all(n in position for n in out)
    return {n: out[n] for n in sorted(out, key=position.__getitem__ if recorded else keys.__getitem__)}


def family_of(rule: Rule, binding: Mapping[str, str]) -> tuple[int, tuple[str, ...]]:
    """Reversed joined tensors of one family expand interleaved: the rule and the values of the placeholders
    its `from` names before the joined one (Mixtral's `{p}.experts.{e}.{w}.weight`: one `{p}`, all `{w}`)."""
    before = rule.src[: rule.src.index("{" + rule.joined + "}")]  # type: ignore[operator]
    return rule.number, tuple(binding[p] for p in PLACEHOLDER.findall(before))


def recorded_order(metadata: Mapping[int, Mapping[str, str]], where: str) -> tuple[str, ...]:
    """The source order a joining forward conversion recorded (`ORDER_KEY` of the lowest rank file carrying
    it; empty without one). A damaged record is a FormatError: reversing by it could not be trusted."""
    text = next((m[ORDER_KEY] for _, m in sorted(metadata.items()) if ORDER_KEY in m), None)
    if text is None:
        return ()
    try:
        names = json.loads(text)
    except ValueError as e:
        names = e
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise FormatError(f"{where}: metadata {ORDER_KEY!r} is not a JSON list of distinct tensor names; the file "
                          "was changed after jaxreshard wrote it: remove that metadata key to reverse in natural "
                          "order")
    return tuple(names)


def build(rule: Rule | None, dst: str, members: list[tuple[str, dict[str, str]]],
          shapes: Mapping[str, tuple[Shape, np.dtype]], reverse: bool) -> list[tuple[str, Target]]:  # fmt: skip
    """The destination tensor(s) of one group of source names."""
    if rule is None or (rule.joined is None and rule.transpose is None):
        ((name, _),) = members
        shape, dtype = shapes[name]
        return [(dst, Target(shape, dtype, (Part(name, Box.full(shape), Box.full(shape)),), rule))]
    if rule.joined is None:
        ((name, _),) = members
        shape, dtype = shapes[name]
        perm = check_perm(rule, name, shape, reverse)
        return [(dst, Target(tuple(shape[p] for p in perm), dtype, (Part(name, Box.full(shape), Box.full(
            tuple(shape[p] for p in perm)), perm),), rule))]
    if reverse:
        ((name, binding),) = members
        shape, dtype = shapes[name]
        return (unstack if rule.stack else split)(rule, name, binding, shape, dtype)
    return [(dst, (stack if rule.stack else concat)(rule, dst, members, shapes))]


def check_perm(rule: Rule, name: str, shape: Shape, reverse: bool) -> tuple[int, ...]:
    assert rule.transpose is not None
    if len(rule.transpose) != len(shape):
        raise PlanError(f"{rule}: transpose {list(rule.transpose)} does not fit {name!r} with {len(shape)} dims "
                        f"{list(shape)}")
    return inverse(rule.transpose) if reverse else rule.transpose


def same(rule: Rule, members: list[tuple[str, Shape, np.dtype]], dim: int | None) -> None:
    """All members have one dtype and the same shape (except along `dim`)."""
    name0, shape0, dtype0 = members[0]
    for name, shape, dtype in members[1:]:
        keep = [i for i in range(len(shape0)) if i != dim]
        if dtype != dtype0 or len(shape) != len(shape0) or [shape[i] for i in keep] != [shape0[i] for i in keep]:
            raise PlanError(f"{rule}: {name!r} is {dtype}{list(shape)} but {name0!r} is {dtype0}{list(shape0)}; "
                            f"the tensors joined must agree{'' if dim is None else f' except along axis {dim}'}")


def stack(rule: Rule, dst: str, members: list[tuple[str, dict[str, str]]],
          shapes: Mapping[str, tuple[Shape, np.dtype]]) -> Target:  # fmt: skip
    key = rule.stack
    index = {int(b[key]): name for name, b in members}  # type: ignore[index]
    missing = [e for e in range(max(index) + 1) if e not in index]
    if missing:
        raise PlanError(f"{rule}: {dst!r} lacks {key}={missing[0]} (found {len(index)} of 0..{max(index)}); every "
                        "index from 0 must be present to stack")
    ordered = [index[e] for e in range(len(index))]
    shape, dtype = shapes[ordered[0]]
    perm = check_perm(rule, ordered[0], shape, False) if rule.transpose else None
    one = tuple(shape[p] for p in perm) if perm else shape
    same(rule, [(n, *shapes[n]) for n in ordered], None)
    if rule.axis > len(one):
        raise PlanError(f"{rule}: axis {rule.axis} is out of range for {len(one) + 1} dims of {dst!r}")
    full = (*one[: rule.axis], len(ordered), *one[rule.axis :])
    parts = tuple(Part(n, Box.full(shape), _slab(full, rule.axis, e, e + 1), perm, None, rule.axis)
                  for e, n in enumerate(ordered))
    return Target(full, dtype, parts, rule)


def unstack(rule: Rule, name: str, binding: dict[str, str], shape: Shape,
            dtype: np.dtype) -> list[tuple[str, Target]]:  # fmt: skip
    if rule.axis >= len(shape):
        raise PlanError(f"{rule}: {name!r} has {len(shape)} dims {list(shape)}; it cannot be unstacked along axis "
                        f"{rule.axis}")
    if shape[rule.axis] > MAX_PARTS:
        raise PlanError(f"{rule}: {name!r} would unstack into {shape[rule.axis]} tensors along axis {rule.axis}; "
                        f"more than {MAX_PARTS} is refused (is this the stacked tensor and axis?)")
    one = shape[: rule.axis] + shape[rule.axis + 1 :]
    perm = check_perm(rule, name, one, True) if rule.transpose else None
    out = []
    for e in range(shape[rule.axis]):
        dst = fill(rule.src, {**binding, rule.stack: str(e)})  # type: ignore[dict-item]
        dshape = tuple(one[p] for p in perm) if perm else one
        out.append((dst, Target(dshape, dtype, (Part(name, _slab(shape, rule.axis, e, e + 1), Box.full(dshape),
                                                     perm, rule.axis),), rule)))
    return out


def _slab(shape: Shape, axis: int, a: int, b: int) -> Box:
    return Box(tuple(a if i == axis else 0 for i in range(len(shape))),
               tuple(b if i == axis else s for i, s in enumerate(shape)))


def concat(rule: Rule, dst: str, members: list[tuple[str, dict[str, str]]],
           shapes: Mapping[str, tuple[Shape, np.dtype]]) -> Target:  # fmt: skip
    by_value = {b[rule.concat]: name for name, b in members}  # type: ignore[index]
    missing = [v for v in rule.values if v not in by_value]
    if missing:
        raise PlanError(f"{rule}: {dst!r} lacks its part {rule.concat}={missing[0]} (found {sorted(by_value)}); all "
                        f"of {list(rule.values)} must be present to concatenate")
    names = [by_value[v] for v in rule.values]
    shape0, dtype = shapes[names[0]]
    perm = check_perm(rule, names[0], shape0, False) if rule.transpose else None
    shaped = [(n, tuple(shapes[n][0][p] for p in perm) if perm else shapes[n][0], shapes[n][1]) for n in names]
    if rule.axis >= len(shaped[0][1]):
        raise PlanError(f"{rule}: axis {rule.axis} is out of range for {names[0]!r} with {len(shape0)} dims")
    same(rule, shaped, rule.axis)
    lengths = [s[rule.axis] for _, s, _ in shaped]
    if rule.sizes is not None and [rule.sizes[v] for v in rule.values] != lengths:
        raise PlanError(f"{rule}: sizes {dict(rule.sizes)} do not match the parts' lengths along axis {rule.axis}: "
                        f"{dict(zip(rule.values, lengths))}")
    full = list(shaped[0][1])
    full[rule.axis] = sum(lengths)
    cuts = _cuts(rule, lengths, names[0])
    parts = []
    for (name, _, _), cut in zip(shaped, cuts):
        src_shape = shapes[name][0]
        src_axis = perm[rule.axis] if perm else rule.axis
        for src_at, dst_at, n in cut:
            parts.append(Part(name, _slab(src_shape, src_axis, src_at, src_at + n),
                              _slab(tuple(full), rule.axis, dst_at, dst_at + n), perm))
    return Target(tuple(full), dtype, tuple(parts), rule)


def _cuts(rule: Rule, lengths: list[int], name: str) -> list[list[tuple[int, int, int]]]:
    """Per part, its (offset in the part, offset in the joined tensor, length) pieces: with `groups` G each
    part is cut in G equal pieces and the joined tensor is [group 0: every part's piece 0, group 1: ...]."""
    g = rule.groups
    if g * len(lengths) > MAX_PARTS:
        raise PlanError(f"{rule}: groups {g} x {len(lengths)} parts is more than {MAX_PARTS} pieces; check groups")
    bad = [(v, n) for v, n in zip(rule.values, lengths) if n % g]
    if bad:
        raise PlanError(f"{rule}: {name!r}: part {bad[0][0]} has length {bad[0][1]} along axis {rule.axis}, not "
                        f"divisible by groups {g}")
    group = sum(n // g for n in lengths)
    cuts, before = [], 0
    for n in lengths:
        k = n // g
        cuts.append([(i * k, i * group + before, k) for i in range(g)])
        before += k
    return cuts


def split(rule: Rule, name: str, binding: dict[str, str], shape: Shape,
          dtype: np.dtype) -> list[tuple[str, Target]]:  # fmt: skip
    if rule.axis >= len(shape):
        raise PlanError(f"{rule}: {name!r} has {len(shape)} dims; it cannot be split along axis {rule.axis}")
    total, count = shape[rule.axis], len(rule.values)
    if rule.sizes is not None:
        lengths = [rule.sizes[v] for v in rule.values]
        if sum(lengths) != total:
            raise PlanError(f"{rule}: sizes {dict(rule.sizes)} sum to {sum(lengths)} but {name!r} has {total} along "
                            f"axis {rule.axis}; fix sizes")
    elif total % count:
        raise PlanError(f"{rule}: {name!r} has {total} along axis {rule.axis}, not divisible into {count} equal "
                        "parts; give sizes: {value: length, ...} to split it back")
    else:
        lengths = [total // count] * count
    perm = inverse(rule.transpose) if rule.transpose else None
    if perm is not None and len(perm) != len(shape):
        raise PlanError(f"{rule}: transpose {list(rule.transpose)} does not fit {name!r} with {len(shape)} dims")  # type: ignore[arg-type]
    out = []
    for value, n, cut in zip(rule.values, lengths, _cuts(rule, lengths, name)):
        part_shape = list(shape)
        part_shape[rule.axis] = n
        dshape = tuple(part_shape[p] for p in perm) if perm else tuple(part_shape)
        dst_axis = inverse(perm)[rule.axis] if perm else rule.axis
        # a cut is (offset in the part, offset in the joined tensor, length); backwards the joined one is read
        parts = tuple(Part(name, _slab(shape, rule.axis, joined_at, joined_at + k),
                           _slab(dshape, dst_axis, part_at, part_at + k), perm) for part_at, joined_at, k in cut)
        out.append((fill(rule.src, {**binding, rule.concat: value}), Target(dshape, dtype, parts, rule)))  # type: ignore[dict-item]
    return out
