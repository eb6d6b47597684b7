"""Cluster profiles: what eurotrain knows about a machine, loaded from ``launch/clusters/NAME.yaml``.

A profile is data (one YAML file per machine, each fact with its public source in a comment);
this module gives it a typed, validated shape so a typo in a profile fails as loudly as a typo
in a training config, and answers the questions the launcher and the doctor ask of it.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from eurotrain.configtools import ConfigError, from_dict, read_yaml

PROFILE_DIR = Path(__file__).resolve().parents[1] / "launch" / "clusters"
"""Where the profiles live in a source checkout; EUROTRAIN_CLUSTERS overrides it."""


@dataclass
class Accelerator:
    """One device as PyTorch sees it (one GCD of an MI250X counts as a device)."""

    model: str
    """Vendor model name, for people."""
    vendor: Literal["nvidia", "amd", "cpu"]
    """nvidia: CUDA + NCCL; amd: ROCm + RCCL; cpu: no accelerator (gloo; the local profile)."""
    memory_gib: float = 0.0
    """Device memory in GiB."""
    peak_bf16_tflops: float | None = None
    """Dense bf16 peak per device; passed to the run as --train.peak_tflops for MFU."""


@dataclass
class Queue:
    """A place to submit to: a SLURM partition, optionally with a QoS, and its limits."""

    partition: str
    """SLURM partition (--partition)."""
    qos: str = ""
    """SLURM QoS (--qos); empty: the partition's default."""
    max_time: str = ""
    """Longest walltime, [D-]HH:MM:SS; empty: unknown, not checked."""
    max_nodes: int = 0
    """Most nodes per job; 0: unknown, not checked."""
    min_nodes: int = 1
    """Fewest nodes per job this queue accepts."""
    purpose: Literal["debug", "production"] = "production"
    """debug: short test jobs; production: real runs."""

    def __post_init__(self) -> None:
        if self.max_time:
            parse_walltime(self.max_time)


@dataclass
class Container:
    """How to run inside an Apptainer/Singularity image (--container IMG)."""

    runtime: str = "apptainer"
    """The command: apptainer or singularity."""
    flags: list[str] = field(default_factory=list)
    """Flags for `exec`: --nv on NVIDIA, --rocm on AMD."""
    binds: list[str] = field(default_factory=list)
    """Host paths bound into the container (file systems, fabric libraries)."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run only when a container is used (module loads of the runtime, bindings)."""


@dataclass
class Comm:
    """The collective-communication library and the environment it needs on this network."""

    library: Literal["nccl", "rccl", "gloo"]
    """nccl on NVIDIA + InfiniBand, rccl (+ aws-ofi-rccl) on AMD + Slingshot, gloo on CPU."""
    env: dict[str, str] = field(default_factory=dict)
    """Variables exported before the ranks start; the doctor checks they are set."""

    def __post_init__(self) -> None:
        self.env = {str(k): str(v) for k, v in self.env.items()}


@dataclass
class FileSystem:
    path: str
    """Mount point or path pattern ($USER, project names left as placeholders)."""
    type: str
    """lustre, gpfs, nfs, ..."""
    use: str = ""
    """What it is for here: checkpoints, data, software, home."""


@dataclass
class ClusterProfile:
    """Everything the launcher renders and the doctor checks, for one machine."""

    name: str
    description: str
    accelerator: Accelerator
    gpus_per_node: int
    """Devices per node (GCDs on LUMI); one rank each."""
    cpus_per_node: int
    """Cores a job may use per node."""
    cpus_per_task: int
    """Cores given to each rank (srun --cpus-per-task)."""
    numa_domains: int
    """NUMA domains per node."""
    cpu_arch: Literal["x86_64", "aarch64"]
    cpu_bind: str = ""
    """srun --cpu-bind value (cores, socket, mask_cpu:...); empty: no --cpu-bind."""
    gpu_affinity: str = ""
    """Which cores and NICs sit next to which GPU, for people and the docs."""
    gpu_request: Literal["gres", "gpus-per-node", "none"] = "gres"
    """How GPUs are requested: --gres=gpu:N or --gpus-per-node=N (or not at all)."""
    nics: list[str] = field(default_factory=list)
    """High-speed interfaces (names in /sys/class/net or /sys/class/infiniband)."""
    account_required: bool = True
    """Whether jobs must name a project account (--account)."""
    account_example: str = ""
    """What an account name looks like here, for the error message."""
    internet_on_compute: bool | None = None
    """Whether compute nodes reach the internet; null: unknown."""
    queues: dict[str, Queue] = field(default_factory=dict)
    """Named places to submit to; --partition picks one by name."""
    default_queue: str = ""
    master_addr: Literal["hostname", "nodeaddr"] = "hostname"
    """Rendezvous address: the first node's host name, or its NodeAddr from `scontrol show
    node` (for emulated nodes whose names do not resolve)."""
    modules: list[str] = field(default_factory=list)
    """`module load` arguments, in order. No `module purge` first: a user's venv may rest on a
    module's Python."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run before the ranks start (after modules)."""
    container: Container = field(default_factory=Container)
    comm: Comm = field(default_factory=lambda: Comm("nccl"))
    env: dict[str, str] = field(default_factory=dict)
    """Other variables for every rank (caches, offline modes); $VARS expand in the job."""
    sbatch_extra: list[str] = field(default_factory=list)
    """Further #SBATCH options this machine needs (memory, exclusivity)."""
    filesystems: list[FileSystem] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.env = {str(k): str(v) for k, v in self.env.items()}
        # configtools converts a mapping's values only when they are plain data: do it here.
        self.queues = {
            str(k): v if isinstance(v, Queue) else from_dict(Queue, v, f"queues.{k}")
            for k, v in self.queues.items()
        }
        for key in ("gpus_per_node", "cpus_per_node", "cpus_per_task", "numa_domains"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{self.name}: {key} = {getattr(self, key)} must be >= 1")
        if not self.queues:
            raise ConfigError(f"{self.name}: the profile lists no queues")
        if self.default_queue not in self.queues:
            raise ConfigError(
                f"{self.name}: default_queue {self.default_queue!r} is not one of the queues "
                f"{sorted(self.queues)}"
            )

    @property
    def comm_env(self) -> dict[str, str]:
        return dict(self.comm.env)

    def queue(self, name: str | None) -> tuple[str, Queue]:
        """The queue called ``name`` (the default when None), with an error naming the others."""
        key = name or self.default_queue
        if key in self.queues:
            return key, self.queues[key]
        by_partition = [q for q, v in self.queues.items() if v.partition == key]
        hint = f" (partition {key!r} is behind queue {by_partition[0]!r})" if by_partition else ""
        raise ValueError(
            f"unknown partition {key!r} for cluster {self.name}{hint}; --partition takes one of "
            + ", ".join(
                f"{q} (partition {v.partition}{', qos ' + v.qos if v.qos else ''})"
                for q, v in self.queues.items()
            )
        )


def profile_dir() -> Path:
    return Path(os.environ.get("EUROTRAIN_CLUSTERS") or PROFILE_DIR)


def known_clusters() -> list[str]:
    return sorted(p.stem for p in profile_dir().glob("*.yaml"))


def load_profile(name: str) -> ClusterProfile:
    """Load and validate ``launch/clusters/NAME.yaml``; unknown names list the known ones."""
    path = profile_dir() / f"{name}.yaml"
    if not path.is_file():
        known = known_clusters()
        near = difflib.get_close_matches(name, known, n=1, cutoff=0.4)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise ValueError(
            f"unknown cluster {name!r}.{hint} Known clusters: {', '.join(known) or 'none'} "
            f"(profiles in {profile_dir()}; add NAME.yaml there for a new machine)"
        )
    data = read_yaml(path)
    try:
        profile = from_dict(ClusterProfile, data)
    except ConfigError as e:
        raise ConfigError(f"cluster profile {path}: {e}") from None
    if profile.name != name:
        raise ConfigError(f"cluster profile {path} says name: {profile.name!r}; expected {name!r}")
    return profile


_WALLTIME = re.compile(r"^(?:(\d+)-)?(\d{1,3}):([0-5]\d):([0-5]\d)$")


def parse_walltime(text: str) -> int:
    """Seconds in a SLURM walltime written [D-]HH:MM:SS."""
    m = _WALLTIME.match(text.strip())
    if not m:
        raise ValueError(
            f"walltime {text!r} is not [D-]HH:MM:SS (for example 02:00:00 or 1-12:00:00)"
        )
    days, hours, minutes, seconds = (int(g or 0) for g in m.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds
