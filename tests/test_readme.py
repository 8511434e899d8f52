"""The README's runnable example ("Use from training code") runs as written."""

import os
import subprocess
import sys
from pathlib import Path

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
