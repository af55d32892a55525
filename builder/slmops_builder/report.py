"""A recipe build's report: a rich table of the variants and a PNG of quality vs size vs speed.

Both read the report dict (`RecipeResult.to_dict()`, the content of `report.json`), so a report can be
shown again from its file.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.table import Table

__all__ = ["variants_table", "verdict_lines", "write_plot"]

_VERDICT_STYLE = {"packaged": "green", "failed gates": "red", "not selected": "yellow"}


def _num(value: object, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, int | float) else "-"


def variants_table(report: Mapping[str, Any]) -> Table:
    """One row per variant: size, ratios, perplexity, speed, memory, the gates' verdict and why."""
    ref = report.get("reference")
    table = Table(title=f"{report['name']} {report['version']}" + (f" (reference: {ref})" if ref else ""))
    for col in ("profile", "method", "size MiB", "size x", "ppl", "ppl x", "tok/s", "TTFT ms", "RSS MiB"):
        table.add_column(col, justify="left" if col in ("profile", "method") else "right")
    task = report.get("task")  # absent from reports written before the scorer was recorded
    table.add_column(f"task ({task['scorer']})" if task else "accuracy", justify="right")
    table.add_column("verdict")
    for v in report["variants"]:
        m = v["metrics"]
        verdict = v["verdict"]
        style = _VERDICT_STYLE.get(verdict, "dim")
        table.add_row(
            v["profile"],
            v["method"] or "-",
            _num(v["size_bytes"] / 1024**2, ".1f"),
            _num(m.get("size_ratio"), ".3f"),
            _num(m.get("perplexity"), ".3f"),
            _num(m.get("ppl_ratio"), ".4f"),
            _num(m.get("decode_tps"), ".0f"),
            _num(m.get("ttft_ms"), ".0f"),
            _num(m.get("peak_rss_mb"), ".0f"),
            _num(m.get("task_accuracy"), ".2f") + (" (schema)" if m.get("task_json_schema") else ""),
            f"[{style}]{verdict}[/]",
        )
    return table


def verdict_lines(report: Mapping[str, Any]) -> list[str]:
    """One line per variant: its verdict and why (each gate's measured value against its bound)."""
    return [f"{v['profile']}: {v['verdict']}: {v['reason']}" for v in report["variants"]]


def write_plot(report: Mapping[str, Any], path: Path) -> Path:
    """x: size on disk (MiB), y: perplexity ratio to the reference (or perplexity without one),
    colour: decode tokens/s; each point labelled with its profile and verdict."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [v for v in report["variants"] if "perplexity" in v["metrics"]]
    ratio = report.get("reference") is not None and all("ppl_ratio" in v["metrics"] for v in rows)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    try:
        if rows:
            xs = [v["size_bytes"] / 1024**2 for v in rows]
            ys = [v["metrics"]["ppl_ratio" if ratio else "perplexity"] for v in rows]
            cs = [v["metrics"].get("decode_tps", 0.0) for v in rows]
            points = ax.scatter(xs, ys, c=cs, cmap="viridis", s=80, edgecolors="black")
            fig.colorbar(points, ax=ax, label="decode tokens/s")
            for v, x, y in zip(rows, xs, ys, strict=True):
                ax.annotate(f"{v['profile']} ({v['verdict']})", (x, y), textcoords="offset points", xytext=(6, 4))
            max_ratio = report.get("gates", {}).get("max_ppl_ratio")
            if ratio and max_ratio is not None:
                ax.axhline(max_ratio, color="red", linestyle="--", linewidth=1, label=f"gate {max_ratio:g}x")
                ax.legend(loc="best")
        else:
            ax.text(0.5, 0.5, "no variant was evaluated on this machine", ha="center", va="center")
        ax.set_xlabel("size on disk (MiB)")
        ax.set_ylabel(f"perplexity / {report['reference']}" if ratio else "perplexity")
        ax.set_title(f"{report['name']} {report['version']}: quality vs size vs speed")
        ax.grid(True, alpha=0.3)
        ax.margins(x=0.3, y=0.15)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return path
