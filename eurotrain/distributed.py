"""Process-group bootstrap: who am I, how many are we, which device is mine.

Three ways in: torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT);
SLURM's alone, for ranks that srun starts directly (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID;
the first node of the allocation and a port derived from the job id); or MPI through mpi4py
(mpiexec -n N python -m eurotrain.train ...; rank 0 broadcasts its address). With none of them
the run is a single process. Each rank uses the device numbered by its local rank. Nothing
happens at import. A launch that cannot work (no GPU, no rendezvous address) is a ConfigError:
one line from the command line, not a traceback.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from eurotrain.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    source: str
    """Where rank and world size came from: "torchrun", "slurm", "mpi" or "single"."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


_MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")
_MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")


def _first_env_int(names: tuple[str, ...]) -> int | None:
    for name in names:
        value = _env_int(name)
        if value is not None:
            return value
    return None


def _under_mpi() -> bool:
    """Started by an MPI launcher (mpiexec/mpirun), not by srun speaking PMI for its own tasks.

    srun --mpi=pmi2 also sets PMI_RANK/PMI_SIZE, but then they equal SLURM_PROCID/SLURM_NTASKS
    and the SLURM path needs no MPI library; mpiexec inside an allocation starts one proxy per
    node through srun, so its ranks' SLURM_PROCID is the node's, and the two disagree.
    """
    rank, size = _first_env_int(_MPI_RANK_VARS), _first_env_int(_MPI_SIZE_VARS)
    if rank is None and size is None:
        return False
    if os.environ.get("SLURM_STEP_ID") is not None:
        return (rank, size) != (_env_int("SLURM_PROCID"), _env_int("SLURM_NTASKS"))
    return True


def _in_srun_step() -> bool:
    """Inside a task that srun started (the batch script itself is not a step of ranks)."""
    return (
        os.environ.get("SLURM_STEP_ID") is not None
        and _env_int("SLURM_PROCID") is not None
        and _env_int("SLURM_NTASKS") is not None
    )


def detect() -> tuple[int, int, int, str]:
    """(rank, local_rank, world_size, source) from the environment.

    Sources, first match wins: "torchrun" (RANK/WORLD_SIZE), "mpi" (EUROTRAIN_BOOTSTRAP=mpi,
    or an MPI launcher's variables; rank and size then come from mpi4py), "slurm" (a task of an
    srun step: SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID), else "single". EUROTRAIN_BOOTSTRAP
    (torchrun|mpi|slurm|single) forces one.
    """
    forced = os.environ.get("EUROTRAIN_BOOTSTRAP", "").strip().lower()
    if forced not in ("", "torchrun", "mpi", "slurm", "single"):
        raise ConfigError(
            f"EUROTRAIN_BOOTSTRAP={forced!r}: choose torchrun, mpi, slurm or single (or unset it "
            f"to detect the launcher)"
        )
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    if forced == "torchrun" or (not forced and rank is not None and world is not None):
        if rank is None or world is None:
            raise ConfigError("EUROTRAIN_BOOTSTRAP=torchrun but RANK/WORLD_SIZE are not set")
        return rank, _env_int("LOCAL_RANK") or 0, world, "torchrun"
    if forced == "mpi" or (not forced and _under_mpi()):
        return _detect_mpi()
    if forced == "slurm" or (not forced and _in_srun_step()):
        procid, ntasks = _env_int("SLURM_PROCID"), _env_int("SLURM_NTASKS")
        if procid is None or ntasks is None:
            raise ConfigError(
                "EUROTRAIN_BOOTSTRAP=slurm but SLURM_PROCID/SLURM_NTASKS are not set: start "
                "the ranks with srun inside an allocation"
            )
        return procid, _env_int("SLURM_LOCALID") or 0, ntasks, "slurm"
    return 0, 0, 1, "single"


def _mpi_comm():
    try:
        from mpi4py import MPI  # only this path needs an MPI library
    except ImportError as e:
        raise ConfigError(
            f"MPI bootstrap needs mpi4py and an MPI library ({e}): pip install mpi4py mpich, "
            f"or start the ranks with torchrun or srun instead"
        ) from None
    return MPI, MPI.COMM_WORLD


def _detect_mpi() -> tuple[int, int, int, str]:
    MPI, comm = _mpi_comm()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)  # ranks on this node, in world-rank order
    local_rank = local.Get_rank()
    local.Free()
    return comm.Get_rank(), local_rank, comm.Get_size(), "mpi"


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[07-09,12],login1" -> "gpu07".

    `scontrol show hostnames` does this where SLURM's commands exist; this parser covers the
    compressed forms SLURM writes (prefix[ranges]suffix) without a subprocess.
    """
    head = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?([^,]*)", nodelist.strip())
    if not head or not head.group(0):
        raise ConfigError(f"cannot read a host from SLURM_JOB_NODELIST={nodelist!r}")
    prefix, ranges, suffix = head.groups()
    if ranges is None:
        return prefix + suffix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first + (suffix or "")


PORT_BASE = 20000
"""MASTER_PORT = PORT_BASE + job id % PORT_SPAN: two jobs sharing a node rarely collide, and every
rank of one job computes the same port without talking. `eurotrain launch` renders the same
formula into its scripts from these two constants."""
PORT_SPAN = 20000


def slurm_master_port(job_id: int) -> int:
    """The port every rank of job `job_id` agrees on (the same formula as the sbatch script)."""
    return PORT_BASE + job_id % PORT_SPAN


def _rendezvous(source: str, rank: int) -> None:
    """Set MASTER_ADDR/MASTER_PORT for init_process_group when the launcher did not."""
    if source == "slurm":
        if not os.environ.get("MASTER_ADDR"):
            nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get(
                "SLURM_JOB_NODELIST", ""
            )
            os.environ["MASTER_ADDR"] = _scontrol_first_host(nodelist)
        if not os.environ.get("MASTER_PORT"):
            job_id = _env_int("SLURM_JOB_ID")
            if job_id is None:
                raise ConfigError("SLURM_JOB_ID is not set: cannot derive MASTER_PORT")
            os.environ["MASTER_PORT"] = str(slurm_master_port(job_id))
    elif source == "mpi" and not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
        _, comm = _mpi_comm()
        box = None
        if rank == 0:
            host = socket.gethostname()
            try:
                addr = socket.gethostbyname(host)
            except OSError:
                addr = host
            with socket.socket() as s:
                s.bind(("", 0))
                box = (addr, s.getsockname()[1])
        addr, port = comm.bcast(box, root=0)
        os.environ.setdefault("MASTER_ADDR", addr)
        os.environ.setdefault("MASTER_PORT", str(port))


def _scontrol_first_host(nodelist: str) -> str:
    if shutil.which("scontrol"):
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    return first_host(nodelist)


def pick_device(local_rank: int, device: str = "auto") -> torch.device:
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"train.device is {device!r} but no GPU is visible (torch.cuda.is_available() is "
            f"False): check CUDA_VISIBLE_DEVICES/ROCR_VISIBLE_DEVICES or set train.device cpu"
        )
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ConfigError(
            f"local rank {local_rank} has no GPU: only {count} visible on this node. Start at "
            f"most {count} processes per node (--nproc-per-node {count})"
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(device: str = "auto", timeout_s: float = 600.0) -> DistInfo:
    """Initialise the default process group when there is more than one rank."""
    rank, local_rank, world, source = detect()
    dev = pick_device(local_rank, device)
    if world > 1 and not dist.is_initialized():
        _rendezvous(source, rank)
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(var):
                raise ConfigError(
                    f"{var} is not set but {world} ranks were started by {source}: start through "
                    f"torchrun or srun, or set "
                    f"MASTER_ADDR/MASTER_PORT to rank 0's address and a free port"
                )
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=timeout_s),
            device_id=dev if dev.type == "cuda" else None,
        )
    return DistInfo(rank, local_rank, world, dev, source)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
