"""One command for a GPU: the kernel benchmark, then the 1B preset's throughput, MFU and peak
memory at bf16 and FP8, each with and without torch.compile; one dated section into RESULTS.md.

    bash benchmarks/gpu_suite.sh                      # on one GPU (H100/H200/GH200 for FP8)
    bash benchmarks/gpu_suite.sh --steps 40 -- --train.micro_batch_size 4   # extra overrides
    bash benchmarks/gpu_suite.sh --cpu-smoke --results /tmp/r.md   # checks it end to end, no GPU

Each training run is ``python -m eurotrain.train configs/llama3.2-1b.yaml`` in its own process
on the demo corpus with the byte tokenizer (the model keeps its 128k vocabulary; only the data
differs from a real run), ``--steps`` steps of ``--global-batch`` sequences of ``--seq-len``
tokens; the figures are medians over the logged steps after the first ``--warmup``. MFU is
against the device's bf16 peak (metrics.py), for FP8 runs too. A run that fails (out of memory,
no FP8 on this GPU) is recorded with its last error line and the suite goes on; the exit code
is then 1.

``--cpu-smoke`` runs the same stages on configs/tiny.yaml on the CPU (kernel benchmark through
Triton's interpreter, FP8 through torchao's emulation, compile variants skipped: inductor on a
CPU takes minutes) and titles the section as a smoke run: it checks the suite, it measures
nothing. Its training runs take the GPU rows' path: the Triton kernels (interpreted) under bf16
autocast, with tied embeddings as the 1B preset; one layer and a few short steps, because the
interpreter runs each kernel program on the host (about a minute in all).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = [
    ("bf16", [], False),
    ("bf16 + compile", ["--parallel.compile", "true"], True),
    ("fp8 tensorwise", ["--float8.enabled", "true"], False),
    ("fp8 tensorwise + compile", ["--float8.enabled", "true", "--parallel.compile", "true"], True),
]

SMOKE_MODEL = [
    "--model.kernels", "triton", "--train.mixed_precision", "bf16",
    "--model.tie_embeddings", "true", "--model.num_layers", "1",
]  # fmt: skip
"""What makes the CPU smoke run's training take the GPU rows' path (see the docstring)."""


def _run(cmd: list[str], env: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def _last_error(done: subprocess.CompletedProcess) -> str:
    """The last line of stderr (a traceback's exception, or the CLI's one-line error); of
    stdout only where stderr is empty."""
    for stream in (done.stderr, done.stdout):
        lines = [ln.strip() for ln in (stream or "").splitlines() if ln.strip()]
        if lines:
            return lines[-1][:200].replace("|", "/")
    return f"exit code {done.returncode}"


def train_variant(
    args: argparse.Namespace, name: str, extra: list[str], out: Path, env: dict[str, str]
) -> dict[str, str]:
    """One training run; its median tokens/s per device, MFU, peak memory and step time."""
    run = name.replace(" ", "").replace("+", "-")
    cmd = [
        sys.executable, "-m", "eurotrain.train", args.config,
        "--data.corpus", "demo", "--data.tokenizer", "byte",
        "--data.seq_len", str(args.seq_len),
        "--train.steps", str(args.steps),
        "--train.global_batch_size", str(args.global_batch),
        "--train.micro_batch_size", str(args.micro_batch),
        "--train.output_dir", str(out), "--train.run_name", run,
        "--logging.progress", "lines", "--logging.log_interval", "1",
        "--checkpoint.interval", "0",
        *extra, *args.overrides,
    ]  # fmt: skip
    if args.cpu_smoke:
        cmd += ["--train.device", "cpu", *SMOKE_MODEL]
        if "--float8.enabled" in extra:
            cmd += ["--float8.emulate", "true", "--float8.min_features", "16"]
    done = _run(cmd, env, args.timeout)
    if done.returncode != 0:
        return {"error": _last_error(done)}
    records = [json.loads(line) for line in (out / run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "tokens_per_s_per_device" in r and r["step"] > args.warmup]

    def median(key: str, fmt: str) -> str:
        values = [r[key] for r in steps if key in r]
        return format(statistics.median(values), fmt) if values else "n/a"

    peak = max((r["memory_gib"] for r in steps if "memory_gib" in r), default=None)
    return {
        "tokens_per_s_per_device": median("tokens_per_s_per_device", ",.0f"),
        "mfu": median("mfu", ".1%"),
        "memory_gib": f"{peak:.1f}" if peak is not None else "n/a",
        "step_time_s": median("step_time_s", ".3f"),
    }


def kernel_table(args: argparse.Namespace, out: Path, env: dict[str, str]) -> str:
    cmd = [sys.executable, "-m", "benchmarks.kernels", "--out-dir", str(out)]
    cmd += ["--cpu-smoke"] if args.cpu_smoke else ["--tokens", "8192"]
    done = _run(cmd, env, args.timeout)
    if done.returncode != 0:
        return f"kernel benchmark failed: {_last_error(done)}"
    table = [ln for ln in done.stdout.splitlines() if ln.strip() and not ln.startswith("wrote ")]
    return "```text\n" + "\n".join(table) + "\n```"


def device_name(cpu_smoke: bool) -> str:
    if cpu_smoke:
        return f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    import torch

    if not torch.cuda.is_available():
        return ""
    return torch.cuda.get_device_name(0)


def section(args: argparse.Namespace, device: str, kernels: str, rows: list) -> str:
    import torch

    try:
        from importlib.metadata import version

        torchao = version("torchao")
    except Exception:
        torchao = "not installed"
    kind = "CPU smoke run (checks the suite; not a measurement)" if args.cpu_smoke else device
    command = " ".join(["bash benchmarks/gpu_suite.sh", *sys.argv[1:]])
    lines = [
        f"## GPU suite {date.today()}: {kind}",
        "",
        f"Device: {device}; torch {torch.__version__}, torchao {torchao}. Command: `{command}`.",
        f"Training: `{args.config}` on the demo corpus (byte tokenizer), {args.steps} steps of "
        f"{args.global_batch} x {args.seq_len} tokens (micro-batch {args.micro_batch}), "
        f"medians over the steps after {args.warmup}; MFU against the bf16 peak."
        + (f" Smoke run: `{' '.join(SMOKE_MODEL)}`." if args.cpu_smoke else ""),
        "",
        "| run | tokens/s per device | MFU | peak memory (GiB) | step time (s) |",
        "|---|---|---|---|---|",
    ]
    for name, result in rows:
        if "skipped" in result or "error" in result:
            note = result.get("skipped") or f"failed: {result['error']}"
            lines.append(f"| {name} | {note} | | | |")
        else:
            lines.append(
                f"| {name} | {result['tokens_per_s_per_device']} | {result['mfu']} | "
                f"{result['memory_gib']} | {result['step_time_s']} |"
            )
    lines += ["", "Kernels (`python -m benchmarks.kernels`):", "", kernels, ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU")
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    ap.add_argument("--config", default=None, help="default: llama3.2-1b (tiny with --cpu-smoke)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None, help="steps left out of the medians")
    ap.add_argument("--global-batch", type=int, default=None)
    ap.add_argument("--micro-batch", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per stage")
    args = ap.parse_args(argv)
    args.overrides = overrides
    smoke = {"config": "configs/tiny.yaml", "steps": 3, "warmup": 1, "global_batch": 2,
             "micro_batch": 2, "seq_len": 32}  # fmt: skip
    gpu = {"config": "configs/llama3.2-1b.yaml", "steps": 30, "warmup": 10, "global_batch": 8,
           "micro_batch": 2, "seq_len": 4096}  # fmt: skip
    for key, value in (smoke if args.cpu_smoke else gpu).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    device = device_name(args.cpu_smoke)
    if not device:
        print("gpu_suite: no GPU here; run it on a GPU node, or check it with --cpu-smoke")
        return 2
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    if args.cpu_smoke:
        env.update(TRITON_INTERPRET="1", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    with tempfile.TemporaryDirectory(prefix="eurotrain-gpu-suite-") as tmp:
        out = Path(tmp)
        print("gpu_suite: kernel benchmark", flush=True)
        kernels = kernel_table(args, out / "kernels", env)
        rows = []
        for name, extra, compiles in VARIANTS:
            if compiles and args.cpu_smoke:
                rows.append((name, {"skipped": "skipped (cpu smoke: inductor on a CPU)"}))
                continue
            print(f"gpu_suite: {name}", flush=True)
            rows.append((name, train_variant(args, name, extra, out, env)))
    text = section(args, device, kernels, rows)
    with open(args.results, "a") as f:
        f.write("\n" + text)
    print(text)
    print(f"gpu_suite: section appended to {args.results}")
    return (
        1
        if any("error" in r for _, r in rows) or kernels.startswith("kernel benchmark failed")
        else 0
    )


if __name__ == "__main__":
    sys.exit(main())
