"""Bad transform rules and sources they do not fit (`--transform`, `--reverse`): exit 2, one line naming the
rule or parameter."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from .harness import Case, corpus_test

CONVERT = ["convert", "--src", "{tmp}/src.safetensors", "--dst", "{tmp}/out", "--transform", "{tmp}/t.yaml"]
EXPERTS = {f"m.experts.{e}.w1.weight": np.zeros((4, 2), np.float32) for e in range(3)}
QKV = {"l.q_proj.weight": np.zeros((8, 4), np.float32), "l.k_proj.weight": np.zeros((4, 4), np.float32),
       "l.v_proj.weight": np.zeros((4, 4), np.float32)}
CONCAT = "{from: '{p}.{x}_proj.weight', to: '{p}.qkv.weight', concat: {x: [q, k, v]}, axis: 0"


def files(tensors: dict[str, np.ndarray], *rules: str) -> Callable[[Path], None]:
    """Write `tensors` to {tmp}/src.safetensors and `rules` (flow-style YAML, one a line) to {tmp}/t.yaml."""

    def setup(tmp: Path) -> None:
        save_file(tensors, str(tmp / "src.safetensors"))
        (tmp / "t.yaml").write_text("rules:\n" + "".join(f"  - {r}\n" for r in rules))

    return setup


def raw(tensors: dict[str, np.ndarray], text: str) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        save_file(tensors, str(tmp / "src.safetensors"))
        (tmp / "t.yaml").write_text(text)

    return setup


STACK = "{from: '{p}.experts.{e}.{w}.weight', to: '{p}.experts.{w}', stack: e, axis: 0}"
CASES = [
    Case("rule-matches-nothing", CONVERT, 2, r"t\.yaml: rule 2 \('nope\.\{x\}' -> 'n\.\{x\}'\) matches no tensor",
         files(EXPERTS, STACK, "{from: 'nope.{x}', to: 'n.{x}'}")),
    Case("stack-missing-expert", CONVERT, 2, r"rule 1 .*'m\.experts\.w1' lacks e=1 \(found 2 of 0\.\.2\)",
         files({k: v for k, v in EXPERTS.items() if ".1." not in k}, STACK)),
    Case("stack-shapes-differ", CONVERT, 2, r"rule 1 .*'m\.experts\.2\.w1\.weight' is float32\[4, 3\] but "
         r"'m\.experts\.0\.w1\.weight' is float32\[4, 2\]",
         files({**EXPERTS, "m.experts.2.w1.weight": np.zeros((4, 3), np.float32)}, STACK)),
    Case("stack-dtypes-differ", CONVERT, 2, r"is float16\[4, 2\] but .* float32\[4, 2\]; the tensors joined must agree",
         files({**EXPERTS, "m.experts.2.w1.weight": np.zeros((4, 2), np.float16)}, STACK)),
    Case("stack-axis-out-of-range", CONVERT, 2, r"rule 1 .*axis 5 is out of range for 3 dims",
         files(EXPERTS, STACK.replace("axis: 0", "axis: 5"))),
    Case("concat-part-missing", CONVERT, 2, r"rule 1 .*'l\.qkv\.weight' lacks its part x=v",
         files({k: v for k, v in QKV.items() if "v_proj" not in k}, CONCAT + "}")),
    Case("concat-other-dims-differ", CONVERT, 2, r"rule 1 .*'l\.k_proj\.weight' is float32\[4, 5\] .*except along "
         r"axis 0", files({**QKV, "l.k_proj.weight": np.zeros((4, 5), np.float32)}, CONCAT + "}")),
    Case("concat-sizes-wrong", CONVERT, 2, r"rule 1 .*sizes .* do not match the parts' lengths along axis 0: "
         r"\{'q': 8, 'k': 4, 'v': 4\}", files(QKV, CONCAT + ", sizes: {q: 8, k: 2, v: 6}}")),
    Case("concat-groups-do-not-divide", CONVERT, 2, r"part q has length 8 along axis 0, not divisible by groups 3",
         files(QKV, CONCAT + ", groups: 3}")),
    Case("split-sizes-do-not-sum", CONVERT + ["--reverse"], 2,
         r"rule 1 .*sizes \{'q': 8, 'k': 4, 'v': 2\} sum to 14 but 'l\.qkv\.weight' has 16",
         files({"l.qkv.weight": np.zeros((16, 4), np.float32)}, CONCAT + ", sizes: {q: 8, k: 4, v: 2}}")),
    Case("split-not-defined-without-sizes", CONVERT + ["--reverse"], 2,
         r"'l\.qkv\.weight' has 16 along axis 0, not divisible into 3 equal parts; give sizes",
         files({"l.qkv.weight": np.zeros((16, 4), np.float32)}, CONCAT + "}")),
    Case("unstack-axis-out-of-range", CONVERT + ["--reverse"], 2, r"'m\.experts\.w1' has 1 dims \[3\]; it cannot be "
         r"unstacked along axis 1",
         files({"m.experts.w1": np.zeros(3, np.float32)}, STACK.replace("axis: 0", "axis: 1"))),
    Case("unstack-too-many", CONVERT + ["--reverse"], 2, r"'m\.experts\.w1' would unstack into 70000 tensors along "
         r"axis 0; more than 65536 is refused", files({"m.experts.w1": np.zeros((70000, 1), np.uint8)}, STACK)),
    Case("groups-too-many", CONVERT, 2, r"groups 30000 x 3 parts is more than 65536 pieces",
         files(QKV, CONCAT + ", groups: 30000}")),
    Case("reverse-matches-nothing", CONVERT + ["--reverse"], 2, r"rule 1 .* matches no tensor of the source "
         r"\(reversed: its to: pattern is matched\)", files(QKV, STACK)),
    Case("reverse-without-transform", ["convert", "--src", "{llama}", "--dst", "{tmp}/out", "--reverse"], 2,
         r"--reverse runs a --transform backwards; give the transform file too"),
    Case("transpose-not-a-permutation", CONVERT, 2, r"t\.yaml: rule 1: transpose \[0, 0\] is not a permutation",
         files(QKV, "{from: '{p}.weight', to: '{p}.kernel', transpose: [0, 0]}")),
    Case("transpose-wrong-rank", CONVERT, 2,
         r"rule 1 .*transpose \[2, 0, 1\] does not fit 'l\.[qkv]_proj\.weight' with 2 dims",
         files(QKV, "{from: '{p}.weight', to: '{p}.kernel', transpose: [2, 0, 1]}")),
    Case("two-sources-one-name", CONVERT, 2, r"'l\.[kq]_proj\.weight' and 'l\.[kq]_proj\.weight' both map to 'l\.w'",
         files(QKV, "{from: 'l.q_proj.weight', to: 'l.w'}", "{from: 'l.k_proj.weight', to: 'l.w'}")),
    Case("renamed-onto-unchanged-name", CONVERT, 2, r"both map to 'l\.k_proj\.weight'",
         files(QKV, "{from: 'l.q_proj.weight', to: 'l.k_proj.weight'}")),
    Case("renamed-onto-a-stacked-source", CONVERT, 2, r"'m\.experts\.0\.w1\.weight' is both a destination name",
         files({**EXPERTS, "x": np.zeros((4, 2), np.float32)}, STACK, "{from: 'x', to: 'm.experts.0.w1.weight'}")),
    Case("placeholders-differ", CONVERT, 2, r"rule 1: from and to must use the same placeholders",
         files(QKV, "{from: '{p}.weight', to: '{q}.kernel'}")),
    Case("stack-placeholder-in-to", CONVERT, 2, r"rule 1: the stack placeholder \{e\} must appear in from and not in "
         r"to", files(EXPERTS, "{from: 'm.experts.{e}.w1.weight', to: 'm.{e}', stack: e}")),
    Case("unknown-rule-key", CONVERT, 2, r"rule 1: unknown keys \['tranpose'\]",
         files(QKV, "{from: '{p}.weight', to: '{p}.kernel', tranpose: [1, 0]}")),
    Case("stack-and-concat", CONVERT, 2, r"rule 1: a rule either stacks or concatenates, not both",
         files(QKV, CONCAT + ", stack: x}")),
    Case("not-a-rules-file", CONVERT, 2, r"t\.yaml: a transform file is a mapping with one key, rules",
         raw(QKV, "- {from: a, to: b}\n")),
    Case("rules-file-not-yaml", CONVERT, 2, r"t\.yaml: transform file is not valid YAML: line 2",
         raw(QKV, "rules: [\n")),
    Case("rules-file-missing", ["convert", "--src", "{llama}", "--dst", "{tmp}/out", "--transform", "{tmp}/no.yaml"],
         2, r"no\.yaml"),
    Case("stacked-axis-not-divisible", CONVERT + ["--dst-layout", "{tmp}/l.yaml"], 2,
         r"'m\.experts\.w1' dim 0 of size 3 cannot be split 2 ways",
         lambda tmp: (files(EXPERTS, STACK)(tmp), (tmp / "l.yaml").write_text(
             "mesh: {ep: 2}\nparams:\n  - {match: 'm\\.experts\\.w1', spec: [ep, null, null]}\n"))[0]),
    Case("verify-with-transform", CONVERT + ["--verify"], 2, r"--verify .* does not apply with --transform",
         files(EXPERTS, STACK)),
]

test_case = corpus_test(CASES)
