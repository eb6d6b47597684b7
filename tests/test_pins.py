"""eurotrain/pins.py: the pinned set installed beside a GPU torch keeps that torch's own Triton
(torch 2.13.0's CUDA wheel requires triton==3.7.1; the pinned triton==3.9.0 over it was what
`make venv` installed with a CUDA torch, e.g. on Python 3.12)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from eurotrain.bundle import _left_to_torch_wheel
from eurotrain.pins import left_to_torch

REPO = Path(__file__).resolve().parents[1]
CUDA = [  # torch 2.13.0's CUDA wheel (Python 3.12, read from its METADATA)
    "filelock",
    "typing-extensions>=4.10.0",
    'nvidia-nccl-cu13==2.29.7; platform_system == "Linux"',
    'triton==3.7.1; platform_system == "Linux" and python_version < "3.15"',
    'optree>=0.13.0; extra == "optree"',
]
ROCM = ["filelock", 'pytorch-triton-rocm==3.6.0; platform_system == "Linux"']
CPU = ["filelock", "sympy>=1.13.3", 'pyyaml; extra == "pyyaml"']


@pytest.mark.parametrize(
    ("requires", "left"),
    [
        (CUDA, {"nvidia-nccl-cu13": "nvidia-nccl-cu13==2.29.7", "triton": "triton==3.7.1"}),
        # its own Triton under another name: the pinned triton would be a second copy
        (ROCM, {"pytorch-triton-rocm": "pytorch-triton-rocm==3.6.0",
                "triton": "pytorch-triton-rocm==3.6.0"}),
        (CPU, {}),
    ],
)  # fmt: skip
def test_the_pins_torch_makes_itself_are_left_to_it(requires, left):
    assert left_to_torch(requires) == left


def test_the_script_filters_the_pinned_file_for_the_installed_torch(tmp_path):
    pins = tmp_path / "pins.txt"
    pins.write_text("# a comment\ntransformers==5.23.0\nTriton == 3.9.0\nnumpy==2.4.6\n")
    done = subprocess.run(
        [sys.executable, str(REPO / "eurotrain" / "pins.py"), str(pins)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    if "triton" in left_to_torch(metadata.requires("torch") or []):  # a GPU build of torch
        assert done.stdout == "# a comment\ntransformers==5.23.0\nnumpy==2.4.6\n"
        assert "Triton == 3.9.0 left out: the installed torch" in done.stderr
    else:  # the CPU build: nothing of its own
        assert done.stdout == pins.read_text() and done.stderr == ""


def test_the_bundle_leaves_the_same_pins_to_its_torch_wheel(tmp_path):
    wheel = tmp_path / "torch-2.13.0-cp312-cp312-manylinux_2_28_x86_64.whl"
    meta = "Metadata-Version: 2.1\nName: torch\n" + "".join(f"Requires-Dist: {r}\n" for r in ROCM)
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("torch-2.13.0.dist-info/METADATA", meta)
    assert _left_to_torch_wheel(wheel) == {"pytorch-triton-rocm", "triton"}
