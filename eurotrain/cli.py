"""``eurotrain`` command line: one subcommand per job, each implemented in its own module.

A subcommand is registered as (module, function, help); the module is imported only when the
subcommand runs, so ``eurotrain --help`` stays fast and a missing optional dependency of one
command never breaks another.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": (
        "eurotrain.train",
        "main",
        "train from a YAML config: eurotrain train CONFIG [--a.b v]",
    ),
    "data": ("eurotrain.data.prepare", "main", "tokenize once into shards: eurotrain data prepare"),
    "convert": (
        "eurotrain.checkpoint.convert",
        "main",
        "HF <-> eurotrain checkpoints: eurotrain convert {hf-to-eurotrain|eurotrain-to-hf} IN OUT",
    ),
    "launch": ("eurotrain.launch", "main", "render/submit an sbatch job for a EuroHPC machine"),
    "doctor": ("eurotrain.doctor", "main", "preflight checks of a node/allocation before a run"),
    "bench": (
        "eurotrain.bench.cli",
        "main",
        "measure an allocation: eurotrain bench {comms|train|report}",
    ),
    "status": ("eurotrain.status", "main", "steps, jobs, last checkpoint, goodput of a run dir"),
    "plan": ("eurotrain.plan.cli", "main", "layouts that fit, speed, days and node-hours of a run"),
    "bundle": ("eurotrain.bundle", "main", "wheels + install.sh for a cluster without internet"),
}


def usage() -> str:
    lines = ["usage: eurotrain COMMAND [ARGS...]", "", "commands:"]
    width = max(len(c) for c in COMMANDS)
    lines += [f"  {name:<{width}}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "Run 'eurotrain COMMAND --help' for a command's own options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        near = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f" Did you mean '{near[0]}'?" if near else ""
        print(f"eurotrain: unknown command {name!r}.{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    from eurotrain.errors import run_command

    command = getattr(importlib.import_module(module), func)
    return run_command(f"eurotrain {name}", lambda: int(command(rest) or 0))


if __name__ == "__main__":
    sys.exit(main())
