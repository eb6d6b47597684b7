"""``eurotrain doctor``: preflight checks on a login node, a compute node or a whole allocation.

Each check reports PASS, WARN or FAIL with the fix. Run alone it checks this node; run under
srun or torchrun with several ranks it also gathers every rank's findings (so one node with a
different Python or a missing variable is named), compares package versions across ranks and
measures all-reduce and neighbour bandwidth, naming slow ranks. Exit code 1 on any FAIL.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from eurotrain import offline
from eurotrain.checkpoint.storage import detect_fs
from eurotrain.clusters import ClusterProfile, load_profile

if TYPE_CHECKING:
    from eurotrain.config import Config

PACKAGES = ("numpy", "transformers", "datasets", "safetensors", "wandb", "mpi4py", "deepspeed")
MIN_FREE_GIB = 50.0
"""Less free space than this on the checkpoint file system is a warning (a 7B model's full
checkpoint with optimizer state is ~100 GB)."""


@dataclass
class Check:
    name: str
    status: str  # "PASS" | "WARN" | "FAIL"
    message: str
    fix: str = ""


def _versions() -> dict[str, str]:
    v = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "hip": str(getattr(torch.version, "hip", None)),
    }
    for pkg in PACKAGES:
        try:
            v[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            v[pkg] = "-"
    return v


def _in_job(world: int) -> bool:
    return world > 1 or bool(os.environ.get("SLURM_JOB_ID"))


# ---- checks that run on every rank ---------------------------------------------------------
def check_gpus(profile: ClusterProfile | None, world: int) -> Check:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if profile is None:
        return Check("gpus", "PASS", f"{count} GPU(s) visible")
    want = profile.gpus_per_node
    if profile.accelerator.vendor == "cpu":
        return Check("gpus", "PASS", f"CPU profile {profile.name}: {count} GPU(s), none needed")
    if count == want:
        return Check("gpus", "PASS", f"{count} x {torch.cuda.get_device_name(0)}")
    where = "this node" if _in_job(world) else "this (login?) node"
    status = "FAIL" if _in_job(world) else "WARN"
    return Check(
        "gpus",
        status,
        f"{count} GPU(s) visible on {where}, profile {profile.name} has {want}",
        "run inside the allocation (srun); check CUDA_VISIBLE_DEVICES/ROCR_VISIBLE_DEVICES and "
        "that the job asked for all GPUs (--gres/--gpus-per-node)",
    )


def check_comm(profile: ClusterProfile | None, world: int) -> Check:
    if torch.cuda.is_available():
        if getattr(torch.version, "hip", None):
            lib = f"RCCL (ROCm {torch.version.hip})"
        else:
            lib = "NCCL " + ".".join(str(x) for x in torch.cuda.nccl.version())
    else:
        lib = "gloo (no GPU)"
    if profile is None:
        return Check("comm", "PASS", lib)
    missing = [k for k in profile.comm.env if k not in os.environ]
    differ = [
        f"{k}={os.environ[k]!r} (profile: {v!r})"
        for k, v in profile.comm.env.items()
        if k in os.environ and os.environ[k] != v
    ]
    if missing:
        fix = "; ".join(f"export {k}={profile.comm.env[k]}" for k in missing)
        return Check(
            "comm",
            "FAIL" if _in_job(world) else "WARN",
            f"{lib}; {profile.comm.library} settings of {profile.name} not set: "
            f"{', '.join(missing)}",
            f"{fix} (scripts from `eurotrain launch` set them)",
        )
    if differ:
        return Check("comm", "WARN", f"{lib}; differs from the profile: {', '.join(differ)}",
                     "unset them or use the profile's values unless you know better")  # fmt: skip
    return Check("comm", "PASS", f"{lib}; {len(profile.comm.env)} profile variable(s) set")


def check_nics(profile: ClusterProfile | None) -> Check:
    net = sorted(p.name for p in Path("/sys/class/net").glob("*"))
    ib = sorted(p.name for p in Path("/sys/class/infiniband").glob("*"))
    seen = f"net: {', '.join(net) or 'none'}; infiniband: {', '.join(ib) or 'none'}"
    if profile is None or not profile.nics:
        return Check("nics", "PASS", seen)
    missing = [n for n in profile.nics if n not in net and n not in ib]
    if missing:
        return Check("nics", "WARN", f"{seen}; profile {profile.name} expects {', '.join(missing)}",
                     "on a login node this is expected; on a compute node check the fabric and "
                     "the profile's NIC names (some are UNVERIFIED)")  # fmt: skip
    return Check("nics", "PASS", seen)


def _writable(directory: Path) -> str | None:
    """None if a file can be created in `directory` (made if missing), else the reason."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".doctor-"):
            pass
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror or e}"
    return None


def check_checkpoint_dir(path: str, profile: ClusterProfile | None) -> Check:
    d = Path(path)
    reason = _writable(d)
    if reason:
        return Check("checkpoint dir", "FAIL", f"{path} is not writable ({reason})",
                     "pass a directory you can write on the shared file system "
                     "(--checkpoint-dir / checkpoint.dir)")  # fmt: skip
    free = shutil.disk_usage(d).free / 2**30
    fs = detect_fs(d)
    fstype = fs.fstype
    msg = f"{path}: {fstype} at {fs.mount_point}, {free:.0f} GiB free"
    expected = sorted({fs.type for fs in profile.filesystems}) if profile else []
    if free < MIN_FREE_GIB:
        return Check("checkpoint dir", "WARN", msg, f"free space or keep fewer checkpoints "
                     f"(< {MIN_FREE_GIB:.0f} GiB)")  # fmt: skip
    if expected and fstype not in expected and fstype.split(".")[0] not in expected:
        assert profile is not None  # expected is empty without a profile
        return Check("checkpoint dir", "WARN", f"{msg}; profile {profile.name} lists "
                     f"{', '.join(expected)}", "checkpoints belong on the parallel file system "
                     "every node sees (node-local disks vanish with the job)")  # fmt: skip
    if not expected and not fs.parallel and _in_job(1):
        return Check("checkpoint dir", "WARN", f"{msg}; not a shared parallel file system",
                     "use a directory every node sees")  # fmt: skip
    return Check("checkpoint dir", "PASS", msg)


def check_wandb_dir(path: str) -> Check:
    """Writable; whether wandb runs offline is the "offline env" check's."""
    reason = _writable(Path(path))
    if reason:
        return Check("wandb dir", "FAIL", f"{path} is not writable ({reason})",
                     "set WANDB_DIR to a writable directory")  # fmt: skip
    mode = os.environ.get("WANDB_MODE", "")
    return Check("wandb dir", "PASS", f"{path} writable, WANDB_MODE={mode or 'unset'}")


def local_checks(
    args: argparse.Namespace, profile: ClusterProfile | None, world: int
) -> list[Check]:
    checks = [
        check_gpus(profile, world),
        check_comm(profile, world),
        check_nics(profile),
        check_checkpoint_dir(args.checkpoint_dir, profile),
        check_wandb_dir(args.wandb_dir),
        Check("offline env", *offline.check_env(profile, _in_job(world))),
    ]
    if args.config:  # what the run will read, and whether reading it needs the network
        from eurotrain.config import load_config

        cfg = load_config(args.config)
        checks.append(Check("offline paths", *offline.check_paths(cfg, profile)))
        checks.append(Check("offline load", *offline.check_load(cfg)))
        if cfg.data.sources:
            checks.append(check_data(cfg))
        from eurotrain.parallel.checks import compile_setting

        if compile_setting(cfg):
            checks.append(check_compile_paths())
    return checks


def check_compile_paths() -> Check:
    """Whether torch.compile can build its C++ here, for a run that compiles on a CPU."""
    from eurotrain.parallel.ac import inductor_cpu_problem

    problem = inductor_cpu_problem()
    if problem:  # a GPU run compiles Triton kernels: only CPU runs are refused
        return Check("compile", "WARN", f"{problem}; a run on CPUs here is refused at start",
                     "GPU runs are not affected; for CPU runs, move the paths as it says")  # fmt: skip
    return Check("compile", "PASS", "the paths in Inductor's C++ command are plain")


def check_data(cfg: Config) -> Check:
    """Prepared data as the trainer's start-up finds it (sizes only: no checksum pass)."""
    from eurotrain.data.pipeline import prepared_data_problem

    problem = prepared_data_problem(cfg)
    if problem:
        return Check("data", "FAIL", problem, "restore or prepare the data again, as it says")
    n = len(cfg.data.sources) + len(cfg.data.validation_sources)
    return Check("data", "PASS", f"{n} prepared source(s): manifests, shards and tokenizer agree")


# ---- checks across ranks -------------------------------------------------------------------
def merge(per_rank: list[list[Check]], hosts: list[str]) -> list[Check]:
    """One line per check: the worst status over ranks, naming the ranks that had it."""
    order = {"PASS": 0, "WARN": 1, "FAIL": 2}
    out = []
    for i, first in enumerate(per_rank[0]):
        results = [checks[i] for checks in per_rank]
        worst = max(results, key=lambda c: order[c.status])
        if len(per_rank) > 1 and worst.status != "PASS":
            bad = [f"{r}@{hosts[r]}" for r, c in enumerate(results) if c.status == worst.status]
            worst = Check(first.name, worst.status, f"rank(s) {', '.join(bad)}: {worst.message}",
                          worst.fix)  # fmt: skip
        out.append(worst)
    return out


def check_versions(versions: list[dict[str, str]], hosts: list[str]) -> Check:
    diffs = []
    for key in versions[0]:
        values = {v[key] for v in versions}
        if len(values) > 1:
            who = ", ".join(f"{r}@{hosts[r]}={v[key]}" for r, v in enumerate(versions))
            diffs.append(f"{key}: {who}")
    v0 = versions[0]
    summary = f"python {v0['python']}, torch {v0['torch']}"
    if diffs:
        return Check("versions", "FAIL", "ranks differ: " + "; ".join(diffs),
                     "use one environment (venv on the shared FS or one container) on all nodes")  # fmt: skip
    return Check("versions", "PASS", f"{summary} identical on {len(versions)} rank(s)")


def bandwidth(device: torch.device, megabytes: float, hosts: list[str]) -> Check:
    """All-reduce bus bandwidth, then a ring of neighbour exchanges that names slow links."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    numel = max(1, int(megabytes * 2**20 / 4))
    x = torch.ones(numel, dtype=torch.float32, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(fn, iters: int = 3) -> float:
        fn()  # warm-up: connections are set up lazily
        sync()
        dist.barrier()
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        sync()
        return (time.perf_counter() - start) / iters

    t_ar = timed(lambda: dist.all_reduce(x))
    nbytes = numel * 4
    busbw = nbytes / t_ar * 2 * (world - 1) / world / 1e9
    recv = torch.empty_like(x)

    def ring() -> None:
        ops = [
            dist.P2POp(dist.isend, x, (rank + 1) % world),
            dist.P2POp(dist.irecv, recv, (rank - 1) % world),
        ]
        for req in dist.batch_isend_irecv(ops):
            req.wait()

    t_ring = timed(ring)
    link = torch.tensor([nbytes / t_ring / 1e9], dtype=torch.float64)
    links = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(links, link) if device.type == "cpu" else _gather_cpu(links, link, device)
    rates = [float(t) for t in links]
    median = sorted(rates)[world // 2]
    slow = [r for r, v in enumerate(rates) if v < 0.5 * median]
    msg = (
        f"all-reduce {megabytes:g} MB over {world} ranks: {busbw:.2f} GB/s bus bandwidth; "
        f"ring links {min(rates):.2f}..{max(rates):.2f} GB/s"
    )
    if slow:
        names = ", ".join(f"{(r - 1) % world}->{r} ({hosts[(r - 1) % world]}->{hosts[r]}: "
                          f"{rates[r]:.2f} GB/s)" for r in slow)  # fmt: skip
        return Check("bandwidth", "WARN", f"{msg}; slow links (< half the median): {names}",
                     "drain or exclude those nodes (sbatch --exclude) and tell the centre")  # fmt: skip
    return Check("bandwidth", "PASS", msg)


def _gather_cpu(out: list[torch.Tensor], value: torch.Tensor, device: torch.device) -> None:
    import torch.distributed as dist

    dev_out = [t.to(device) for t in out]
    dist.all_gather(dev_out, value.to(device))
    for o, d in zip(out, dev_out):
        o.copy_(d.cpu())


# ---- entry point ---------------------------------------------------------------------------
def run(args: argparse.Namespace) -> tuple[list[Check], int, int]:
    """All checks; returns (the merged report, world size, this rank)."""
    import torch.distributed as dist

    from eurotrain.distributed import init_distributed, shutdown

    profile = load_profile(args.cluster) if args.cluster else None
    info = init_distributed("auto")
    host = socket.gethostname()
    checks = local_checks(args, profile, info.world_size)
    try:
        if info.world_size > 1:
            gathered: list = [None] * info.world_size
            dist.all_gather_object(gathered, (host, _versions(), checks))
            hosts = [g[0] for g in gathered]
            report = [check_versions([g[1] for g in gathered], hosts)]
            report += merge([g[2] for g in gathered], hosts)
            if args.allreduce_mb > 0:
                report.append(bandwidth(info.device, args.allreduce_mb, hosts))
        else:
            report = [check_versions([_versions()], [host]), *checks]
            report.append(Check("bandwidth", "PASS", "single rank: run under srun/torchrun "
                                "with several ranks to test the network"))  # fmt: skip
    finally:
        shutdown()
    return report, info.world_size, info.rank


def format_report(report: list[Check], world: int, cluster: str | None) -> str:
    lines = [f"eurotrain doctor: {world} rank(s), cluster {cluster or '(none given)'}"]
    for c in report:
        lines.append(f"[{c.status}] {c.name}: {c.message}")
        if c.fix and c.status != "PASS":
            lines.append(f"       fix: {c.fix}")
    fails = sum(c.status == "FAIL" for c in report)
    warns = sum(c.status == "WARN" for c in report)
    lines.append(f"{fails} fail(s), {warns} warning(s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="eurotrain doctor", description=__doc__.split("\n")[0])
    ap.add_argument("--cluster", help="check against this profile (eurotrain launch --list)")
    ap.add_argument("--config", help="the training config: check that what it reads is local "
                    "and loads with the network blocked")  # fmt: skip
    ap.add_argument("--checkpoint-dir", default="checkpoints", help="where checkpoints will go")
    ap.add_argument("--wandb-dir", default=os.environ.get("WANDB_DIR", "runs"),
                    help="where wandb writes offline runs (default: $WANDB_DIR or runs)")  # fmt: skip
    ap.add_argument("--allreduce-mb", type=float, default=None,
                    help="all-reduce test size (default: 256 on GPU, 8 on CPU; 0 skips)")  # fmt: skip
    args = ap.parse_args(argv)
    if args.allreduce_mb is None:
        args.allreduce_mb = 256.0 if torch.cuda.is_available() else 8.0
    try:
        report, world, rank = run(args)
    except ValueError as e:
        print(f"eurotrain doctor: {e}", file=sys.stderr)
        return 2
    failed = any(c.status == "FAIL" for c in report)
    if rank == 0:
        print(format_report(report, world, args.cluster), flush=True)
    return 1 if failed else 0
