"""The README's example script is the one in examples/, and it runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from multiproc import REPO


def test_readme_example_is_examples_train_tiny_and_runs(tmp_path) -> None:
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    example = (REPO / "examples/train_tiny.py").read_text()
    assert example in blocks, "README's python block differs from examples/train_tiny.py"
    assert len(example.strip().splitlines()) <= 25
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "examples/train_tiny.py", "--train.output_dir", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[callback] step 20" in proc.stdout
    first, last = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+)", proc.stdout).groups())
    assert last < first
