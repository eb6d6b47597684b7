"""Cluster profiles and config presets ship inside the package: found from a plain checkout, an
editable install and a wheel (the links eurotrain/profiles and eurotrain/presets, as for
kernels/), never from the current directory; EUROTRAIN_CLUSTERS adds and overrides profiles."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from eurotrain.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
EUROHPC = {"mn5-acc", "lumi-g", "leonardo-booster", "jupiter-booster", "meluxina-gpu",
           "karolina-gpu", "vega-gpu", "deucalion-gpu", "local"}  # fmt: skip
# What a user gets: the profiles, one loaded, a preset by name and a preset named by a user's
# own config through 'base:' (read_yaml is what load_config reads files with; without torch,
# so each probe starts in a fraction of a second).
PROBE = """
import json, pathlib
import eurotrain
from eurotrain.clusters import known_clusters, load_profile
from eurotrain.configtools import read_yaml
pathlib.Path("mine.yaml").write_text("base: tiny\\ntrain: {steps: 7}\\n")
mine = read_yaml("mine.yaml")
print(json.dumps({
    "package": eurotrain.__file__,
    "clusters": known_clusters(),
    "lumi_arch": load_profile("lumi-g").cpu_arch,
    "tiny_layers": read_yaml("tiny")["model"]["num_layers"],
    "llama_dim": read_yaml("llama3-8b.yaml")["model"]["dim"],
    "mine": [mine["model"]["num_layers"], mine["train"]["steps"]],
}))
"""


def _probe(cwd: Path, python: str = sys.executable, pythonpath: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "EUROTRAIN_CLUSTERS")}
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    out = subprocess.run(
        [python, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _check(found: dict, package_dir: Path) -> None:
    assert Path(found["package"]).parent == package_dir
    assert set(found["clusters"]) == EUROHPC
    assert found["lumi_arch"] == "x86_64" and found["tiny_layers"] == 4
    assert found["llama_dim"] == 4096 and found["mine"] == [4, 7]


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory) -> Path:
    """The source tree without the venv and build outputs, links kept as links (setuptools
    writes build/ and egg-info next to the sources it builds)."""
    src = tmp_path_factory.mktemp("src") / "eurotrain-src"
    junk = shutil.ignore_patterns(".venv", ".git", "runs", "build", "*.egg-info", "__pycache__")
    shutil.copytree(REPO, src, symlinks=True, ignore=junk)
    return src


def test_links_point_at_the_top_level_folders():
    for link, target in (("profiles", "../launch/clusters"), ("presets", "../configs")):
        path = REPO / "eurotrain" / link
        assert path.is_symlink() and os.readlink(path) == target


def test_plain_checkout(tmp_path):
    _check(_probe(tmp_path, pythonpath=str(REPO)), REPO / "eurotrain")


def test_editable_install(tmp_path, source_copy):
    # A fresh venv that sees this one's packages (torch, yaml) through a .pth line, so only
    # eurotrain itself is installed: in editable mode, from the copy.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps",
         "--no-build-isolation", "--no-index", "-e", str(source_copy)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr
    work = tmp_path / "work"
    work.mkdir()
    _check(_probe(work, python=python), source_copy / "eurotrain")


def test_wheel_holds_profiles_and_presets_as_files(tmp_path, source_copy):
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", "-w", str(tmp_path / "dist"), str(source_copy)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "dist").glob("eurotrain-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"eurotrain/profiles/{n}.yaml" for n in EUROHPC} <= names
    assert "eurotrain/presets/tiny.yaml" in names and "eurotrain/presets/llama3-8b.yaml" in names
    assert not any(n.startswith(("launch/", "configs/")) for n in names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    assert not (site / "eurotrain" / "profiles").is_symlink()
    work = tmp_path / "work"
    work.mkdir()
    _check(_probe(work, pythonpath=str(site)), site / "eurotrain")


# ---- EUROTRAIN_CLUSTERS and `eurotrain launch --list` ------------------------------------
@pytest.fixture
def own_profiles(tmp_path, monkeypatch) -> Iterator[Path]:
    """A directory with a new machine and an override of a packaged one."""
    text = (REPO / "launch" / "clusters" / "local.yaml").read_text()
    mine = tmp_path / "profiles"
    mine.mkdir()
    (mine / "mylab.yaml").write_text(text.replace("name: local", "name: mylab"))
    (mine / "local.yaml").write_text(text.replace("cpus_per_node: 2", "cpus_per_node: 4"))
    monkeypatch.setenv("EUROTRAIN_CLUSTERS", str(mine))
    yield mine


def test_eurotrain_clusters_adds_and_overrides(own_profiles):
    from eurotrain.clusters import known_clusters, load_profile

    assert set(known_clusters()) == EUROHPC | {"mylab"}
    assert load_profile("mylab").name == "mylab"
    assert load_profile("local").cpus_per_node == 4  # the override, not the packaged one
    assert load_profile("lumi-g").gpus_per_node == 8  # the rest stay the packaged ones


def test_launch_list_names_each_profile_and_its_source(own_profiles, capsys):
    assert cli_main(["launch", "--list"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line}
    assert set(lines) >= EUROHPC | {"mylab"}
    assert "EUROTRAIN_CLUSTERS" in lines["mylab"] and str(own_profiles) in lines["mylab"]
    assert "EUROTRAIN_CLUSTERS" in lines["local"] and "overrides the packaged" in lines["local"]
    assert "package" in lines["lumi-g"] and "lumi-g.yaml" in lines["lumi-g"]


def test_unknown_cluster_names_where_it_looked(own_profiles, tmp_path, monkeypatch):
    from eurotrain.clusters import load_profile
    from eurotrain.errors import ConfigError

    monkeypatch.setenv("EUROTRAIN_CLUSTERS", os.pathsep.join([str(own_profiles), "/no/such"]))
    with pytest.raises(ConfigError) as err:
        load_profile("lumi")
    said = str(err.value)
    assert "Did you mean 'lumi-g'?" in said and "mylab" in said
    assert str(own_profiles) in said and "/no/such (missing)" in said


def test_a_missing_config_lists_the_presets(tmp_path, monkeypatch):
    from eurotrain.config import load_config
    from eurotrain.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        ConfigError, match=r"Did you mean the preset .tiny.\?.*presets: .*llama3-8b.*tiny"
    ):
        load_config("tinyy")
