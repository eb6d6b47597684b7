"""Offline readiness: what a run on a compute node without internet needs, checked beforehand.

Most EuroHPC compute nodes (and MareNostrum 5's login nodes) reach no network outside the
machine. A run there must read everything from local paths and must never wait on a download:

- the environment: ``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE``, ``TRANSFORMERS_OFFLINE`` and
  ``WANDB_MODE=offline`` (the profiles set them, and `eurotrain launch` exports them);
- the config: the tokenizer and the data are local paths that exist (not hub names or URLs),
  wandb runs offline;
- the code: loading the tokenizer works with the network blocked for the process
  (``block_network``: name lookups and connections beyond this host fail at once, and are
  recorded), so no code path reaches out even when a variable above is missing.

The findings are (status, message, fix) triples; `eurotrain doctor` reports them.
"""

from __future__ import annotations

import errno
import glob
import ipaddress
import os
import re
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from eurotrain.clusters import ClusterProfile
    from eurotrain.config import Config

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "offline",
}
"""What a run without internet exports: no Hub look-ups, wandb writes to disk."""
_TRUE = {"1", "on", "yes", "true"}  # what huggingface_hub reads as set
_WANDB_OFFLINE = {"offline", "disabled", "dryrun"}
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class Finding(NamedTuple):
    status: str  # "PASS" | "WARN" | "FAIL"
    message: str
    fix: str = ""


def is_offline(name: str, value: str | None) -> bool:
    if value is None:
        return False
    if name == "WANDB_MODE":
        return value.lower() in _WANDB_OFFLINE
    return value.lower() in _TRUE


def check_env(profile: ClusterProfile | None, in_job: bool) -> Finding:
    """The offline variables in this process's environment, judged by what the profile says
    of the compute nodes' internet (none known: offline is the safe side)."""
    internet = None if profile is None else profile.internet_on_compute
    unset = [k for k in OFFLINE_ENV if not is_offline(k, os.environ.get(k))]
    if not unset:
        return Finding("PASS", "HF Hub, datasets, transformers and wandb set offline")
    if profile is not None and internet:
        return Finding("PASS", f"compute nodes of {profile.name} reach the internet; not "
                       f"offline: {', '.join(unset)}")  # fmt: skip
    if profile is not None and internet is False:
        where = f"{profile.name} compute nodes have no internet"
    else:
        where = "whether compute nodes reach the internet is unknown"
    status = "FAIL" if in_job and internet is False else "WARN"
    return Finding(
        status,
        f"not offline: {', '.join(unset)} ({where}; a library would try the network and wait "
        f"for its time-outs)",
        "; ".join(f"export {k}={OFFLINE_ENV[k]}" for k in unset)
        + " (scripts from `eurotrain launch` set them from the profile)",
    )


def check_paths(cfg: Config, profile: ClusterProfile | None) -> Finding:
    """Everything the run reads is a local path that exists; nothing names the Hub or a URL."""
    problems = path_problems(cfg)
    if (
        cfg.logging.wandb
        and cfg.logging.wandb_mode == "online"
        and not (profile and profile.internet_on_compute)
    ):
        problems.append("logging.wandb_mode: online, but compute nodes may have no internet")
    if problems:
        return Finding(
            "FAIL",
            "; ".join(problems),
            "copy what the run reads to the cluster's file systems and name it by path "
            "(tokenizers: `huggingface-cli download NAME --local-dir DIR` where there is "
            "internet); logging.wandb_mode: offline, then `wandb sync` from a login node",
        )
    what = "prepared sources" if cfg.data.sources else f"corpus {cfg.data.corpus}"
    return Finding("PASS", f"tokenizer {cfg.data.tokenizer}, {what}: local")


def path_problems(cfg: Config) -> list[str]:
    """What the run would read that is not a local path that exists (tokenizer, corpus,
    prepared sources, resume and init_from checkpoints), relative paths from here (the job
    runs where it is submitted): `eurotrain doctor` and `eurotrain launch` ask."""
    problems: list[str] = []
    data = cfg.data
    if not data.sources:
        if data.tokenizer != "byte":
            problems += _tokenizer_problems(data.tokenizer)
        if data.corpus != "demo":
            problems += _path_problems("data.corpus", data.corpus, glob_ok=True)
    for key, sources in (("data.sources", data.sources),
                         ("data.validation_sources", data.validation_sources)):  # fmt: skip
        for s in sources:
            problems += _path_problems(key, s.path)
            if Path(s.path).is_dir() and not (Path(s.path) / "manifest.json").is_file():
                problems.append(f"{key}: {s.path} has no manifest.json (not prepared)")
    ck = cfg.checkpoint
    if ck.init_from:
        problems += _path_problems("checkpoint.init_from", ck.init_from)
    if ck.resume not in ("auto", "none", ""):
        problems += _path_problems("checkpoint.resume", ck.resume)
    return problems


def _path_problems(key: str, text: str, glob_ok: bool = False) -> list[str]:
    if _URL.match(text):
        return [f"{key}: {text!r} is a URL; compute nodes read local files only"]
    if glob_ok and glob.has_magic(text):
        return [] if glob.glob(text, recursive=True) else [f"{key}: {text!r} matches no files"]
    if not Path(text).exists():
        return [f"{key}: {text} does not exist"]
    return []


def _tokenizer_problems(spec: str) -> list[str]:
    if _URL.match(spec):
        return [f"data.tokenizer: {spec!r} is a URL; give a local directory"]
    p = Path(spec)
    if not p.exists():
        hub = " (a Hugging Face Hub name? download it first)" if _HUB_ID.match(spec) else ""
        return [f"data.tokenizer: {spec} does not exist{hub}"]
    if p.is_dir() and not any((p / f).is_file() for f in ("tokenizer.json",
                                                          "tokenizer_config.json")):  # fmt: skip
        return [f"data.tokenizer: {spec} holds no tokenizer.json or tokenizer_config.json"]
    return []


def check_load(cfg: Config) -> Finding:
    """Load the run's tokenizer with the network blocked: a code path that would go online
    (a Hub look-up, a download) fails here at once instead of hanging on a compute node."""
    spec = cfg.data.tokenizer
    if cfg.data.sources or spec == "byte" or _tokenizer_problems(spec):
        return Finding("PASS", "nothing to load from the network (byte tokenizer or see paths)")
    from eurotrain.data.tokenizer import load_tokenizer

    tried: list[str] = []
    try:
        with network_blocked(tried):
            tok = load_tokenizer(spec)
    except Exception as e:  # the tokenizer's own error, or the block
        if tried:
            return Finding("FAIL", f"loading tokenizer {spec} tried the network ({tried[0]})",
                           "use a complete local copy of the tokenizer")  # fmt: skip
        return Finding("FAIL", f"tokenizer {spec} does not load: {e}")
    if tried:
        return Finding("FAIL", f"loading tokenizer {spec} tried the network ({tried[0]})",
                       "use a complete local copy of the tokenizer")  # fmt: skip
    return Finding("PASS", f"tokenizer {spec} loads with the network blocked "
                   f"(vocabulary {tok.vocab_size})")  # fmt: skip


# ---- blocking the network for this process -------------------------------------------------
class NetworkBlocked(OSError):
    """A name lookup or connection beyond this host, refused (as on a compute node)."""


def _loopback(host: Any) -> bool:
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


def block_network(record: Callable[[str], None] | None = None) -> Callable[[], None]:
    """Refuse, in this process, name lookups of other hosts and connections to any address but
    this host's own; each refusal is passed to `record` first. Returns the undo function."""
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex
    real_getaddrinfo = socket.getaddrinfo
    names = {"localhost", "localhost.localdomain", socket.gethostname()}
    own: set[str] = set()
    with suppress(OSError):  # this host's own addresses (gloo may use them): not "the network"
        own = {str(a[4][0]) for a in real_getaddrinfo(socket.gethostname(), None)}

    def refuse(what: str) -> None:
        if record is not None:
            record(what)
        raise NetworkBlocked(errno.ENETUNREACH, f"network blocked by eurotrain: {what}")

    def allowed_address(sock: socket.socket, address: Any) -> bool:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return True  # AF_UNIX and friends: local by construction
        host = address[0] if isinstance(address, tuple) else address
        return _loopback(host) or str(host) in own

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        if name is None or name in names or _literal(name):
            return real_getaddrinfo(host, *args, **kwargs)
        refuse(f"name lookup of {name}")

    def connect(self: socket.socket, address: Any) -> None:
        if not allowed_address(self, address):
            refuse(f"connection to {address}")
        return real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        if not allowed_address(self, address):
            refuse(f"connection to {address}")
        return real_connect_ex(self, address)

    socket.getaddrinfo = getaddrinfo  # type: ignore[assignment]
    socket.socket.connect = connect  # type: ignore[method-assign,assignment]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign,assignment]

    def undo() -> None:
        socket.getaddrinfo = real_getaddrinfo
        socket.socket.connect = real_connect  # type: ignore[method-assign]
        socket.socket.connect_ex = real_connect_ex  # type: ignore[method-assign]

    return undo


def _literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name.split("%")[0])
    except ValueError:
        return False
    return True


@contextmanager
def network_blocked(tried: list[str] | None = None) -> Iterator[None]:
    """`block_network` for the duration of a block; refusals are appended to `tried`."""
    undo = block_network(None if tried is None else tried.append)
    try:
        yield
    finally:
        undo()
