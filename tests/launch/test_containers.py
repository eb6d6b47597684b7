"""The Apptainer/Singularity definition files in launch/containers/: one per GPU vendor, every
EuroHPC profile covered, the image's own torch kept, runs offline by default. No container
runtime here, so they are checked as text and their %post with `bash -n`."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from eurotrain.clusters import known_clusters, load_profile

REPO = Path(__file__).resolve().parents[2]
DEFS = REPO / "launch" / "containers"
FOR_VENDOR = {"nvidia": "nvidia.def", "amd": "rocm.def"}
OFFLINE = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "WANDB_MODE")


def _sections(text: str) -> tuple[dict[str, str], dict[str, str]]:
    """(header keywords, sections by name) of a definition file."""
    header: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("#") and current is None:
            continue
        m = re.fullmatch(r"%(\w+)\s*", line)
        if m:
            current = m[1]
            sections[current] = []
        elif current is None and ":" in line:
            key, value = line.split(":", 1)
            header[key.strip()] = value.strip()
        elif current is not None:
            sections[current].append(line)
    return header, {k: "\n".join(v) for k, v in sections.items()}


def test_every_gpu_profile_has_a_definition_file():
    vendors = {load_profile(n).accelerator.vendor for n in known_clusters()} - {"cpu"}
    assert vendors == set(FOR_VENDOR)
    assert sorted(p.name for p in DEFS.glob("*.def")) == sorted(FOR_VENDOR.values())


@pytest.mark.parametrize("name", sorted(FOR_VENDOR.values()))
def test_definition_file(name, tmp_path):
    header, sections = _sections((DEFS / name).read_text())
    assert header["Bootstrap"] in ("docker", "localimage") and header["From"] == "{{ BASE }}"
    arguments = dict(line.strip().split("=", 1) for line in sections["arguments"].splitlines()
                     if line.strip())  # fmt: skip
    assert set(arguments) == {"BASE", "EXTRAS"} and arguments["BASE"]
    assert {"files", "post", "environment", "runscript", "test"} <= set(sections)
    post = sections["post"]
    # The image's torch stays: pip gets it as an exact constraint; eurotrain from its own wheel.
    assert 'print("torch==" + torch.__version__)' in post and "-c constraints.txt" in post
    assert "dist/eurotrain-*.whl" in post and "dist /opt/eurotrain/dist" in sections["files"]
    script = tmp_path / "post.sh"
    script.write_text(re.sub(r"\{\{ (\w+) \}\}", r"\1", post))
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    for name_ in OFFLINE:  # offline unless the job says otherwise
        assert re.search(rf"export {name_}=\${{{name_}:-", sections["environment"]), name_
    assert "exec python3 -m eurotrain" in sections["runscript"]
