"""Cluster profiles: what eurotrain knows about a machine, loaded from ``NAME.yaml`` (shipped in
the package from ``launch/clusters/``, or from a directory named by ``EUROTRAIN_CLUSTERS``;
see eurotrain/resources.py).

A profile is data (one YAML file per machine, each fact with its public source in a comment);
this module gives it a typed, validated shape so a typo in a profile fails as loudly as a typo
in a training config, and answers the questions the launcher and the doctor ask of it.

Profile text ends up in job scripts, so it is checked here with the rules the launcher applies
to a user's values (``control_character``, ``sbatch_problem``); only a profile's ``env`` values
and container binds may ask the job's shell to expand variables, and then only plain ``$NAME``
or ``${NAME}`` references (``expansion_problem``): a profile can say $SCRATCH, never $(cmd).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from eurotrain import resources
from eurotrain.configtools import ConfigError, from_dict, read_yaml

# ---- text that may go into a job script -------------------------------------------------
_CONTROL_NAMES = {"\n": "a newline", "\r": "a carriage return", "\x00": "a NUL byte", "\t": "a tab"}
_SBATCH_SPECIAL = {"'": "a quote (')", '"': 'a quote (")', "\\": "a backslash", "#": "'#'"}
_VARIABLE = re.compile(r"\$(?:[A-Za-z_][A-Za-z0-9_]*|\{[A-Za-z_][A-Za-z0-9_]*\})")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def control_character(text: str) -> str | None:
    """The first C0 control character (or DEL) in `text`, described; None if there is none.
    A newline would start a new line of the script, and no value we render needs one."""
    for ch in text:
        if ord(ch) < 0x20 or ord(ch) == 0x7F:
            return _CONTROL_NAMES.get(ch, f"the control character {ch!r}")
    return None


def sbatch_problem(text: str) -> str | None:
    """Why `text` cannot be (part of) an #SBATCH value, or None. sbatch splits #SBATCH lines at
    whitespace, strips quotes, takes backslashes as escapes and '#' as the start of a comment;
    no value eurotrain writes there needs any of them, so they are refused, not quoted."""
    if text == "":
        return "it is empty"
    control = control_character(text)
    if control:
        return f"contains {control}; #SBATCH values must be one line"
    for ch in text:
        if ch.isspace():
            special = "a space" if ch == " " else f"whitespace {ch!r}"
        elif ch in _SBATCH_SPECIAL:
            special = _SBATCH_SPECIAL[ch]
        else:
            continue
        return (
            f"contains {special}, which sbatch does not take literally in an #SBATCH line "
            f"(whitespace splits it, quotes and backslashes are removed, '#' ends it)"
        )
    return None


def expansion_problem(text: str) -> str | None:
    """Why profile value `text` may not be written inside double quotes, or None: variable
    references ($NAME, ${NAME}) are its only shell syntax; no command substitution, no backquotes,
    no other $-forms."""
    control = control_character(text)
    if control:
        return f"contains {control}"
    if "`" in text:
        return "contains a backquote; profile values may only reference variables ($NAME)"
    if "$" in _VARIABLE.sub("", text):
        return "has a '$' that is not a plain $NAME or ${NAME} variable reference"
    return None


def _check(where: str, text: str, problem: Callable[[str], str | None]) -> None:
    issue = problem(text)
    if issue:
        raise ConfigError(f"{where} {text!r}: {issue}")


def _one_line(text: str) -> str | None:
    control = control_character(text)
    return f"contains {control}" if control else None


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
        _check("partition", self.partition, sbatch_problem)
        if self.qos:
            _check("qos", self.qos, sbatch_problem)
        if self.max_time:
            try:
                seconds = parse_walltime(self.max_time)
            except ConfigError as e:
                raise ConfigError(f"max_time {self.max_time!r}: {e}") from None
            if seconds == 0:
                raise ConfigError(f'max_time {self.max_time!r}: write "" for an unknown limit')
        if self.min_nodes < 1:
            raise ConfigError(f"min_nodes = {self.min_nodes} must be >= 1")
        if self.max_nodes < 0:
            raise ConfigError(f"max_nodes = {self.max_nodes} must be >= 0 (0: unknown)")
        if self.max_nodes and self.min_nodes > self.max_nodes:
            raise ConfigError(f"min_nodes = {self.min_nodes} is above max_nodes = {self.max_nodes}")

    def admits(self, nodes: int, seconds: int) -> bool:
        """Whether the limits this queue knows admit a job; an unknown limit admits anything."""
        return (
            (not self.max_time or seconds <= parse_walltime(self.max_time))
            and self.min_nodes <= nodes
            and (not self.max_nodes or nodes <= self.max_nodes)
        )


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

    def __post_init__(self) -> None:
        _check("runtime", self.runtime, _one_line)
        for i, text in enumerate(self.flags):
            _check(f"flags[{i}]", text, _one_line)
        for i, text in enumerate(self.binds):
            _check(f"binds[{i}]", text, expansion_problem)  # may say $SCRATCH
        for i, text in enumerate(self.setup):
            _check(f"setup[{i}]", text, _one_line)


@dataclass
class Comm:
    """The collective-communication library and the environment it needs on this network."""

    library: Literal["nccl", "rccl", "gloo"]
    """nccl on NVIDIA + InfiniBand, rccl (+ aws-ofi-rccl) on AMD + Slingshot, gloo on CPU."""
    env: dict[str, str] = field(default_factory=dict)
    """Variables exported before the ranks start; the doctor checks they are set."""

    def __post_init__(self) -> None:
        self.env = _checked_env(self.env)


def _checked_env(env: dict) -> dict[str, str]:
    """Variables to export: shell names, values that reference other variables at most."""
    out = {str(k): str(v) for k, v in env.items()}
    for name, value in out.items():
        if not _NAME.fullmatch(name):
            raise ConfigError(f"env {name!r}: not a shell variable name ([A-Za-z_][A-Za-z0-9_]*)")
        _check(f"env.{name}", value, expansion_problem)
    return out


@dataclass
class Links:
    """Nominal bandwidths per GPU (one direction, GB = 1e9 bytes), what `eurotrain bench comms`
    compares its bus bandwidths with; null where the profile has no sourced figure."""

    intra_node_GBps: float | None = None
    """GPU-to-GPU within a node (NVLink, Infinity Fabric), per GPU."""
    inter_node_GBps: float | None = None
    """Across nodes: the node's NIC bandwidth divided by its GPUs."""


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
    node_mtbf_hours: float = 0.0
    """Mean time between failures of one node, hours (a per-node failure rate: 1 / this); a
    job of N nodes fails every node_mtbf_hours / N hours on average. For checkpoint.interval
    auto (passed as fault.mtbf_hours); 0: unknown (the trainer then assumes Llama 3's rate)."""
    links: Links = field(default_factory=Links)
    """Nominal link bandwidths for `eurotrain bench comms`."""
    torch_index: str | None = None
    """The package index serving a torch build for this machine (pip --index-url; "pypi": the
    default index), used by `eurotrain bundle`; null: none is known to, pass --wheels."""
    torch_note: str = ""
    """Which torch build that is and what it needs of the machine (driver, plugins)."""

    def __post_init__(self) -> None:
        self.env = _checked_env(self.env)
        if self.node_mtbf_hours < 0:
            raise ConfigError(f"{self.name}: node_mtbf_hours = {self.node_mtbf_hours} must be >= 0")
        for key in ("name", "description", "cpu_bind", "torch_note"):
            _check(key, getattr(self, key), _one_line)
        if self.torch_index is not None:
            _check("torch_index", self.torch_index, _one_line)
        for i, text in enumerate(self.modules):
            _check(f"modules[{i}]", text, _one_line)
        for i, text in enumerate(self.setup):
            _check(f"setup[{i}]", text, _one_line)
        for i, text in enumerate(self.sbatch_extra):
            _check(f"sbatch_extra[{i}]", text, sbatch_problem)
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

    def queue(self, name: str | None) -> tuple[str, Queue]:
        """The queue called ``name`` (the default when None), with an error naming the others."""
        key = name or self.default_queue
        if key in self.queues:
            return key, self.queues[key]
        by_partition = [q for q, v in self.queues.items() if v.partition == key]
        hint = f" (partition {key!r} is behind queue {by_partition[0]!r})" if by_partition else ""
        raise ConfigError(
            f"unknown partition {key!r} for cluster {self.name}{hint}; --partition takes one of "
            + ", ".join(
                f"{q} (partition {v.partition}{', qos ' + v.qos if v.qos else ''})"
                for q, v in self.queues.items()
            )
        )


def known_clusters() -> list[str]:
    return list(resources.profiles())


def load_profile(name: str) -> ClusterProfile:
    """Load and validate the profile NAME; unknown names list the known ones."""
    found = resources.profiles().get(name)
    if found is None:
        known = known_clusters()
        near = difflib.get_close_matches(name, known, n=1, cutoff=0.4)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise ConfigError(
            f"unknown cluster {name!r}.{hint} Known clusters: {', '.join(known) or 'none'} "
            f"(profiles in {resources.searched()}; for a new machine add NAME.yaml to a "
            f"directory named by {resources.FROM_ENV})"
        )
    path = found.path
    data = read_yaml(path)
    try:
        profile = from_dict(ClusterProfile, data)
    except ConfigError as e:
        raise ConfigError(f"cluster profile {path}: {e}") from None
    if profile.name != name:
        raise ConfigError(f"cluster profile {path} says name: {profile.name!r}; expected {name!r}")
    return profile


def profile_listing() -> str:
    """One line per profile: name, description and where it comes from (`eurotrain launch
    --list`); a profile that does not load says why instead of its description."""
    found = resources.profiles()
    width = max((len(n) for n in found), default=0)
    lines = [f"cluster profiles (searched in order: {resources.searched()}):"]
    for name, where in found.items():
        try:
            about = load_profile(name).description
        except ConfigError as e:
            about = f"INVALID: {e}"
        origin = f"{where.source}: {where.path}"
        if where.overrides:
            origin += "; overrides the packaged profile"
        lines.append(f"{name:<{width}}  {about}  [{origin}]")
    return "\n".join(lines)


_WALLTIME = re.compile(r"(?:(\d+)-)?(\d{1,3}):([0-5]\d):([0-5]\d)")


def parse_walltime(text: str) -> int:
    """Seconds in a SLURM walltime written [D-]HH:MM:SS (nothing around it: the text goes into
    an #SBATCH line as it is)."""
    m = _WALLTIME.fullmatch(text)
    if not m:
        raise ConfigError(
            f"walltime {text!r} is not [D-]HH:MM:SS (for example 02:00:00 or 1-12:00:00)"
        )
    days, hours, minutes, seconds = (int(g or 0) for g in m.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds
