"""Checkpointer: periodic (async) saves with an atomic commit, retention, and resume.

A save takes the state's references on the training thread and stages it to host memory on a
background thread (staging.py), which the trainer waits for only before the next optimizer step.
One worker thread per rank then writes and commits it:

  1. dcp.save into step-N.tmp/ over a dedicated gloo group; this rank's data file is written by
     its writer process (writer.py, byte_writer.py) straight from the staging buffer, hashed
     with SHA-256 as it is written and fsynced (no second read);
  2. rank 0 also writes config.yaml; every rank fsyncs the directory;
  3. the checksums are gathered on rank 0, which writes COMMITTED.json, fsyncs, renames
     step-N.tmp -> step-N, fsyncs the parent, then applies retention; rank 0 broadcasts the
     outcome so every rank agrees whether step N is committed.

Why not dcp.async_save: it starts a fresh thread per call, so two saves in flight would issue
collectives on one process group from two threads in an order ranks need not agree on; and the
commit needs collectives of its own after the write. One worker thread per rank runs saves and
commits strictly in order on a process group nobody else uses (a separate gloo group is also
what makes this work when the training group is NCCL). The bytes themselves, the hashing and
the system calls run in the writer process, off the training process's GIL.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata

from eurotrain.checkpoint import directory
from eurotrain.checkpoint.config import CheckpointConfig
from eurotrain.checkpoint.directory import CheckpointError
from eurotrain.checkpoint.resume import Candidate, candidates, checkpoint_root, source_problem
from eurotrain.checkpoint.safe_metadata import METADATA
from eurotrain.checkpoint.safe_reader import load_state
from eurotrain.checkpoint.staging import Staged, Stager
from eurotrain.checkpoint.state import apply_state, build_state, load_target
from eurotrain.checkpoint.storage import (
    DIGEST,
    DIR_MODE,
    FILE_MODE,
    checksum,
    detect_fs,
    digest,
    fsync_path,
    lustre_setstripe,
    make_dir,
    write_durable,
)
from eurotrain.checkpoint.verify import verify_checkpoint
from eurotrain.checkpoint.writer import (
    ENOSPC_HOOK,
    KILL_HOOK,
    CachingPlanner,
    HashingWriter,
    ProcessSink,
    Sink,
    make_sink,
)
from eurotrain.state import Stateful


@dataclass(frozen=True)
class Resumed:
    """What a resume (or init_from) loaded."""

    path: Path
    step: int
    weights_only: bool
    marker: dict[str, Any]

    def describe(self) -> str:
        what = "model weights from" if self.weights_only else "resumed from"
        return (
            f"checkpoint: {what} {self.path} (step {self.step}, saved by "
            f"{self.marker['world_size']} ranks {self.marker.get('layout')})"
        )


__all__ = ["ENOSPC_HOOK", "KILL_HOOK", "Checkpointer", "Resumed"]


class Checkpointer:
    """One per rank; every rank must create it (it creates a process group) and call
    resume/save/close at the same points. It saves and loads the parts it is given
    (eurotrain/state.py): it never reaches into the trainer."""

    def __init__(
        self,
        cfg: CheckpointConfig,
        root: Path,
        rank: int,
        world_size: int,
        *,
        cuda: bool = False,
        log: Callable[[str], None] = print,
        timeout_s: float = 600.0,
    ) -> None:
        """``timeout_s``: how long the checkpoint group's collectives wait for a silent rank
        (fault.collective_timeout_s)."""
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.root = root
        self._log = log
        self.last_saved_step = -1
        self._inflight: deque[Future] = deque()
        self._committed: deque[tuple[int, Path]] = deque()
        self._cleanup: deque[Future] = deque()  # retention after each commit (rank 0)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eurotrain-ckpt")
        self._cuda = cuda
        self._staging: Staged | None = None
        # The writer (a process, or this process) and its staging buffers, from the first save.
        self._sink: Sink | None = None
        self._stager: Stager | None = None
        # A group of its own, used only from the worker thread (and for loading, when idle).
        self.pg = None
        if self.world_size > 1:
            self.pg = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        if self.rank == 0 and (cfg.interval != 0 or cfg.resume == "auto"):
            make_dir(self.root)
            self._describe_fs()

    def _describe_fs(self) -> None:
        info = detect_fs(self.root)
        extra = ""
        if info.fstype == "lustre":
            extra = ", " + lustre_setstripe(
                self.root, self.cfg.lustre_stripe_count, self.cfg.lustre_stripe_size
            )
        self._log(f"checkpoints: {self.root} on {info.describe()}{extra}")

    # ---- saving --------------------------------------------------------------------------
    def save(
        self, step: int, parts: Mapping[str, Stateful], info: dict[str, Any], sync: bool = False
    ) -> None:
        """Save the parts' state as step ``step``; async unless sync (then committed on
        return). ``info``: tokens_seen, layout (dict) and config_yaml for the commit marker.
        Raises the error of an earlier async save that failed."""
        if step == self.last_saved_step:
            return
        while len(self._inflight) >= (1 if sync else self.cfg.max_in_flight):
            self._inflight.popleft().result()
        if self._sink is None or self._stager is None:
            self._sink = make_sink(self.cfg.writer)
            self._stager = Stager(
                shared=isinstance(self._sink, ProcessSink),
                cuda=self._cuda,
                max_buffers=self.cfg.max_in_flight,
                on_new_buffer=self._sink.add_buffer,
                on_drop_buffer=self._sink.drop_buffer,
            )
        start = time.perf_counter()
        staged = self._stager.stage(build_state(parts, self.rank))
        self._staging = staged
        marker_info = {
            "step": step,
            "tokens_seen": info["tokens_seen"],
            "kind": "full",
            "layout": info["layout"],
            "config_yaml": info["config_yaml"],
            "config_hash": info.get("config_hash", ""),
            "stage_start": start,
            "direct": self.cfg.direct_io == "always" or (self.cfg.direct_io == "sync" and sync),
        }
        fut = self._executor.submit(self._write_and_commit, staged, marker_info)
        self.last_saved_step = step
        if sync:
            self.wait_staged()
            fut.result()
        else:
            self._inflight.append(fut)

    def wait_staged(self) -> bool:
        """Block until the last save's state is copied to host memory: call it before anything
        changes the saved tensors (the trainer: before the next optimizer step). Whether a save
        was staging."""
        if self._staging is None:
            return False
        staging, self._staging = self._staging, None
        staging.wait()
        return True

    def committed(self) -> list[tuple[int, Path]]:
        """(step, path) of the saves committed since the last call, in order (never blocks)."""
        while self._inflight and self._inflight[0].done():
            self._inflight.popleft().result()
        while self._cleanup and self._cleanup[0].done():
            self._cleanup.popleft().result()
        out = list(self._committed)
        self._committed.clear()
        return out

    def wait(self) -> None:
        """Block until every save in flight is committed (raising the first failure) and the
        retention that follows each commit has run."""
        while self._inflight:
            self._inflight.popleft().result()
        while self._cleanup:
            self._cleanup.popleft().result()

    def close(self) -> None:
        """Wait for every save in flight, then release the worker and the process group."""
        try:
            self.wait()
        finally:
            self._executor.shutdown(wait=True)
            self._staging = None
            if self._stager is not None:
                self._stager.close()
                self._stager = None
            if self._sink is not None:
                self._sink.close()
                self._sink = None
            if self.pg is not None:
                dist.destroy_process_group(self.pg)
                self.pg = None

    def _write_and_commit(self, staged: Staged, info: dict[str, Any]) -> Path:
        step = info["step"]
        tmp = directory.step_dir(self.root, step, tmp=True)
        final = directory.step_dir(self.root, step)
        start = time.perf_counter()
        try:
            staged.wait()
            info["stage_s"] = time.perf_counter() - info["stage_start"]
            if self.rank == 0:
                for stale in (tmp, final):  # a torn or superseded save of this very step
                    if stale.exists():
                        directory.remove_checkpoint(stale)
                make_dir(tmp)
            self._barrier()
            assert self._sink is not None and staged.buffer is not None
            writer = HashingWriter(
                tmp, self._sink, [staged.buffer], step, self.rank, direct=info["direct"]
            )
            dcp.save(
                staged.state,
                storage_writer=writer,
                planner=CachingPlanner(),
                process_group=self.pg,
                no_dist=self.pg is None,
            )
            files = self._seal_local_files(tmp, info, writer.files)
            info["io"] = writer.io
            self._commit(tmp, final, files, info, time.perf_counter() - start)
            self._committed.append((step, final))
        except (Exception, CheckpointException) as e:  # the latter is a BaseException
            # Raised where the save is awaited: at once (sync), or at the next step's poll of
            # committed saves (async); the command line prints it once, on rank 0.
            error = save_error(step, tmp, e)
            if self.rank == 0:
                directory.remove_checkpoint(tmp)  # free the space; the last good one stays
            raise error from e
        finally:
            staged.release()
        return final

    def _barrier(self) -> None:
        if self.pg is not None:
            dist.barrier(group=self.pg)

    def _seal_local_files(
        self, tmp: Path, info: dict[str, Any], written: dict[str, Any]
    ) -> dict[str, Any]:
        """This rank's files for the marker: its data file (fsynced and hashed as it was
        written), and on rank 0 config.yaml and DCP's small .metadata; the directory fsynced."""
        files = dict(written)
        if self.rank == 0:
            config = info["config_yaml"].encode()
            write_durable(tmp / "config.yaml", config)
            files["config.yaml"] = {"size": len(config), DIGEST: digest(config)}
            meta = tmp / METADATA
            os.chmod(meta, FILE_MODE)
            fsync_path(meta)  # DCP fsyncs it too; cheap, and independent of its options
            files[METADATA] = {"size": meta.stat().st_size, DIGEST: checksum(meta)}
        fsync_path(tmp)
        return files

    def _commit(
        self, tmp: Path, final: Path, files: dict[str, Any], info: dict[str, Any], write_s: float
    ) -> None:
        mine = (files, info["io"])
        gathered: list[Any] = [mine]
        if self.pg is not None:
            gathered = [None] * self.world_size if self.rank == 0 else []
            dist.gather_object(mine, gathered if self.rank == 0 else None, dst=0, group=self.pg)
        outcome = [""]
        if self.rank == 0:
            try:
                all_files = {k: v for part, _ in gathered for k, v in part.items()}
                io = _io_summary([how for _, how in gathered])
                marker = directory.make_marker(info, self.world_size, all_files, write_s)
                write_commit(tmp, final, marker)
                size = sum(f["size"] for f in all_files.values()) / 2**20
                self._log(
                    f"checkpoint step {info['step']}: committed {final} ({size:.1f} MiB, "
                    f"stage {info['stage_s']:.2f}s, write+commit {write_s:.2f}s, {io})"
                )
                # Deleting older checkpoints costs about what truncating their files does (0.2 s
                # per 0.4 GB on ext4, more on parallel file systems): it runs after this save
                # has returned, as the worker's next task (so before any later save writes),
                # awaited by wait(). A failure there no longer reads as a failed commit.
                self._cleanup.append(self._executor.submit(self._retention, info["step"]))
            except Exception as e:
                outcome[0] = f"{type(e).__name__}: {e}"
        if self.pg is not None:
            dist.broadcast_object_list(outcome, src=0, group=self.pg)
        if outcome[0]:
            raise CheckpointError(f"commit of {tmp} failed on rank 0: {outcome[0]}")

    def _retention(self, newest: int) -> None:
        """Rank 0, after the commit of ``newest``: the retention policy (directory.py). A
        failure is logged, not raised: the save it follows is committed, and the next save
        tries again."""
        try:
            removed = directory.apply_retention(
                self.root, newest, self.cfg.keep_last, self.cfg.keep_every
            )
        except OSError as e:
            self._log(
                f"checkpoint: retention after step {newest} failed, old checkpoints kept: {e}"
            )
            return
        if removed:
            self._log(f"checkpoint: removed {', '.join(p.name for p in removed)} (retention)")

    # ---- loading -------------------------------------------------------------------------
    def find_resume(self) -> tuple[list[Candidate], list[str]]:
        """(checkpoints to try, newest first, per checkpoint.resume and init_from; notes on
        never-committed directories passed over): listed by rank 0 and broadcast, so every
        rank tries the same ones in the same order."""
        box: list[Any] = [([], [])]
        if self.rank == 0:
            try:
                box = [candidates(self.cfg, self.root)]
            except OSError as e:  # e.g. no permission to list it: every rank must hear
                box = [f"cannot list checkpoints in {self.root}: {e}"]
        if self.pg is not None:
            dist.broadcast_object_list(box, src=0, group=self.pg)
        if isinstance(box[0], str):
            raise CheckpointError(box[0])
        return box[0]

    def resume(self, parts: Mapping[str, Stateful]) -> Resumed | None:
        """Load the checkpoint that checkpoint.resume / init_from name into the parts (all of
        them, or the model's weights only); None when there is nothing to load."""
        chosen = self._choose()
        if chosen is None:
            return None
        return self._load(parts, *chosen)

    def load(self, path: Path, parts: Mapping[str, Stateful]) -> Resumed:
        """Load the committed checkpoint ``path`` into all the parts (a rollback mid-run):
        verified first on every rank; a problem is an error."""
        self.wait()
        problem, marker, metadata = self._verify_everywhere(path)
        if problem:
            raise CheckpointError(problem)
        assert marker is not None and metadata is not None
        return self._load(parts, path, False, marker, metadata)

    def _load(
        self,
        parts: Mapping[str, Stateful],
        path: Path,
        weights_only: bool,
        marker: dict[str, Any],
        metadata: Metadata,
    ) -> Resumed:
        if marker.get("kind") == "weights":
            weights_only = True
        keys = {"model"} if weights_only else {"model", "optim"}
        state = load_target(parts, self.rank, marker["world_size"], keys)
        strict = tuple(f"{k}." for k in sorted(keys))
        load_state(state, path, metadata, strict, self.pg)
        self._apply_everywhere(parts, state, path)
        if not weights_only:
            self.last_saved_step = int(marker["step"])
        return Resumed(path, int(marker["step"]), weights_only, marker)

    def _choose(self) -> tuple[Path, bool, dict[str, Any], Metadata] | None:
        """The first candidate every rank verified, with its marker and metadata. A damaged
        checkpoint found by resume auto is skipped with a warning; one named in the config,
        or every committed one being damaged, is an error."""
        tried, notes = self.find_resume()
        for note in notes:
            self._log(note)
        skipped: list[str] = []
        for cand in tried:
            path = Path(cand.path)
            problem, marker, metadata = cand.problem, None, None
            if not problem:
                problem, marker, metadata = self._verify_everywhere(path)
            if not problem:
                assert marker is not None and metadata is not None
                return path, cand.weights_only, marker, metadata
            if cand.source != "auto":
                raise CheckpointError(problem)
            skipped.append(f"{path.name}: {problem}")
            self._log(f"warning: checkpoint {path} skipped, damaged: {problem}")
        if skipped:
            raise CheckpointError(
                f"no intact checkpoint in {self.root} ({'; '.join(skipped)}); resume one "
                f"explicitly (checkpoint.resume PATH) or start afresh (checkpoint.resume none)"
            )
        return None

    def _apply_everywhere(
        self, parts: Mapping[str, Stateful], state: dict[str, Any], path: Path
    ) -> None:
        """apply_state on every rank; loaded values that do not fit (the train JSON, an RNG
        state: checked data, but still the checkpoint's) raise the same error everywhere."""
        problem = ""
        try:
            apply_state(parts, state, self.rank)
        except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
            problem = f"{path}: rank {self.rank} cannot use its state ({type(e).__name__}: {e})"
        if self.pg is not None:
            problems: list[Any] = [None] * self.world_size
            dist.all_gather_object(problems, problem, group=self.pg)
            problem = next((p for p in problems if p), "")
        if problem:
            raise CheckpointError(problem.splitlines()[0])

    def _verify_everywhere(self, path: Path) -> tuple[str, dict[str, Any] | None, Any]:
        """(problem or "", marker, metadata): every rank verifies its share; the verdicts are
        gathered so that all ranks reach the same decision (the first rank's problem wins)."""
        problem = ""
        marker: dict[str, Any] | None = None
        metadata: Metadata | None = None
        try:
            marker, metadata = verify_checkpoint(path, self.cfg.verify, self.rank, self.world_size)
        except (CheckpointError, OSError) as e:
            problem = str(e)
        if self.pg is not None:
            problems: list[Any] = [None] * self.world_size
            dist.all_gather_object(problems, problem, group=self.pg)
            problem = next((p for p in problems if p), "")
        return problem, marker, metadata


def check_sources(cfg: CheckpointConfig, run_dir: Path, world_size: int) -> None:
    """Raise on every rank when a checkpoint the config names (resume PATH, init_from) does
    not exist or is not one; cheap, so the trainer calls it before building the model. Rank
    0 looks and broadcasts, so ranks never disagree."""
    box = [""]
    if world_size == 1 or dist.get_rank() == 0:
        try:
            box = [source_problem(cfg, checkpoint_root(cfg, run_dir))]
        except OSError as e:  # e.g. a directory on the way is not readable
            box = [f"checkpoint paths of this config cannot be checked: {e}"]
    if world_size > 1:
        dist.broadcast_object_list(box, src=0)
    if box[0]:
        raise CheckpointError(box[0])


def _io_summary(hows: list[str]) -> str:
    """How the ranks wrote their data files, for the commit's log line: one way for all, or
    each way with the ranks that took it (a rank whose file system refused O_DIRECT)."""
    if len(set(hows)) == 1:
        return f"io: {hows[0]}"
    ranks: dict[str, list[int]] = {}
    for rank, how in enumerate(hows):
        ranks.setdefault(how, []).append(rank)
    return "io: " + "; ".join(f"{how} on ranks {r}" for how, r in ranks.items())


def save_error(step: int, tmp: Path, e: BaseException) -> CheckpointError:
    """A clear error for a failed save. A full disk often surfaces from torch.save as
    'unexpected pos', not as ENOSPC, so the free space is checked and reported."""
    if isinstance(e, CheckpointError):
        return e
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    cause = f"{type(e).__name__}: {lines[-1].strip() if lines else ''}"
    message = f"checkpoint step {step} could not be written to {tmp}: {cause}"
    try:
        fs = os.statvfs(tmp.parent)
        free, total = fs.f_bavail * fs.f_frsize, fs.f_blocks * fs.f_frsize
        message += f" ({free / 2**20:.1f} MiB free of {total / 2**20:.1f} MiB)"
        if "No space left" in str(e) or free < 0.02 * total:
            message += (
                ". No space left on device: free space (checkpoint.keep_last smaller?) or "
                "move checkpoint.dir; the last committed checkpoint is kept"
            )
    except OSError:
        pass
    return CheckpointError(message)


def write_commit(tmp: Path, final: Path, marker: dict[str, Any]) -> None:
    """The commit point: marker into the .tmp directory, durable, then the atomic rename."""
    import json

    write_durable(tmp / directory.MARKER, json.dumps(marker, indent=1).encode())
    os.chmod(tmp, DIR_MODE)
    fsync_path(tmp)
    os.replace(tmp, final)
    fsync_path(final.parent)
