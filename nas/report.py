"""Run reports: what ``runs/<name>/`` holds after a search, regenerated from the study by ``unet-nas report``.

* ``trials.csv``: every trial (state, objectives, constraints, feasibility, seconds, error, arch);
* ``pareto.json``: the feasible Pareto front with objective values and arch dicts, plus the reference archs;
* ``pareto.png`` / ``pareto.html``: the front on the first two objectives, reference archs placed on it;
* ``latency_breakdown.png``: per-stage cost of the chosen archs (predicted ms, or MACs without a latency
  objective);
* ``best/<constraint>.yaml``: the best arch (first objective) satisfying each constraint, and ``best/all.yaml``;
* ``summary.md``.

Every file is written to a temporary name and renamed, and storage URLs are redacted (``user:***@host``).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from nas.experiment import Experiment
from nas.redaction import redact, scrub
from search_spaces import UNetArch
from search_spaces.yamlio import atomic_write

__all__ = ["atomic_write", "pareto_indices", "redact", "write_report"]


def pareto_indices(values: list[tuple[float, ...]]) -> list[int]:
    """Indices of the non-dominated points (all objectives minimised)."""
    out = []
    for i, a in enumerate(values):
        dominated = any(all(b[k] <= a[k] for k in range(len(a))) and any(b[k] < a[k] for k in range(len(a)))
                        for j, b in enumerate(values) if j != i)
        if not dominated:
            out.append(i)
    return out


def write_report(run_dir: Path, exp: Experiment, study: optuna.Study, storage_url: str,
                 references: dict[str, dict[str, float]], breakdowns: Any = None) -> dict[str, Any]:
    """Write every report file; returns the summary facts (also used by the CLI)."""
    names = [o.name for o in exp.objectives]
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    feasible = [t for t in complete if t.user_attrs.get("feasible", True)]
    front = []
    for i in pareto_indices([tuple(t.values) for t in feasible]):
        if not any(f.params == feasible[i].params for f in front):  # a re-suggested arch appears once
            front.append(feasible[i])
    front.sort(key=lambda t: tuple(t.values))

    _write_trials_csv(run_dir / "trials.csv", trials, names, [c.label for c in exp.constraints])
    pareto = {
        "experiment": exp.name, "objectives": names, "directions": ["minimize"] * len(names),
        "constraints": [c.label for c in exp.constraints],
        "trials": [{"number": t.number, "values": dict(zip(names, t.values, strict=True)),
                    "constraints": t.user_attrs.get("constraints", {}), "arch": t.user_attrs.get("arch")}
                   for t in front],
        "references": references,
    }
    atomic_write(run_dir / "pareto.json", json.dumps(pareto, indent=2) + "\n")

    best: dict[str, FrozenTrial] = {}
    for c in exp.constraints:
        ok = [t for t in complete if t.user_attrs.get("constraints", {}).get(c.label, 0) <= 0]
        if ok:
            best[c.label] = min(ok, key=lambda t: tuple(t.values))
    if feasible:
        best["all"] = min(feasible, key=lambda t: tuple(t.values))
    for label, t in best.items():
        arch = UNetArch.from_dict(t.user_attrs["arch"])
        header = (f"# best {names[0]} of experiment {exp.name} under constraint {label}: trial {t.number}, "
                  + ", ".join(f"{n} {v:.6g}" for n, v in zip(names, t.values, strict=True)) + "\n")
        atomic_write(run_dir / "best" / f"{label}.yaml", header + arch.to_yaml())

    if complete:
        _plot_pareto(run_dir, names, complete, front, references)
        if breakdowns is not None:
            chosen = {f"trial {t.number}": UNetArch.from_dict(t.user_attrs["arch"]) for t in front[:8]}
            _plot_breakdown(run_dir / "latency_breakdown.png", chosen, breakdowns)

    from nas.search.accounting import account

    states = {s.name: sum(t.state == s for t in trials) for s in TrialState}
    facts = {"trials": len(trials), "states": states, "feasible": len(feasible), "pareto": len(front),
             "best": {k: t.number for k, t in best.items()}, "kinds": account(trials)}
    atomic_write(run_dir / "summary.md", _summary_md(exp, storage_url, trials, front, best, references, facts))
    return facts


def _write_trials_csv(path: Path, trials: list[FrozenTrial], names: list[str], constraints: list[str]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["number", "state", *names, "feasible", *[f"constraint:{c}" for c in constraints], "seconds",
                "duplicate_of", "error", "arch_summary", "arch_json"])
    for t in trials:
        values = list(t.values) if t.values else [""] * len(names)
        cons = t.user_attrs.get("constraints", {})
        w.writerow([t.number, t.state.name, *values, t.user_attrs.get("feasible", ""),
                    *[cons.get(c, "") for c in constraints], t.user_attrs.get("seconds", ""),
                    t.user_attrs.get("duplicate_of", ""), scrub(str(t.user_attrs.get("error", ""))),
                    t.user_attrs.get("arch_summary", ""), json.dumps(t.user_attrs.get("arch"))])
    atomic_write(path, buf.getvalue())


def _axes(names: list[str]) -> tuple[int, int]:
    return (0, 1) if len(names) > 1 else (0, 0)


def _plot_pareto(run_dir: Path, names: list[str], complete: list[FrozenTrial], front: list[FrozenTrial],
                 references: dict[str, dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y_i, x_i = _axes(names)
    fig, ax = plt.subplots(figsize=(7, 5))
    others = [t for t in complete if t not in front]
    ax.scatter([t.values[x_i] for t in others], [t.values[y_i] for t in others], s=14, c="lightgray",
               label="trials")
    infeasible = [t for t in others if not t.user_attrs.get("feasible", True)]
    ax.scatter([t.values[x_i] for t in infeasible], [t.values[y_i] for t in infeasible], s=14, marker="x",
               c="tab:red", label="infeasible")
    ax.plot([t.values[x_i] for t in front], [t.values[y_i] for t in front], "o-", c="tab:blue", label="Pareto front")
    for name, vals in references.items():
        if names[x_i] in vals:
            x = vals[names[x_i]]
            if names[y_i] in vals:
                ax.scatter([x], [vals[names[y_i]]], marker="*", s=120, c="tab:orange")
                ax.annotate(name, (x, vals[names[y_i]]), fontsize=8, xytext=(4, 4), textcoords="offset points")
            else:  # a reference without a quality score: a vertical line at its cost
                ax.axvline(x, ls="--", c="tab:orange", lw=1)
                ax.annotate(name, (x, ax.get_ylim()[1]), fontsize=8, rotation=90, va="top", ha="right")
    ax.set_xlabel(names[x_i])
    ax.set_ylabel(names[y_i])
    ax.legend(fontsize=8)
    ax.set_title(f"{len(front)} Pareto-optimal of {len(complete)} completed trials")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write(run_dir / "pareto.png", buf.getvalue())

    import plotly.graph_objects as go

    hover = [f"trial {t.number}<br>{t.user_attrs.get('arch_summary', '')}" for t in complete]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[t.values[x_i] for t in complete], y=[t.values[y_i] for t in complete],
                             mode="markers", name="trials", text=hover, hoverinfo="text+x+y",
                             marker={"color": ["#1f77b4" if t in front else "#bbbbbb" for t in complete]}))
    for name, vals in references.items():
        if names[x_i] in vals:
            if names[y_i] in vals:
                fig.add_trace(go.Scatter(x=[vals[names[x_i]]], y=[vals[names[y_i]]], mode="markers+text",
                                         text=[name], name=name, marker={"symbol": "star", "size": 14}))
            else:
                fig.add_vline(x=vals[names[x_i]], line_dash="dash", annotation_text=name)
    fig.update_layout(xaxis_title=names[x_i], yaxis_title=names[y_i], title="Pareto front")
    atomic_write(run_dir / "pareto.html", fig.to_html(include_plotlyjs=True, full_html=True))


def _plot_breakdown(path: Path, archs: dict[str, UNetArch], breakdowns: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unit, fn = breakdowns
    rows = {label: fn(arch) for label, arch in archs.items()}
    stages: list[str] = []
    for r in rows.values():
        stages += [s for s in r if s not in stages]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 4.5))
    bottom = [0.0] * len(rows)
    for s in stages:
        heights = [r.get(s, 0.0) for r in rows.values()]
        ax.bar(list(rows), heights, bottom=bottom, label=s)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ax.set_ylabel(unit)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("where the time goes, per stage")
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def _summary_md(exp: Experiment, storage_url: str, trials: list[FrozenTrial], front: list[FrozenTrial],
                best: dict[str, FrozenTrial], references: dict[str, dict[str, float]], facts: dict[str, Any]) -> str:
    names = [o.name for o in exp.objectives]
    lines = [f"# {exp.name}", "",
             f"- storage: `{redact(_with_driver(storage_url))}`",
             f"- strategy: {exp.strategy.name}, backend: {exp.backend}, seed: {exp.seed}",
             f"- budget: {exp.budget.trials} trials"
             + (f", {exp.budget.wall_time:g} s" if exp.budget.wall_time else ""),
             f"- trials: {facts['trials']} (" + ", ".join(f"{k.lower()} {v}" for k, v in facts["states"].items() if v)
             + f"), feasible {facts['feasible']}, Pareto-optimal {facts['pareto']}",
             _kinds_line(facts["kinds"]), ""]
    if best:
        lines += ["## Best per constraint", "", "| constraint | trial | " + " | ".join(names) + " | arch |",
                  "|---|---|" + "---|" * len(names) + "---|"]
        for label, t in best.items():
            lines.append(f"| {label} | {t.number} | " + " | ".join(f"{v:.6g}" for v in t.values)
                         + f" | `{t.user_attrs.get('arch_summary', '')}` (best/{label}.yaml) |")
        lines.append("")
    lines += ["## Pareto front", "", "| trial | " + " | ".join(names) + " | arch |", "|---|" + "---|" * len(names)
              + "---|"]
    lines += [f"| {t.number} | " + " | ".join(f"{v:.6g}" for v in t.values)
              + f" | `{t.user_attrs.get('arch_summary')}` |" for t in front]
    if references:
        lines += ["", "## Reference archs", "", "| arch | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        lines += [f"| {n} | " + " | ".join(f"{v[k]:.6g}" if k in v else "-" for k in names) + " |"
                  for n, v in references.items()]
    lines += _trouble_md(trials)
    lines += ["", "Files: trials.csv, pareto.json, pareto.png, pareto.html, latency_breakdown.png, best/*.yaml. "
              "Browse the study with `optuna-dashboard` on the storage URL above (`optuna.load_study` takes it too; "
              "constraints are in each trial's `constraints` system attribute).", ""]
    return "\n".join(lines)


def _with_driver(url: str) -> str:
    """The storage URL as plain Optuna and optuna-dashboard open it (the installed PostgreSQL driver named)."""
    from nas.search.optuna_backend import with_driver

    return with_driver(url)


def _kinds_line(kinds: dict[str, Any]) -> str:
    """Evaluated, duplicate, lost, retried and restarted trials, told apart (see nas.search.accounting)."""
    return (f"- evaluated: {kinds['evaluated']} trials, {kinds['distinct_archs']} distinct archs; duplicates (an "
            f"earlier result reused, nothing evaluated): {kinds['duplicates']}; failed by their own error: "
            f"{kinds['errors']}; lost (worker, node or driver died): {kinds['lost']} (retried {kinds['retried']}, "
            f"not retried {kinds['not_retried']}); restarted by Ray: {kinds['restarted']}"
            + (f"; drawn again (Ray; the arch was being evaluated): {kinds['redrawn']}" if kinds["redrawn"] else ""))


def _trouble_md(trials: list[FrozenTrial]) -> list[str]:
    """The failed trials (each error, or why it was lost and whether it was retried) and Ray's restarts."""
    from nas.search.accounting import failure_line, restart_line, retries

    lines: list[str] = []
    failed = [t for t in trials if t.state == TrialState.FAIL]
    if failed:
        retried_by = retries(trials)
        lines += ["", "## Failed trials", ""]
        lines += [f"- trial {t.number}: {scrub(failure_line(t, retried_by))}" for t in failed]
    restarted = [t for t in trials if int(t.user_attrs.get("restarts", 0)) > 0]
    if restarted:
        lines += ["", "## Restarted trials", ""]
        lines += [f"- trial {t.number}: {scrub(restart_line(t))}" for t in restarted]
    return lines
