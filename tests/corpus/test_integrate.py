"""Bad manifests met by both readers of jaxreshard outputs (`convert` reading a source, `verify`), which share
one manifest -> layout conversion (`manifests.layout_from_manifest`): each is exit 2 with one line, in seconds,
whichever command reads it; and a MindSpore output read by its manifest, pass-through copies included."""

from __future__ import annotations

import json
from pathlib import Path

import jaxreshard as jr
from jaxreshard.formats.manifest import MANIFEST_NAME

from .harness import Case, corpus_test

REPO = Path(__file__).resolve().parents[2]
DP2MP4 = str(REPO / "configs" / "layouts" / "llama_dp2mp4.yaml")
MS = REPO / "tests" / "fixtures" / "mindspore"
EMBED = "model.embed_tokens.weight"


def _dist(change=None, *, ms: bool = False):
    """`{tmp}/dist`: the example llama as dp2mp4 ranks (or the MindSpore fixture as dp2mp2 .ckpt ranks), its
    manifest then edited by `change(data)`."""

    def setup(tmp: Path) -> None:
        if ms:
            jr.convert(MS / "ckpt" / "complete", tmp / "dist", dst_strategy=MS / "strategy" / "dp2mp2.ckpt")
        else:
            jr.convert(_llama(tmp), tmp / "dist", dst_layout=DP2MP4)
        if change is not None:
            path = tmp / "dist" / MANIFEST_NAME
            data = json.loads(path.read_text())
            change(data)
            path.write_text(json.dumps(data))

    return setup


def _llama(tmp: Path) -> Path:
    from jaxreshard.example import write_llama_checkpoint

    return write_llama_checkpoint(tmp / "example" / "model.safetensors")


def _param(name: str, **fields):
    return lambda data: data["params"][name].update(fields)


def _flip_rank3_step(tmp: Path) -> None:
    """A MindSpore output whose pass-through `global_step` differs on rank 3 (its manifest removed, as if
    copied without it, so only the data can show it)."""
    from jaxreshard.formats import open_source

    _dist(ms=True)(tmp)
    (tmp / "dist" / MANIFEST_NAME).unlink()
    entry = open_source(tmp / "dist").entries[3]["global_step"]
    data = bytearray(entry.path.read_bytes())
    data[entry.segments[0][0]] ^= 1
    entry.path.write_bytes(bytes(data))


def _both(name: str, message: str, setup, code: int = 2) -> list[Case]:
    """The same bad output read by `convert` and by `verify`."""
    return [Case(f"{name}-convert", ["convert", "--src", "{tmp}/dist", "--dst", "{tmp}/out", "-q"], code, message,
                 setup),
            Case(f"{name}-verify", ["verify", "{tmp}/dist"], code, message, setup)]


BOMB = [["a", 2**20], ["b", 2**20]]
CASES = [
    *_both("manifest-rank-count-and-mesh-bomb",
           r"records 1099511627776 ranks(, over the cap of 16384| but .*dist has 8 rank file)",
           _dist(lambda d: (d.update(num_ranks=2**40), d["params"][EMBED].update(mesh=BOMB, spec=[])))),
    *_both("manifest-mesh-bomb", r"parameter 'model.embed_tokens.weight' is laid out on 1099511627776 devices x "
           r"stages \[0\], beyond the manifest's 8 ranks", _dist(_param(EMBED, mesh=BOMB, spec=[["a"]]))),
    *_both("manifest-stage-twice", r"parameter 'model.norm.weight': stages \[0, 0\] \(none, or one named twice\)",
           _dist(_param("model.norm.weight", stages=[0, 0]))),
    *_both("manifest-no-stages", r"parameter 'model.norm.weight': stages \[\] \(none, or one named twice\)",
           _dist(_param("model.norm.weight", stages=[]))),
    *_both("manifest-axis-used-twice", r"parameter 'lm_head.weight': mesh .* do not fit together \(a mesh axis "
           r"used twice in the spec\)", _dist(_param("lm_head.weight", spec=[["mp"], ["mp"]]))),
    *_both("manifest-axis-named-twice", r"parameter 'lm_head.weight': mesh .* do not fit together \(a mesh axis "
           r"named twice\)", _dist(_param("lm_head.weight", mesh=[["mp", 4], ["mp", 2]]))),
    *_both("manifest-too-many-axes", r"do not fit together \(40 mesh axes, over the cap of 32\)",
           _dist(_param("lm_head.weight", mesh=[[f"x{i}", 1] for i in range(40)], spec=[]))),
    *_both("manifest-spec-does-not-divide", r"parameter 'model.norm.weight': spec \[\['mp'\]\] on mesh .* does not "
           r"divide its shape \[129\]", _dist(_param("model.norm.weight", shape=[129], spec=[["mp"]]))),
    *_both("manifest-direct-not-a-list", r"'extra.direct' must be a list of parameter names",
           _dist(lambda d: d["extra"].update(direct="global_step"), ms=True)),
    Case("mindspore-output-verifies-by-its-manifest", ["verify", "{tmp}/dist", "--check-replicas"], 0, "",
         _dist(ms=True)),
    Case("mindspore-pass-through-copy-differs", ["verify", "{tmp}/dist", "--src-strategy",
                                                 str(MS / "strategy" / "dp2mp2.ckpt"), "--check-replicas"], 2,
         r"rank_3/checkpoint_3.ckpt: parameter 'global_step' on rank 3 should be a replica of rank 0 but element 0 ",
         _flip_rank3_step),
]

test_case = corpus_test(CASES)
