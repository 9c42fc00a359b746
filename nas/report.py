"""Run reports: what ``runs/<name>/`` holds after a search, regenerated from the study by ``unet-nas report``.

* ``trials.csv``: every trial (state, objectives, constraints, feasibility, seconds, error, arch);
* ``pareto.json``: the feasible Pareto front with objective values and arch dicts, plus the reference archs;
* ``pareto.png`` / ``pareto.html``: the front on the first two objectives, reference archs placed on it;
* ``latency_breakdown.png``: per-stage cost of the chosen archs (predicted ms, or MACs without a latency
  objective);
* ``best/all.yaml``: the best arch on the first objective among the trials meeting *every* constraint, and
  ``best/<objective>.yaml`` the one lowest on each objective (none when no trial meets every constraint);
* ``refined.json`` and ``best/refined.yaml`` when the experiment refines its finalists (:mod:`nas.search.refine`):
  every refined finalist with its search and refined value, the refined front, and the refined best;
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
from nas.report_plots import write_breakdown, write_pareto_plots
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
                 references: dict[str, dict[str, float]], breakdowns: Any = None,
                 notes: list[str] | None = None) -> dict[str, Any]:
    """Write every report file; returns the summary facts (also used by the CLI). ``notes`` are lines for the
    summary's "Where the figures come from" section (latency profiles and their fit, reference quality)."""
    names = [o.name for o in exp.objectives]
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    feasible = [t for t in complete if meets_all(t, [c.label for c in exp.constraints])]
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

    best = best_feasible(names, feasible)
    _write_best(run_dir, exp, names, best)
    refined = _write_refined(run_dir, exp, study, names)

    if complete:
        write_pareto_plots(run_dir, names, complete, front, references, constraint_bounds(exp, complete),
                           feasible)
        if breakdowns is not None:
            chosen = {f"trial {t.number}": UNetArch.from_dict(t.user_attrs["arch"]) for t in front[:8]}
            write_breakdown(run_dir / "latency_breakdown.png", chosen, breakdowns)

    from nas.search.accounting import account

    states = {s.name: sum(t.state == s for t in trials) for s in TrialState}
    facts = {"trials": len(trials), "states": states, "feasible": len(feasible), "pareto": len(front),
             "best": {k: t.number for k, t in best.items()}, "kinds": account(trials), "refined": refined}
    atomic_write(run_dir / "summary.md", _summary_md(exp, storage_url, trials, front, best, references, facts,
                                                     notes or []))
    return facts


def _write_refined(run_dir: Path, exp: Experiment, study: optuna.Study, names: list[str]) -> dict[str, Any] | None:
    """``refined.json`` and ``best/refined.yaml`` from the run's refine study (see :mod:`nas.search.refine`);
    the facts for the summary, or None when the experiment does not refine. Runs after ``_write_best``, which
    removes a ``refined.yaml`` left by an earlier report."""
    if exp.refine is None:
        return None
    from nas.search.accounting import account
    from nas.search.refine import (
        arch_key,
        best_refined,
        candidates,
        fidelity,
        load_refine_study,
        refined_front,
        refined_rows,
    )

    cands = candidates(exp, study)
    refine = load_refine_study(exp, study._storage)
    trials = refine.get_trials(deepcopy=False) if refine is not None else []
    rows = refined_rows(exp, study, refine) if refine is not None else []
    done = {r["source_trial"] for r in rows}
    errors = {arch_key(t) for t in trials if t.state == TrialState.FAIL and "error" in t.user_attrs}
    pending = [t.number for t, _ in cands if t.number not in done and arch_key(t) not in errors]
    front = refined_front(names, rows)
    best = best_refined(names, rows)
    spec = refine.user_attrs.get("fidelity", fidelity(exp)) if refine is not None else fidelity(exp)
    kinds = account(trials)
    kinds["empty"] = sum("empty" in t.user_attrs for t in trials)
    facts = {"fidelity": spec, "layers": exp.refine.layers, "max_archs": exp.refine.max_archs,
             "candidates": [t.number for t, _ in cands], "pending": pending, "refined": len(rows),
             "front": [r["source_trial"] for r in front], "best": None if best is None else best["source_trial"],
             "trials": kinds, "rows": rows,
             "failed": [{"refine_trial": t.number, "source_trial": t.user_attrs.get("source_trial"),
                         "error": scrub(str(t.user_attrs["error"]))} for t in trials
                        if t.state == TrialState.FAIL and "error" in t.user_attrs]}
    atomic_write(run_dir / "refined.json", json.dumps({"experiment": exp.name, "objectives": names, **facts},
                                                      indent=2) + "\n")
    if best is not None:
        header = (f"# best {names[0]} of experiment {exp.name} among its refined finalists ({spec['objective']} "
                  f"retrained with {spec['proxy']} {spec['options']}): trial {best['source_trial']}, "
                  + ", ".join(f"{n} {v:.6g}" for n, v in best["values"].items()) + "\n")
        atomic_write(run_dir / "best" / "refined.yaml", header + UNetArch.from_dict(best["arch"]).to_yaml())
    return facts


def meets_all(t: FrozenTrial, labels: list[str]) -> bool:
    """Whether a completed trial satisfies every constraint: each recorded value ``<= 0`` and none missing (the
    search's own ``feasible`` flag must agree)."""
    values = t.user_attrs.get("constraints", {})
    return t.user_attrs.get("feasible", True) and all(values.get(c, float("inf")) <= 0 for c in labels)


def best_feasible(names: list[str], feasible: list[FrozenTrial]) -> dict[str, FrozenTrial]:
    """The best trial on each objective among those satisfying every constraint: ``all`` for the first objective
    (ties broken by the next ones), then one per further objective. Empty when no trial meets every constraint."""
    if not feasible:
        return {}
    best = {"all": min(feasible, key=lambda t: (tuple(t.values), t.number))}
    for i, name in enumerate(names[1:], start=1):  # the first objective's best is "all"
        best[name] = min(feasible, key=lambda t, i=i: (t.values[i], tuple(t.values), t.number))
    return best


def _write_best(run_dir: Path, exp: Experiment, names: list[str], best: dict[str, FrozenTrial]) -> None:
    """``best/<key>.yaml`` for each best trial; files of an earlier report that no longer apply are removed, so
    the folder never holds a "best" that breaks a constraint."""
    folder = run_dir / "best"
    if folder.is_dir():
        for old in folder.glob("*.yaml"):
            if old.stem not in best:
                old.unlink()
    for key, t in best.items():
        arch = UNetArch.from_dict(t.user_attrs["arch"])
        what = f"best {names[0]}" if key == "all" else f"lowest {key}"
        header = (f"# {what} of experiment {exp.name} among trials meeting every constraint "
                  f"({', '.join(c.label for c in exp.constraints) or 'none'}): trial {t.number}, "
                  + ", ".join(f"{n} {v:.6g}" for n, v in zip(names, t.values, strict=True)) + "\n")
        atomic_write(folder / f"{key}.yaml", header + arch.to_yaml())


def constraint_bounds(exp: Experiment, complete: list[FrozenTrial]) -> dict[str, tuple[str, float]]:
    """Each constraint's bound in its objective's units (``label -> (objective, bound)``), read back from any trial
    that recorded the constraint: its value is ``objective - bound``."""
    names = [o.name for o in exp.objectives]
    out: dict[str, tuple[str, float]] = {}
    for c in exp.constraints:
        if c.objective not in names:
            continue
        i = names.index(c.objective)
        for t in complete:
            value = t.user_attrs.get("constraints", {}).get(c.label)
            if value is not None:
                out[c.label] = (c.objective, t.values[i] - value)
                break
    return out


def _closest(exp: Experiment, complete: list[FrozenTrial]) -> str:
    """The completed trial that breaks the constraints least (sum of violations relative to each bound)."""
    bounds = constraint_bounds(exp, complete)

    def excess(t: FrozenTrial) -> float:
        values = t.user_attrs.get("constraints", {})
        return sum(max(values.get(c, 0.0), 0.0) / max(abs(bounds[c][1]), 1e-12) for c in bounds)

    t = min(complete, key=lambda t: (excess(t), t.number))
    broken = [f"{c} by {t.user_attrs['constraints'][c]:.4g}" for c in bounds
              if t.user_attrs.get("constraints", {}).get(c, 0.0) > 0]
    return f"closest: trial {t.number}, over " + ", ".join(broken) if broken else ""


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


def _summary_md(exp: Experiment, storage_url: str, trials: list[FrozenTrial], front: list[FrozenTrial],
                best: dict[str, FrozenTrial], references: dict[str, dict[str, float]], facts: dict[str, Any],
                notes: list[str]) -> str:
    names = [o.name for o in exp.objectives]
    lines = [f"# {exp.name}", "",
             f"- storage: `{redact(_with_driver(storage_url))}`",
             f"- strategy: {exp.strategy.name}, backend: {exp.backend}, seed: {exp.seed}",
             f"- budget: {exp.budget.trials} trials"
             + (f", {exp.budget.wall_time:g} s" if exp.budget.wall_time else ""),
             f"- trials: {facts['trials']} (" + ", ".join(f"{k.lower()} {v}" for k, v in facts["states"].items() if v)
             + f"), feasible {facts['feasible']}, Pareto-optimal {facts['pareto']}",
             _kinds_line(facts["kinds"]), ""]
    labels = [c.label for c in exp.constraints]
    lines += ["## Best feasible trials", "",
              "Each row meets every constraint (" + (", ".join(f"`{c}`" for c in labels) or "none") + ").", ""]
    if best:
        lines += ["| best | trial | " + " | ".join(names) + " | arch |", "|---|---|" + "---|" * len(names) + "---|"]
        for key, t in best.items():
            what = f"{names[0]} (first objective)" if key == "all" else f"lowest {key}"
            lines.append(f"| {what} | {t.number} | " + " | ".join(f"{v:.6g}" for v in t.values)
                         + f" | `{t.user_attrs.get('arch_summary', '')}` (best/{key}.yaml) |")
    else:
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        closest = _closest(exp, complete) if complete and labels else ""
        lines.append("**No trial meets every constraint**, so there is no best arch" + (f" ({closest})." if closest
                                                                                          else "."))
    lines.append("")
    if notes:
        lines += ["## Where the figures come from", ""] + [f"- {n}" for n in notes] + [""]
    lines += ["## Pareto front", "", "| trial | " + " | ".join(names) + " | arch |", "|---|" + "---|" * len(names)
              + "---|"]
    lines += [f"| {t.number} | " + " | ".join(f"{v:.6g}" for v in t.values)
              + f" | `{t.user_attrs.get('arch_summary')}` |" for t in front]
    if references:
        lines += ["", "## Reference archs", "", "| arch | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        lines += [f"| {n} | " + " | ".join(f"{v[k]:.6g}" if k in v else "-" for k in names) + " |"
                  for n, v in references.items()]
    lines += _refined_md(names, facts.get("refined"))
    lines += _trouble_md(trials)
    lines += ["", "Files: trials.csv, pareto.json, pareto.png, pareto.html, latency_breakdown.png, best/*.yaml"
              + (", refined.json" if facts.get("refined") is not None else "") + ". "
              "Browse the study with `optuna-dashboard` on the storage URL above (`optuna.load_study` takes it too; "
              "constraints are in each trial's `constraints` system attribute).", ""]
    return "\n".join(lines)


def _refined_md(names: list[str], refined: dict[str, Any] | None) -> list[str]:
    """The refined finalists: what was retrained how, every row with the search's and the refined value, the
    refined front and best, and what is still pending or failed."""
    if refined is None:
        return []
    spec, kinds = refined["fidelity"], refined["trials"]
    q = spec["objective"]
    opts = ", ".join(f"{k}: {v}" for k, v in spec["options"].items()) or "its own options"
    lines = ["", "## Refined finalists", "",
             f"`{q}` scored again with `{spec['proxy']}` ({opts}) on the first {refined['layers']} Pareto layer"
             + ("s" if refined["layers"] > 1 else "") + " of the feasible trials"
             + (f" (at most {refined['max_archs']} archs)" if refined["max_archs"] else "")
             + f": {len(refined['candidates'])} finalists, {refined['refined']} refined, "
             f"{len(refined['pending'])} pending, {kinds['errors']} failed by their own error, {kinds['lost']} lost "
             f"(retried {kinds['retried']}), {kinds['duplicates']} duplicates (a refinement reused), "
             f"{kinds['empty']} empty (nothing left to take).", ""]
    if refined["pending"]:
        lines += ["Not all finalists are refined yet (the search was stopped during refinement): continue with "
                  "`unet-nas search <experiment> --resume`.", ""]
    if refined["best"] is not None:
        lines += [f"Best refined (first objective): trial {refined['best']} (best/refined.yaml).", ""]
    if refined["rows"]:
        others = [n for n in names if n != q]
        lines += [f"| trial | layer | {q} (search) | {q} (refined) | " + " | ".join(others)
                  + " | refined front | arch |", "|---|---|---|---|" + "---|" * len(others) + "---|---|"]
        front = set(refined["front"])
        for r in sorted(refined["rows"], key=lambda r: (r["values"][q], r["source_trial"])):
            lines.append(f"| {r['source_trial']} | {r['layer']} | {r['search_value']:.6g} | {r['values'][q]:.6g} | "
                         + " | ".join(f"{r['values'][n]:.6g}" for n in others)
                         + f" | {'yes' if r['source_trial'] in front else ''} | `{r['arch_summary']}` |")
    for f in refined["failed"]:
        lines.append(f"- refinement of trial {f['source_trial']} failed: {f['error']}")
    return lines


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
