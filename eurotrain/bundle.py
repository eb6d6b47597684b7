"""``eurotrain bundle``: everything a machine without internet needs to install eurotrain.

Run where there is internet, copy the directory to the cluster, run its ``install.sh`` there:

  DIR/wheels/      eurotrain's wheel and a wheel of every dependency, for the target's CPython
                   version and CPU architecture (x86_64, or aarch64 for JUPITER's Grace)
  DIR/install.sh   checks the Python, creates a venv, ``pip install --no-index --find-links``
  DIR/SHA256SUMS   the wheels' checksums, verified by install.sh before it installs
  DIR/bundle.json  what the bundle was built for and from

The versions are the ones tested together (requirements-pinned.txt, torch from the Makefile);
only wheels are taken (``--only-binary=:all:``), so the install builds nothing. torch comes
from where the profile says (``torch_index``: a CUDA build for the NVIDIA machines), from
``--torch-index``, or from a local directory of wheels (``--wheels``) for what no index serves
(a ROCm torch that works on LUMI). Bad input (an unknown cluster, an unsupported Python, a
missing wheel directory) is refused before anything is built or downloaded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from eurotrain import resources
from eurotrain.clusters import ClusterProfile, load_profile
from eurotrain.errors import ConfigError
from eurotrain.pins import left_to_torch, normal, pin

PYTHONS = ("3.11", "3.12", "3.13", "3.14")
"""CPython versions a bundle can target: those the pinned versions publish wheels for (numpy
2.4.6 needs >= 3.11; torch 2.13.0 has cp310-cp314 wheels; PyPI, checked 2026-11-24)."""
TORCH = "2.13.0"
"""The torch version tested with the pins (the Makefile's)."""
GLIBC = "2.28"
"""Oldest glibc the wheels may need (manylinux_2_28: torch 2.13's own tag). The EuroHPC login
and compute nodes run RHEL/Rocky 8 or newer, SLES 15 SP4 or newer (UNVERIFIED per site)."""
PINS = "requirements-pinned.txt"


class BundleError(ConfigError):
    """A bundle that cannot be built as asked; the message names the option and the fix."""

    label = "error"
    every_rank = False


@dataclass
class Plan:
    """A checked request: what will be built, for which machine, from where."""

    cluster: str
    python: str
    arch: str
    glibc: str
    torch: str
    """Version spec for torch (2.13.0, or the version of the wheel in --wheels)."""
    torch_from: str
    """The index URL, or the local directory, torch comes from."""
    output: Path
    source: Path
    wheels: Path | None = None
    extras: list[str] = field(default_factory=list)

    def platforms(self) -> list[str]:
        """pip --platform tags, newest first: pip does not widen manylinux_2_28 to the older
        manylinux tags by itself when --platform is given."""
        newest = int(self.glibc.split(".")[1])
        tags = [f"manylinux_2_{minor}_{self.arch}" for minor in range(newest, 16, -1)]
        return [*tags, f"manylinux2014_{self.arch}"]

    def target_args(self) -> list[str]:
        platform = [arg for tag in self.platforms() for arg in ("--platform", tag)]
        return [*platform, "--python-version", self.python, "--implementation", "cp",
                "--only-binary=:all:"]  # fmt: skip


# ---- checks: everything that can be wrong, before anything is built or downloaded ----------
def plan(args: argparse.Namespace) -> Plan:
    profile = load_profile(args.cluster)  # an unknown cluster lists the known ones
    python = _check_python(args.python_version)
    if not re.fullmatch(r"2\.(1[7-9]|[2-9]\d)", args.glibc):
        raise BundleError(f"--glibc {args.glibc!r}: give the target's glibc as 2.N (N >= 17)")
    output = Path(args.output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise BundleError(
            f"--output {output}: exists and is not an empty directory; choose a new one (a "
            f"bundle is never mixed with other files)"
        )
    source = _source_tree(args.source)
    extras = _check_extras(args.extras, source)
    wheels = Path(args.wheels) if args.wheels else None
    torch, torch_from = _torch_source(profile, python, args, wheels)
    return Plan(profile.name, python, profile.cpu_arch, args.glibc, torch, torch_from,
                output, source, wheels, extras)  # fmt: skip


def _check_python(version: str) -> str:
    if not re.fullmatch(r"3\.\d+", version):
        raise BundleError(f"--python-version {version!r}: give MAJOR.MINOR, for example 3.11")
    if version not in PYTHONS:
        raise BundleError(
            f"--python-version {version}: a bundle can target CPython {', '.join(PYTHONS)} (the "
            f"pinned numpy needs >= 3.11); load a supported Python on the cluster (module load "
            f"python/3.11 or similar) and pass its version"
        )
    return version


def _source_tree(given: str | None) -> Path:
    """The eurotrain source tree to build the wheel from: --source, or the checkout this
    eurotrain is imported from (a wheel install has none)."""
    tree = Path(given) if given else resources.PACKAGE_DIR.parent
    project = tree / "pyproject.toml"
    if not (project.is_file() and re.search(r'(?m)^name = "eurotrain"$', project.read_text())):
        raise BundleError(
            f"{'--source ' + given if given else 'eurotrain'}: no eurotrain source tree at "
            f"{tree} (pyproject.toml); run `eurotrain bundle` from a git checkout, or pass "
            f"--source DIR"
        )
    return tree


def _check_extras(text: str, source: Path) -> list[str]:
    extras = [e for e in text.split(",") if e] if text else []
    table = (source / "pyproject.toml").read_text().split("[project.optional-dependencies]")
    known = re.findall(r"(?m)^([a-z][a-z0-9-]*) = \[", table[1].split("\n[")[0]) if len(
        table
    ) > 1 else []  # fmt: skip
    unknown = [e for e in extras if e not in known]
    if unknown:
        raise BundleError(
            f"--extras {','.join(unknown)}: not an extra of eurotrain; choose from "
            f"{', '.join(known)}"
        )
    return extras


_WHEEL = re.compile(
    r"(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-(?P<py>[^-]+)-(?P<abi>[^-]+)-(?P<plat>[^-]+)\.whl"
)


def _torch_wheels(directory: Path, python: str, arch: str) -> list[tuple[str, Path]]:
    """(version, file) of the torch wheels in `directory` built for this CPython and arch."""
    cp = "cp" + python.replace(".", "")
    found = []
    for path in sorted(directory.glob("torch-*.whl")):
        m = _WHEEL.fullmatch(path.name)
        if (
            m
            and cp in m["py"].split(".")
            and any(t.endswith("_" + arch) for t in m["plat"].split("."))
        ):
            found.append((m["version"], path))
    return found


def _torch_source(
    profile: ClusterProfile, python: str, args: argparse.Namespace, wheels: Path | None
) -> tuple[str, str]:
    """(torch version spec, where it comes from); the local directory wins over any index."""
    if wheels is not None:
        if not wheels.is_dir():
            raise BundleError(f"--wheels {wheels}: not a directory")
        torches = _torch_wheels(wheels, python, profile.cpu_arch)
        if torches:
            if args.torch is None:
                return torches[-1][0], str(wheels)
            if any(v.split("+")[0] == args.torch.split("+")[0] for v, _ in torches):
                return args.torch, str(wheels)
        if torches or (args.torch_index is None and profile.torch_index is None):
            held = ", ".join(p.name for p in sorted(wheels.glob("*.whl"))) or "no wheels"
            raise BundleError(
                f"--wheels {wheels}: no torch{' ' + args.torch if args.torch else ''} wheel for "
                f"CPython {python} on {profile.cpu_arch} (it holds {held}); add one, e.g. "
                f"`pip download --no-deps torch==VERSION -d {wheels}` on a machine like the "
                f"cluster"
            )
    index = args.torch_index or profile.torch_index
    if index is None:
        raise BundleError(
            f"{profile.name}: no package index is known to serve a torch that works there "
            f"({profile.torch_note or 'see the profile'}); pass --wheels DIR holding the torch "
            f"wheel (and what it needs that PyPI lacks), or --torch-index URL"
        )
    if not re.fullmatch(r"(https?|file)://\S+|pypi", index):
        raise BundleError(f"--torch-index {index!r}: give an http(s):// or file:// URL, or pypi")
    return args.torch or TORCH, index


# ---- building -----------------------------------------------------------------------------
def _pip(args: list[str], what: str) -> str:
    """Run pip (this interpreter's); a failure becomes one line naming what pip said."""
    done = subprocess.run(
        [sys.executable, "-m", "pip", *args], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        said = [line.strip() for line in done.stderr.splitlines() if line.startswith("ERROR")]
        raise BundleError(
            f"{what} failed: {' '.join(said) or done.stderr.strip()[-500:]}; a dependency "
            f"without a wheel for this target can be built on a machine like the cluster "
            f"(`pip wheel --no-deps PKG==VERSION`) and passed with --wheels DIR"
        )
    return done.stdout


def _build_eurotrain(source: Path, into: Path) -> Path:
    """eurotrain's wheel, built from a copy of the tree (setuptools writes build/ and egg-info
    next to the sources); links are kept so kernels, profiles and presets become files."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "eurotrain"
        junk = shutil.ignore_patterns(".venv", ".git", "runs", "build", "*.egg-info", "__pycache__")
        shutil.copytree(source, copy, symlinks=True, ignore=junk)
        _pip(["wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(into),
              str(copy)], "building eurotrain's wheel")  # fmt: skip
    (wheel,) = into.glob("eurotrain-*.whl")
    return wheel


def _left_to_torch_wheel(wheel: Path) -> set[str]:
    """The pins to leave to a torch wheel, from its METADATA: those it makes itself (triton,
    NCCL, ...), and triton where it pins a Triton of its own (eurotrain/pins.py)."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    return set(left_to_torch(re.findall(r"(?m)^Requires-Dist: (.*)$", text)))


def _constraints(plan: Plan, torch_wheel: Path, into: Path) -> Path:
    """The pinned versions, less those the torch wheel pins itself, plus that torch exactly."""
    own = _left_to_torch_wheel(torch_wheel)
    version = _WHEEL.fullmatch(torch_wheel.name)
    assert version is not None  # pip saved it under a wheel name
    lines = [f"torch=={version['version']}"]
    pins = plan.source / PINS
    for line in pins.read_text().splitlines() if pins.is_file() else []:
        p = pin(line)
        if p is not None and normal(p[0]) not in own | {"torch"}:
            lines.append(f"{p[0]}=={p[1]}")  # a constraint takes no extras
    path = into / "constraints.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def build(p: Plan) -> list[Path]:
    """Download everything into p.output/wheels; returns the wheels."""
    wheels = p.output / "wheels"
    wheels.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print(f"eurotrain bundle: building eurotrain's wheel from {p.source}", flush=True)
        own = _build_eurotrain(p.source, wheels)
        print(f"eurotrain bundle: torch {p.torch} from {p.torch_from}", flush=True)
        where = (["--no-index", "--find-links", str(p.wheels)] if p.wheels is not None and
                 p.torch_from == str(p.wheels) else _index_args(p.torch_from))  # fmt: skip
        _pip(["download", "-q", "--no-deps", f"torch=={p.torch}", "-d", str(wheels),
              *where, *p.target_args()], f"downloading torch=={p.torch}")  # fmt: skip
        (torch_wheel,) = _torch_wheels(wheels, p.python, p.arch)[-1:]
        constraints = _constraints(p, torch_wheel[1], work)
        print("eurotrain bundle: the dependencies (pinned versions, wheels only)", flush=True)
        links = ["--find-links", str(wheels)]
        if p.wheels is not None:
            links += ["--find-links", str(p.wheels)]
        if p.torch_from != str(p.wheels) and p.torch_from != "pypi":
            links += ["--extra-index-url", p.torch_from]  # e.g. pytorch-triton-rocm lives there
        spec = f"{own}[{','.join(p.extras)}]" if p.extras else str(own)
        _pip(["download", "-q", "-c", str(constraints), "-d", str(wheels), *links,
              *p.target_args(), spec], "downloading the dependencies")  # fmt: skip
    return sorted(wheels.glob("*.whl"))


def _index_args(index: str) -> list[str]:
    return [] if index == "pypi" else ["--index-url", index]


# ---- what goes next to the wheels ---------------------------------------------------------
def write_files(p: Plan, wheels: list[Path], profile: ClusterProfile) -> None:
    sums = [f"{_sha256(w)}  {w.name}" for w in wheels]
    (p.output / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    torch = next(w.name for w in wheels if w.name.startswith("torch-"))
    own = next(w for w in wheels if w.name.startswith("eurotrain-"))
    version = own.name.split("-")[1]
    info = {**asdict(p), "output": str(p.output), "source": str(p.source),
            "wheels": None if p.wheels is None else str(p.wheels), "torch_wheel": torch,
            "eurotrain": version, "files": [w.name for w in wheels]}  # fmt: skip
    (p.output / "bundle.json").write_text(json.dumps(info, indent=2) + "\n")
    script = p.output / "install.sh"
    script.write_text(install_script(p, profile, version))
    script.chmod(0o755)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def install_script(p: Plan, profile: ClusterProfile, version: str) -> str:
    """install.sh: every value in it comes from the checked plan (digits, the arch, a profile
    name, a version), and is quoted all the same."""
    major, minor = p.python.split(".")
    requirement = f"eurotrain[{','.join(p.extras)}]=={version}" if p.extras else (
        f"eurotrain=={version}"
    )  # fmt: skip
    check = (
        "import platform, sys\n"
        f"want, arch = ({major}, {minor}), {p.arch!r}\n"
        "have = sys.version_info[:2]\n"
        "if have != want or platform.machine() != arch or sys.implementation.name != 'cpython':\n"
        "    sys.exit(f'install.sh: this bundle is for CPython {want[0]}.{want[1]} on {arch}; '\n"
        "             f'{sys.executable} is {sys.implementation.name} {have[0]}.{have[1]} on '\n"
        "             f'{platform.machine()}: load that Python (module load ...) or set PYTHON=')\n"
    )
    return f"""#!/usr/bin/env bash
# eurotrain offline installer, written by `eurotrain bundle` for {profile.name}
# ({profile.description}): CPython {p.python} on {p.arch}, glibc >= {p.glibc},
# torch {p.torch} from {p.torch_from}.
#
#   bash install.sh [VENV]     (default VENV: venv/ next to this script)
#   PYTHON=python3.{minor} bash install.sh VENV     to choose the interpreter
#
# Installs from wheels/ only (pip --no-index): no index or proxy is ever contacted.
set -euo pipefail
bundle=$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)
venv=${{1:-$bundle/venv}}
python=${{PYTHON:-python3}}

"$python" -c {shlex.quote(check)}
if command -v sha256sum >/dev/null; then
    (cd "$bundle/wheels" && sha256sum --quiet --check ../SHA256SUMS) || {{
        echo "install.sh: wheels/ differs from SHA256SUMS: copy the bundle again" >&2; exit 1; }}
fi
"$python" -m venv "$venv"
PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1 "$venv/bin/python" -m pip install \\
    --no-index --find-links "$bundle/wheels" {shlex.quote(requirement)}
"$venv/bin/python" -c 'import eurotrain, torch; print(f"eurotrain {{eurotrain.__version__}}, torch {{torch.__version__}}")'
echo "installed into $venv: source $venv/bin/activate (or pass --python $venv/bin/python to eurotrain launch)"
"""


# ---- command line -------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    ap = argparse.ArgumentParser(
        prog="eurotrain bundle",
        description="Build an offline bundle (wheels + install.sh) for a cluster's Python and "
        "CPU; run it where there is internet, copy DIR to the cluster, run DIR/install.sh.",
    )
    ap.add_argument("--cluster", required=True, help="profile name (eurotrain launch --list)")
    ap.add_argument("--output", required=True, help="new (or empty) directory for the bundle")
    ap.add_argument("--python-version", default=here,
                    help=f"the cluster's CPython, MAJOR.MINOR (default: this one, {here})")  # fmt: skip
    ap.add_argument("--torch", help=f"torch version (default {TORCH}, or the one in --wheels)")
    ap.add_argument("--torch-index", help="index serving the torch build for the cluster "
                    "(default: the profile's torch_index); 'pypi' for the default index")  # fmt: skip
    ap.add_argument("--wheels", help="local directory of wheels no index serves (a ROCm torch "
                    "for LUMI, a deepspeed built for the target); its torch wins")  # fmt: skip
    ap.add_argument(
        "--extras", default="", help="eurotrain extras, comma-separated: mpi,deepspeed,triton"
    )
    ap.add_argument("--glibc", default=GLIBC, help=f"oldest glibc on the cluster (default {GLIBC})")
    ap.add_argument("--source", help="eurotrain source tree (default: this checkout)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    p = plan(args)  # BundleError/ConfigError: one line, exit 2, nothing downloaded
    profile = load_profile(p.cluster)
    existed = p.output.exists()
    try:
        wheels = build(p)
        write_files(p, wheels, profile)
    except BaseException:
        # A half-built bundle is not left behind to be copied to a cluster by mistake.
        shutil.rmtree(p.output if not existed else p.output / "wheels", ignore_errors=True)
        raise
    size = sum(w.stat().st_size for w in wheels) / 2**20
    print(f"eurotrain bundle: {len(wheels)} wheels ({size:,.0f} MiB) for {p.cluster}, CPython "
          f"{p.python} on {p.arch}, in {p.output}; copy it to the cluster and run "
          f"bash {p.output}/install.sh VENV")  # fmt: skip
    return 0
