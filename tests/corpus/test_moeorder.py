"""Bad inputs of the recorded source order (`jaxreshard.order` metadata, rulemap.recorded_order) that `--reverse`
reads from a stacked checkpoint: a damaged record is exit 2 naming the file and the key."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from .harness import Case, corpus_test

MOE = "configs/transforms/hf_moe_stack_experts.yaml"
REVERSE = ["convert", "--src", "{tmp}/stacked.safetensors", "--dst", "{tmp}/out", "--transform", MOE, "--reverse"]
DAMAGED = r"stacked\.safetensors: metadata 'jaxreshard\.order' is not a JSON list of distinct tensor names.*remove"


def stacked(record: str):
    """A stacked checkpoint whose order record is `record`."""
    def setup(tmp: Path) -> None:
        tensors = {f"m.experts.{w}": np.zeros((2, 2, 2), np.float32) for w in ("w1", "w2")}
        save_file(tensors, str(tmp / "stacked.safetensors"), metadata={"jaxreshard.order": record})
    return setup


CASES = [
    Case("order-not-json", REVERSE, 2, DAMAGED, stacked("[not json")),
    Case("order-not-a-list", REVERSE, 2, DAMAGED, stacked('{"m.experts.0.w1.weight": 0}')),
    Case("order-not-names", REVERSE, 2, DAMAGED, stacked("[1, 2]")),
    Case("order-a-name-twice", REVERSE, 2, DAMAGED, stacked('["m.experts.0.w1.weight", "m.experts.0.w1.weight"]')),
    Case("order-a-string", REVERSE, 2, DAMAGED, stacked('"m.experts.0.w1.weight"')),
]

test_case = corpus_test(CASES)
