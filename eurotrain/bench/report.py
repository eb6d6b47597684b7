"""``eurotrain bench report DIR [DIR ...]``: a Markdown report and PNG plots of bench results.

One directory: its tables, and plots of throughput per GPU against nodes (with the ideal line),
scaling efficiency, MFU and bus bandwidth against message size. Several directories: the same
plots with one line per directory and a side-by-side table (before/after a change, two clusters).
Records are checked by ``read_results``; a measurement a record lacks shows as "-".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from eurotrain.bench.results import cell, read_results
from eurotrain.errors import ConfigError

_OPS_SHOWN = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv")


def _label(path: Path, res: dict[str, Any]) -> str:
    cluster = res.get("cluster") or res.get("host") or "?"
    return f"{path.name} ({cluster})"


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ConfigError(
            "the report's plots need matplotlib: pip install matplotlib (or eurotrain[bench])"
        ) from None

    matplotlib.use("Agg")  # files only; no display on a login node
    import matplotlib.pyplot as plt

    return plt


def _plot_train(runs: list[tuple[str, dict]], out: Path) -> list[str]:
    plt = _pyplot()
    made: list[str] = []
    with_train = [(name, res) for name, res in runs if res["train"]]
    if not with_train:
        return made
    panels = (
        ("tokens_per_s_per_gpu", "tokens/s per GPU", "throughput.png"),
        ("scaling_efficiency", "scaling efficiency", "efficiency.png"),
        ("mfu", "MFU", "mfu.png"),
    )
    for key, title, file in panels:
        fig, ax = plt.subplots(figsize=(6, 4))
        plotted = False
        for name, res in with_train:
            rows = [r for r in res["train"] if r.get(key) is not None]
            if not rows:
                continue
            nodes = [r["nodes"] for r in rows]
            ax.plot(nodes, [r[key] for r in rows], marker="o", label=name)
            plotted = True
            if key == "tokens_per_s_per_gpu":  # perfect scaling keeps per-GPU throughput
                ax.plot(nodes, [rows[0][key]] * len(nodes), ls="--", color="grey", lw=1)
            if key == "scaling_efficiency":
                ax.axhline(1.0, ls="--", color="grey", lw=1)
        if not plotted:
            plt.close(fig)
            continue
        ax.set_xlabel("nodes")
        ax.set_ylabel(title)
        ax.set_xscale("log", base=2)
        ticks = sorted({r["nodes"] for _, res in with_train for r in res["train"]})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_ylim(bottom=0)  # ratios read honestly from zero
        ax.set_title(f"{title} vs nodes (dashed: ideal)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / file, dpi=120)
        plt.close(fig)
        made.append(file)
    return made


def _plot_comms(runs: list[tuple[str, dict]], out: Path) -> list[str]:
    plt = _pyplot()
    with_comms = [(name, res) for name, res in runs if res["comms"]]
    if not with_comms:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, scope in zip(axes, ("intra", "inter")):
        for name, res in with_comms:
            for op in _OPS_SHOWN:
                rows = [r for r in res["comms"] if r["op"] == op and r["scope"] == scope]
                rows = [r for r in rows if r.get("busbw_GBps") is not None]
                if rows:
                    label = op if len(with_comms) == 1 else f"{op} {name}"
                    ax.plot([r["bytes"] for r in rows], [r["busbw_GBps"] for r in rows],
                            marker=".", label=label)  # fmt: skip
            nominal = {r.get("nominal_GBps") for r in res["comms"] if r["scope"] == scope}
            for figure in nominal - {None}:
                ax.axhline(figure, ls="--", color="grey", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("message size (bytes)")
        ax.set_title(f"bus bandwidth, {scope}-node (dashed: nominal)")
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    axes[0].set_ylabel("busbw (GB/s)")
    fig.tight_layout()
    fig.savefig(out / "busbw.png", dpi=120)
    plt.close(fig)
    return ["busbw.png"]


def _train_table(name: str, res: dict[str, Any]) -> list[str]:
    lines = [
        f"### Training: {name}",
        "",
        "| nodes | ranks | mode | layout | tokens/s/GPU | TFLOP/s/GPU | MFU | peak GiB | step s "
        "| compute s | exposed comm s | efficiency |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["train"]:
        degrees = (r.get("layout") or {}).items()
        layout = " x ".join(f"{k}={v}" for k, v in degrees if v > 1) or "1"
        lines.append(
            f"| {r['nodes']} | {cell(r.get('ranks'), 'd')} | {r.get('mode') or ''} | {layout} "
            f"| {cell(r.get('tokens_per_s_per_gpu'), ',.0f')} | {cell(r.get('tflops_per_gpu'))} "
            f"| {cell(r.get('mfu'), '.3f')} | {cell(r.get('peak_memory_gib'))} "
            f"| {cell(r.get('step_time_s'), '.3f')} | {cell(r.get('compute_s'), '.3f')} "
            f"| {cell(r.get('exposed_comm_s'), '.3f')} | {cell(r.get('scaling_efficiency'), '.3f')} |"
        )
    return [*lines, ""]


def _comms_table(name: str, res: dict[str, Any]) -> list[str]:
    lines = [
        f"### Collectives: {name}",
        "",
        "| scope | op | ranks | largest message | time | algbw GB/s | busbw GB/s | of nominal |",
        "|---|---|---|---|---|---|---|---|",
    ]
    largest: dict[tuple[str, str], dict[str, Any]] = {}
    for r in res["comms"]:
        key = (r["scope"], r["op"])
        if key not in largest or r["bytes"] > largest[key]["bytes"]:
            largest[key] = r
    for (scope, op), r in sorted(largest.items()):
        ms = "-" if r.get("time_s") is None else f"{r['time_s'] * 1e3:.3f} ms"
        lines.append(
            f"| {scope} | {op} | {cell(r.get('ranks'), 'd')} | {r['bytes']:,} B "
            f"| {ms} | {cell(r.get('algbw_GBps'), '.3f')} "
            f"| {cell(r.get('busbw_GBps'), '.3f')} | {cell(r.get('busbw_fraction'), '.0%')} |"
        )
    return [*lines, ""]


def _side_by_side(runs: list[tuple[str, dict]]) -> list[str]:
    """Per node count, each run's tokens/s per GPU, and the ratio of the last to the first."""
    runs = [(name, res) for name, res in runs if res["train"]]
    nodes = sorted({r["nodes"] for _, res in runs for r in res["train"]})
    if not nodes or len(runs) < 2:
        return []
    head = " | ".join(name for name, _ in runs)
    lines = ["### Side by side: tokens/s per GPU", "",
             f"| nodes | {head} | last / first |", "|---" * (len(runs) + 2) + "|"]  # fmt: skip
    for k in nodes:
        values = []
        for _, res in runs:
            match = [r.get("tokens_per_s_per_gpu") for r in res["train"] if r["nodes"] == k]
            values.append(match[0] if match else None)
        ratio = values[-1] / values[0] if values[0] and values[-1] else None
        cells = " | ".join(cell(v, ",.0f") for v in values)
        lines.append(f"| {k} | {cells} | {cell(ratio, '.3f')} |")
    return [*lines, ""]


def write_report(dirs: list[Path], out: Path) -> Path:
    runs = [(_label(d, res), res) for d in dirs for res in [read_results(d)]]
    out.mkdir(parents=True, exist_ok=True)
    plots = _plot_train(runs, out) + _plot_comms(runs, out)
    lines = ["# eurotrain bench report", ""]
    for name, res in runs:
        lines.append(
            f"- **{name}**: {res.get('device')} x {res.get('device_count_per_node')} per node, "
            f"{res.get('backend')}, torch {res.get('torch')}, eurotrain {res.get('eurotrain')}, "
            f"{res.get('created')}; `{res.get('command')}`"
        )
    lines.append("")
    lines += _side_by_side(runs)
    for name, res in runs:
        if res["train"]:
            lines += _train_table(name, res)
        if res["comms"]:
            lines += _comms_table(name, res)
    lines += ["## Plots", "", *(f"![{p}]({p})" for p in plots), ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report
