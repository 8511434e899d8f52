"""The README's runnable example ("Use from training code") runs as written."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from jaxreshard.box import Box
from jaxreshard.formats import open_source
from jaxreshard.formats.base import FileHandles, read_box

REPO = Path(__file__).parents[1]


def test_training_code_example_runs(tmp_path):
    text = (REPO / "README.md").read_text()
    block = text.split("## Use from training code")[1].split("```python")[1].split("```")[0]
    block = block.replace("/tmp/jr_demo", str(tmp_path / "demo"))
    script = tmp_path / "example.py"
    script.write_text(block)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run([sys.executable, str(script)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "NamedSharding" in done.stdout and "'model'" in done.stdout


def _python_blocks(section: str) -> list[str]:
    text = (REPO / "README.md").read_text()
    body = text.split(f"## {section}\n")[1].split("\n## ")[0]
    return [part.split("```")[0] for part in body.split("```python")[1:]]


def _tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file (bfloat16 included, which safetensors.numpy cannot load)."""
    out = {}
    with FileHandles() as handles:
        for name, entry in open_source(path).entries[0].items():
            out[name] = np.empty(entry.shape, entry.dtype)
            read_box(handles, entry, Box.full(entry.shape), out[name])
    return out


def test_library_example_runs(tmp_path):
    """The "Library" section's example, run as written in a folder holding only `configs/`."""
    (block,) = _python_blocks("Library")
    (tmp_path / "configs").symlink_to(REPO / "configs")
    script = tmp_path / "library.py"
    script.write_text(block)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "1 rank file(s), 41 parameters, read from ckpt/dp2mp4" in done.stdout
    merged = _tensors(tmp_path / "ckpt" / "full" / "rank_0" / "checkpoint_0.safetensors")
    original = _tensors(tmp_path / "ckpt" / "full.safetensors")
    assert merged.keys() == original.keys() and len(original) == 41
    assert all(np.array_equal(merged[k], original[k]) for k in original)  # split then merged back: unchanged


def test_every_python_example_of_the_api_sections_is_run():
    """A new example in these sections must be added to a test here: there is one block in each."""
    assert len(_python_blocks("Library")) == 1 and len(_python_blocks("Use from training code")) == 1


def _run_section(tmp_path: Path, section: str) -> str:
    """A section's python blocks, run as written in a folder holding only `configs/`; returns stdout."""
    (tmp_path / "configs").symlink_to(REPO / "configs")
    script = tmp_path / "section.py"
    script.write_text("\n".join(_python_blocks(section)))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_transforms_example_runs(tmp_path):
    assert _run_section(tmp_path, "Transforms").split() == ["True", "(128,", "128)", "bfloat16"]


def test_moe_example_runs(tmp_path):
    assert _run_section(tmp_path, "MoE").split() == ["True", "True"]
