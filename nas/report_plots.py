"""The report's figures: ``pareto.png`` / ``pareto.html`` and ``latency_breakdown.png``.

Every objective is minimised, so every axis says "lower is better"; constraint bounds on a plotted objective
are drawn as lines; a third objective colours the points. The breakdown stacks positive parts up from zero and
negative ones (a fitted overhead can be negative) down from it, and marks each bar's net total, so a bar is as
tall as the prediction it explains.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optuna.trial import FrozenTrial

from search_spaces import UNetArch
from search_spaces.yamlio import atomic_write

BETTER = "lower is better"
OVERHEAD = "overhead"
DOMINANT = 0.5  # an overhead above this share of the total is called out on its bar


def _axes(names: list[str]) -> tuple[int, int]:
    """(y, x) objective indices: the first objective against the second."""
    return (0, 1) if len(names) > 1 else (0, 0)


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def write_pareto_plots(run_dir: Path, names: list[str], complete: list[FrozenTrial], front: list[FrozenTrial],
                       references: dict[str, dict[str, float]], bounds: dict[str, tuple[str, float]],
                       feasible: list[FrozenTrial]) -> None:
    """``pareto.png`` and ``pareto.html``: every completed trial (infeasible ones marked), the front, the
    constraint bounds of the plotted objectives and the references."""
    atomic_write(run_dir / "pareto.png", _png(pareto_figure(names, complete, front, references, bounds, feasible)))
    atomic_write(run_dir / "pareto.html", _pareto_html(names, complete, front, references, bounds, feasible))


def pareto_figure(names: list[str], complete: list[FrozenTrial], front: list[FrozenTrial],
                  references: dict[str, dict[str, float]], bounds: dict[str, tuple[str, float]],
                  feasible: list[FrozenTrial]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y_i, x_i = _axes(names)
    c_i = 2 if len(names) > 2 else None
    ok = {t.number for t in feasible}
    fig, ax = plt.subplots(figsize=(8, 5.5))
    others = [t for t in complete if t not in front]
    colour: dict[str, Any] = {}
    if c_i is not None:
        values = [t.values[c_i] for t in complete]
        colour = {"cmap": "viridis", "vmin": min(values), "vmax": max(values)}
    scatter = None
    feasible_others = [t for t in others if t.number in ok]
    if feasible_others:
        kw = {"c": [t.values[c_i] for t in feasible_others], **colour} if c_i is not None else {"c": "darkgray"}
        scatter = ax.scatter([t.values[x_i] for t in feasible_others], [t.values[y_i] for t in feasible_others],
                             s=22, marker="o", label="feasible trials", alpha=0.8, **kw)
    infeasible = [t for t in others if t.number not in ok]
    if infeasible:  # red crosses: breaking a constraint matters more than where on the colour scale they sit
        ax.scatter([t.values[x_i] for t in infeasible], [t.values[y_i] for t in infeasible], s=30, marker="x",
                   c="tab:red", label="infeasible trials (break a constraint)", alpha=0.8)
    if front:
        ax.plot([t.values[x_i] for t in front], [t.values[y_i] for t in front], "-", c="tab:blue", lw=1.2, zorder=2)
        kw = {"c": [t.values[c_i] for t in front], **colour} if c_i is not None else {"c": "tab:blue"}
        scatter = ax.scatter([t.values[x_i] for t in front], [t.values[y_i] for t in front], s=60, marker="o",
                             edgecolors="tab:blue", linewidths=1.5, label="Pareto front", zorder=3, **kw)
    if c_i is not None and scatter is not None:
        bar = fig.colorbar(scatter, ax=ax)
        bar.set_label(f"{names[c_i]} ({BETTER})")
        for objective, bound in bounds.values():
            if objective == names[c_i] and colour["vmin"] <= bound <= colour["vmax"]:
                bar.ax.axhline(bound, c="tab:red", lw=2)
    for label, (objective, bound) in bounds.items():
        if objective == names[x_i] and x_i != y_i:
            ax.axvline(bound, ls="--", c="tab:red", lw=1, label=f"{label}: {objective} <= {bound:.6g}")
        elif objective == names[y_i]:
            ax.axhline(bound, ls="--", c="tab:red", lw=1, label=f"{label}: {objective} <= {bound:.6g}")
        elif c_i is not None and objective == names[c_i]:
            ax.plot([], [], c="tab:red", lw=2, label=f"{label}: {objective} <= {bound:.6g} (red on the colour bar)")
    for name, vals in references.items():
        if names[x_i] in vals:
            x = vals[names[x_i]]
            if names[y_i] in vals:
                ax.scatter([x], [vals[names[y_i]]], marker="*", s=160, c="tab:orange", edgecolors="k", zorder=4)
                ax.annotate(name, (x, vals[names[y_i]]), fontsize=8, xytext=(4, 4), textcoords="offset points")
            else:  # a reference without a quality score: a vertical line at its cost
                ax.axvline(x, ls=":", c="tab:orange", lw=1)
                ax.annotate(f"{name} ({names[y_i]} not scored)", (x, ax.get_ylim()[1]), fontsize=8, rotation=90,
                            va="top", ha="right")
    ax.set_xlabel(f"{names[x_i]} ({BETTER})")
    ax.set_ylabel(f"{names[y_i]} ({BETTER})")
    legend = ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.25 if c_i is not None else 1.01, 1),
                       borderaxespad=0)
    for handle, text in zip(legend.legend_handles, legend.get_texts(), strict=True):
        if c_i is not None and text.get_text() in ("feasible trials", "Pareto front"):
            handle.set_array(None)
            handle.set_facecolor("lightgray")  # the colour of a point is its third objective, not its kind
    ax.set_title(f"{len(front)} Pareto-optimal of {len(feasible)} feasible, {len(complete)} completed trials",
                 fontsize=10)
    return fig


def _pareto_html(names: list[str], complete: list[FrozenTrial], front: list[FrozenTrial],
                 references: dict[str, dict[str, float]], bounds: dict[str, tuple[str, float]],
                 feasible: list[FrozenTrial]) -> str:
    import plotly.graph_objects as go

    y_i, x_i = _axes(names)
    c_i = 2 if len(names) > 2 else None
    ok = {t.number for t in feasible}
    fig = go.Figure()
    for group, symbol, label in (([t for t in complete if t in front], "circle", "Pareto front"),
                                 ([t for t in complete if t not in front and t.number in ok], "circle-open",
                                  "feasible trials"),
                                 ([t for t in complete if t.number not in ok], "x", "infeasible trials")):
        if not group:
            continue
        hover = [f"trial {t.number}{'' if t.number in ok else ' (infeasible)'}<br>"
                 + "<br>".join(f"{n} {v:.6g}" for n, v in zip(names, t.values, strict=True))
                 + f"<br>{t.user_attrs.get('arch_summary', '')}" for t in group]
        marker: dict[str, Any] = {"symbol": symbol, "size": 11 if label == "Pareto front" else 8}
        if c_i is not None and symbol != "x":
            marker.update(color=[t.values[c_i] for t in group], colorscale="Viridis",
                          cmin=min(t.values[c_i] for t in complete), cmax=max(t.values[c_i] for t in complete),
                          showscale=label == "Pareto front" or not front,
                          colorbar={"title": f"{names[c_i]}<br>({BETTER})"})
        else:
            marker["color"] = {"Pareto front": "#1f77b4", "feasible trials": "#999999"}.get(label, "#d62728")
        fig.add_trace(go.Scatter(x=[t.values[x_i] for t in group], y=[t.values[y_i] for t in group],
                                 mode="lines+markers" if label == "Pareto front" else "markers", name=label,
                                 text=hover, hoverinfo="text", marker=marker))
    for label, (objective, bound) in bounds.items():
        text = f"{label}: {objective} <= {bound:.6g}"
        if objective == names[x_i] and x_i != y_i:
            fig.add_vline(x=bound, line_dash="dash", line_color="red", annotation_text=text)
        elif objective == names[y_i]:
            fig.add_hline(y=bound, line_dash="dash", line_color="red", annotation_text=text)
    for name, vals in references.items():
        if names[x_i] in vals:
            if names[y_i] in vals:
                fig.add_trace(go.Scatter(x=[vals[names[x_i]]], y=[vals[names[y_i]]], mode="markers+text",
                                         text=[name], name=name, marker={"symbol": "star", "size": 14}))
            else:
                fig.add_vline(x=vals[names[x_i]], line_dash="dot", annotation_text=name)
    fig.update_layout(xaxis_title=f"{names[x_i]} ({BETTER})", yaxis_title=f"{names[y_i]} ({BETTER})",
                      title=f"Pareto front: {len(front)} of {len(feasible)} feasible, {len(complete)} completed "
                            "trials", legend={"x": 1.15 if c_i is not None else 1.02})
    return fig.to_html(include_plotlyjs=True, full_html=True)


# ---- breakdown ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """One part of one bar: ``bottom`` to ``bottom + height`` (height < 0 for a negative part)."""

    bar: str
    part: str
    bottom: float
    height: float


def breakdown_segments(rows: dict[str, dict[str, float]]) -> list[Segment]:
    """Stack each bar's positive parts up from zero and its negative parts down from zero, so that the top of the
    positive stack plus the (negative) bottom of the other adds up to the bar's total."""
    out = []
    for bar, parts in rows.items():
        up, down = 0.0, 0.0
        for part, value in parts.items():
            if value >= 0:
                out.append(Segment(bar, part, up, value))
                up += value
            else:
                out.append(Segment(bar, part, down, value))
                down += value
    return out


def breakdown_figure(archs: dict[str, UNetArch], breakdowns: Any) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unit, fn = breakdowns
    rows = {label: fn(arch) for label, arch in archs.items()}
    parts: list[str] = []
    for r in rows.values():
        parts += [s for s in r if s not in parts]
    bars = list(rows)
    segments = breakdown_segments(rows)
    cmap = plt.get_cmap("tab20")
    colours = {p: ("black" if p == OVERHEAD else cmap(i % 20)) for i, p in enumerate(parts)}
    fig, ax = plt.subplots(figsize=(max(6.5, 1.1 * len(rows) + 3), 4.8))
    for part in parts:
        segs = [s for s in segments if s.part == part]
        ax.bar([s.bar for s in segs], [s.height for s in segs], bottom=[s.bottom for s in segs], label=part,
               color=colours[part], alpha=0.35 if part == OVERHEAD else 1.0, edgecolor="black" if part == OVERHEAD
               else None, hatch="//" if part == OVERHEAD else None, linewidth=0.6)
    totals = [sum(rows[b].values()) for b in bars]
    ax.scatter(bars, totals, marker="_", s=900, c="black", linewidths=2.5, zorder=5, label="total (prediction)")
    if any(s.height < 0 for s in segments):
        ax.axhline(0, c="black", lw=0.8)
    shares = []
    for b, total in zip(bars, totals, strict=True):
        over = rows[b].get(OVERHEAD)
        if over is not None and total:
            share = over / total
            shares.append(share)
            if abs(share) >= DOMINANT:
                ax.annotate(f"overhead\n{100 * share:.0f}%", (b, total), xytext=(0, 6), textcoords="offset points",
                            ha="center", fontsize=7, color="red")
    ax.set_ylabel(unit)
    title = "where the time goes, per stage"
    if shares and max(abs(s) for s in shares) >= DOMINANT:
        title += (f"\nthe fitted overhead is {100 * min(shares):.0f}-{100 * max(shares):.0f}% of the total: the "
                  "block sums explain little (see the profile's fit)")
    elif any(s < 0 for s in shares):
        title += "\n(a negative fitted overhead is drawn below zero; black line: each arch's total)"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0, markerscale=0.35)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    return fig


def write_breakdown(path: Path, archs: dict[str, UNetArch], breakdowns: Any) -> None:
    """``latency_breakdown.png``: per-stage predicted cost of ``archs`` (``breakdowns = (unit, arch -> dict)``)."""
    atomic_write(path, _png(breakdown_figure(archs, breakdowns)))
