"""``unet-nas search`` and ``unet-nas report``."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from nas.cli import AllowPickle, app, console, fail, progress_bar, user_errors
from nas.redaction import install_log_filter, redact, remember, scrub
from search_spaces.errors import ConfigError

if TYPE_CHECKING:
    from nas.experiment import Experiment


def _breakdowns(exp: Experiment, evaluator: Any) -> Any:
    """(unit, arch -> per-stage dict) for the breakdown plot: the first latency objective, else MACs."""
    for obj in exp.objectives:
        if obj.kind == "latency":
            return "predicted ms per step (" + obj.name + ")", evaluator.predictor(obj.name).breakdown
    from proxies.cost import arch_costs

    return "GMACs", lambda a: {k: v.macs / 1e9 for k, v in arch_costs(a).stages.items()}


def _worker(path: str, storage_url: str, allow_pickle: bool = False, index: int = 1) -> None:
    """Another worker process on the same study (started by --workers); ``index`` seeds its sampler."""
    from nas.experiment import load_experiment
    from nas.search.objectives import Evaluator
    from nas.search.optuna_backend import run_worker

    exp = load_experiment(path)
    evaluator = Evaluator(exp, allow_pickle=allow_pickle).prepare()
    run_worker(exp, evaluator, storage_url, resume=True, worker=str(index))
    if exp.refine is not None:  # every worker joins the refinement: N workers refine N archs at a time
        from nas.search.refine import run_refine

        run_refine(exp, evaluator, storage_url)


def _log(message: str) -> None:
    """A progress line (teacher training, profile measuring, Ray events), with any storage password hidden."""
    console.print(scrub(str(message)), style="dim")


def _in_file(exc: ConfigError, file: Path) -> ConfigError:
    """A problem found after loading (storage, space, reference archs), located in the file like a schema error."""
    from search_spaces.yamlio import read_file

    return exc if exc.source else exc.located(str(file), read_file(file)[1])


@app.command("search")
@user_errors
def search(
    file: Annotated[Path, typer.Argument(help="Experiment YAML.")],
    resume: Annotated[bool, typer.Option("--resume", help="Continue the experiment's existing study.")] = False,
    storage: Annotated[str | None, typer.Option(help="Optuna storage URL (e.g. postgresql://...); default: "
                                                "the file's storage, else runs/<name>/study.db.")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes on this machine.")] = 1,
    allow_pickle: AllowPickle = False,
) -> None:
    """Run an architecture search; results land in runs/<name>/ (or the file's output_dir)."""
    import multiprocessing as mp

    from optuna.trial import TrialState

    from nas.experiment import load_experiment

    install_log_filter()
    remember(storage)
    exp = load_experiment(file)
    try:
        storage_url = exp.storage_url(storage)
    except ConfigError as exc:
        raise _in_file(exc, file) from None
    from nas.search.objectives import Evaluator

    try:
        evaluator = Evaluator(exp, log=_log, allow_pickle=allow_pickle).check()
    except ConfigError as exc:
        raise _in_file(exc, file) from None
    if exp.backend == "ray":
        from nas.search.ray_backend import run_ray

        exp.run_dir.mkdir(parents=True, exist_ok=True)
        study = run_ray(exp, file, storage_url, resume, log=_log, allow_pickle=allow_pickle)
        _finish(exp, study, storage_url, evaluator.prepare())
        _warn_untrusted(exp)  # the profile was measured by a Ray worker: say it here too
        return

    from nas.search.optuna_backend import counted, make_storage, open_study, run_worker

    # nothing is written before the storage has opened: a bad URL or nothing to resume leaves no run folder
    if storage is None and exp.storage is None:  # the default SQLite study lives in the run folder
        if resume and not (exp.run_dir / "study.db").is_file():
            raise ConfigError(f"nothing to resume: {exp.run_dir / 'study.db'} does not exist", field="name")
        exp.run_dir.mkdir(parents=True, exist_ok=True)
    try:
        study = open_study(exp, make_storage(storage_url, exp), resume)
        if exp.refine is not None and resume:  # refined at another fidelity: refuse before the search goes on
            from nas.search.refine import check_fidelity, load_refine_study

            check_fidelity(exp, load_refine_study(exp, study._storage))
    except ConfigError as exc:
        raise (exc if storage is not None else _in_file(exc, file)) from None
    exp.run_dir.mkdir(parents=True, exist_ok=True)
    saved = exp.model_dump()
    saved["base_dir"] = str(Path(exp.base_dir).resolve())  # so `unet-nas report` finds the same relative files
    if isinstance(saved.get("storage"), str):
        saved["storage"] = redact(saved["storage"])
    from search_spaces.yamlio import atomic_write, dump_yaml

    atomic_write(exp.run_dir / "experiment.yaml", dump_yaml(saved))
    try:
        evaluator.prepare()  # may train a teacher or measure a profile: minutes, so Ctrl-C must be clean here too
    except KeyboardInterrupt:
        console.print(f"stopped while preparing; start again with: unet-nas search {file} --resume")
        raise typer.Exit(130) from None
    _warn_untrusted(exp)

    procs = []
    if workers > 1:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_worker, args=(str(file), storage_url, allow_pickle, i), daemon=False)
                 for i in range(1, workers)]
        for p in procs:
            p.start()
    progress = progress_bar("status")
    first = exp.objectives[0].name
    interrupted = False
    with progress:
        task = progress.add_task(f"search {exp.name}", total=exp.budget.trials, completed=counted(study),
                                 status="")

        def on_trial(study: Any, _trial: Any) -> None:
            trials = study.get_trials(deepcopy=False)
            done = [t for t in trials if t.state == TrialState.COMPLETE]
            feasible = [t for t in done if t.user_attrs.get("feasible", True)]
            failed = sum(t.state == TrialState.FAIL for t in trials)
            best = min((t.values[0] for t in feasible), default=None)
            status = f"failed {failed}  feasible {len(feasible)}" + (f"  best {first} {best:.4g}" if best is not None
                                                                    else "")
            progress.update(task, completed=counted(study), status=status)

        try:
            # the process that created the study is worker "0" (the experiment's own seed); one that joins or
            # resumes seeds from its host and pid
            run_worker(exp, evaluator, storage_url, resume=True, on_trial=on_trial,
                       worker=f"{socket.gethostname()}:{os.getpid()}" if resume else "0",
                       log=lambda line: progress.console.print(scrub(line), style="dim"))
        except KeyboardInterrupt:
            interrupted = True
        if exp.refine is not None and not interrupted:
            try:
                _refine(exp, evaluator, storage_url, lambda line: progress.console.print(scrub(line), style="dim"))
            except KeyboardInterrupt:
                interrupted = True
    for p in procs:
        if interrupted:
            p.terminate()
        p.join()
    _finish(exp, study, storage_url, evaluator)
    if interrupted:
        console.print(f"stopped; continue with: unet-nas search {file} --resume")
        raise typer.Exit(130)


def _refine(exp: Experiment, evaluator: Any, storage_url: str, log: Any) -> None:
    """Refine the finished search's finalists (``refine`` in the experiment), one line per refined arch."""
    from nas.search.refine import run_refine

    def on_trial(_study: Any, t: Any) -> None:
        if t.value is not None:
            dup = f", reused from refinement {t.user_attrs['duplicate_of']}" if "duplicate_of" in t.user_attrs else ""
            log(f"refined trial {t.user_attrs.get('source_trial')}: {t.value:.6g} "
                f"({t.user_attrs.get('seconds', 0):.1f} s{dup})")
        elif "error" in t.user_attrs:
            log(f"refinement of trial {t.user_attrs.get('source_trial')} failed: {t.user_attrs['error']}")

    run_refine(exp, evaluator, storage_url, log=log, on_trial=on_trial)


def _finish(exp: Experiment, study: Any, storage_url: str, evaluator: Any) -> None:
    """Write the report. Every worker does when it stops: under a lock in the run folder, each reads the study
    afresh and writes, so the files always come from the newest snapshot (the last worker's)."""
    from filelock import FileLock

    from nas.report import write_report

    references, notes = _references(exp, evaluator)
    breakdowns, notes = _breakdowns(exp, evaluator), _profile_notes(exp) + notes
    with FileLock(exp.run_dir / ".report.lock"):
        facts = write_report(exp.run_dir, exp, study, storage_url, references, breakdowns, notes=notes)
    running, queued = facts["states"]["RUNNING"], facts["states"]["WAITING"]
    # a queued trial (the evolution strategy's next child, or a lost trial's retry) runs only if a worker still
    # searches or the search is resumed with budget left: it is not a trial another worker is finishing
    console.print(f"{facts['trials']} trials ({facts['states']['COMPLETE']} complete, {facts['states']['FAIL']} "
                  f"failed" + (f", {running} still running in other workers, which rewrite the report when they "
                               "stop" if running else "")
                  + (f", {queued} queued and not started" if queued else "")
                  + f"), {facts['pareto']} Pareto-optimal; report in {exp.run_dir}/summary.md")
    refined = facts.get("refined")
    if refined is not None:
        console.print(f"refined {refined['refined']} of {len(refined['candidates'])} finalists"
                      + (f", {len(refined['pending'])} pending" if refined["pending"] else "")
                      + (f"; best refined: trial {refined['best']} (best/refined.yaml)" if refined["best"] is not None
                         else ""))


def _references(exp: Experiment, evaluator: Any) -> tuple[dict[str, dict[str, float]], list[str]]:
    """The reference archs' objective values, quality included: scored with the same proxy and options as every
    trial (one trial's cost each), so that they sit on the same axes. Where the proxy cannot score one, its cost
    objectives still place it and the summary says why its quality is missing."""
    references = evaluator.reference_objectives()
    quality = [o.name for o in exp.objectives if o.kind == "quality"]
    notes = []
    if not quality or not references:
        return references, notes
    from search_spaces import get_arch

    for name in list(references):
        try:
            values = evaluator.objectives(get_arch(name))
        except Exception as exc:  # any proxy failure (a diverging loss too) is a note, not a crash
            notes.append(f"reference {name}: {', '.join(quality)} not scored: the proxy failed on it ({scrub(exc)})")
            continue
        references[name] = {**references[name], **{q: values[q] for q in quality}}
    scored = [n for n in references if all(q in references[n] for q in quality)]
    if scored:
        notes.append(f"reference archs {', '.join(scored)}: {', '.join(quality)} scored with the same proxy and "
                     "options as the trials (weights inherited from the teacher as for any trial)")
    return references, notes


def _profiles(exp: Experiment) -> list[tuple[Any, Path, Any]]:
    """(objective, path, profile or the ConfigError reading it) of each profile-based latency objective."""
    from proxies.latency.profile import LatencyProfile, find_profile

    out = []
    for obj in exp.objectives:
        if obj.kind != "latency" or obj.predictor == "roofline":
            continue
        path = exp.path(obj.profile)
        try:
            path = path if path.is_file() else find_profile(obj.profile)
            out.append((obj, path, LatencyProfile.load(path)))
        except ConfigError as exc:
            out.append((obj, path, exc))
    return out


def _warn_untrusted(exp: Experiment) -> None:
    """One warning line per latency profile whose measurements are not trustworthy (the summary says it too)."""
    from nas.cli_latency import warn_untrusted

    for _obj, path, prof in _profiles(exp):
        if not isinstance(prof, ConfigError) and prof.trust is not None and not prof.trust.trusted:
            warn_untrusted(path, prof.trust)


def _profile_notes(exp: Experiment) -> list[str]:
    """Where each latency figure comes from: a profile measured here (by this run) or given, its device, date,
    calibration fit and trust verdict."""
    notes = [f"{o.name}: roofline predictor from the device spec {o.spec} (analytic, no measurement)"
             for o in exp.objectives if o.kind == "latency" and o.predictor == "roofline"]
    for obj, path, prof in _profiles(exp):
        if isinstance(prof, ConfigError):
            notes.append(f"{obj.name}: profile not readable ({scrub(prof)})")
            continue
        here = path.resolve().is_relative_to(exp.run_dir.resolve())
        origin = "measured here by this run" if here else f"given ({obj.profile})"
        corr = prof.correction
        fit = (f"correction whole = {corr.scale:.3f} x block sum {corr.offset_ms:+.3f} ms, fit error "
               f"{corr.fit_mape_pct:.1f}% over {corr.n} networks") if corr is not None else "no correction fitted"
        when = str(prof.environment.get("date", "undated"))
        if prof.trust is None:
            trust = "trust: not judged (a profile from before these checks, or imported)"
        elif prof.trust.trusted:
            trust = f"measurements {prof.trust.line()}"
        else:
            trust = f"**measurements {prof.trust.line()}**: its latency figures may be off by about that much"
        notes.append(f"{obj.name}: {obj.predictor} predictor on a profile {origin} ({path.name}), "
                     f"{prof.device_name}, {when}; {fit}; {trust}")
    return notes


@app.command("report")
@user_errors
def report(
    run: Annotated[Path, typer.Argument(help="A run folder (runs/<name>) holding experiment.yaml.")],
    storage: Annotated[str | None, typer.Option(help="Storage URL if not the run's study.db.")] = None,
    allow_pickle: AllowPickle = False,
) -> None:
    """Regenerate a run's report files from its study."""
    import optuna

    from nas.experiment import load_experiment, run_storage_url

    install_log_filter()
    remember(storage)
    from nas.search.objectives import Evaluator
    from nas.search.optuna_backend import make_storage

    path = run / "experiment.yaml"
    if not path.is_file():
        raise fail(f"{run}: not a run folder (no experiment.yaml)")
    exp = load_experiment(path, overrides={"output_dir": str(run.parent), "name": run.name})
    url = run_storage_url(exp, storage, path)
    try:
        study = optuna.load_study(study_name=exp.name, storage=make_storage(url, exp))
    except KeyError:
        raise ConfigError(f"no study {exp.name!r} in {redact(url)}", field="storage") from None
    _finish(exp, study, url, Evaluator(exp, allow_pickle=allow_pickle).prepare())
