"""A queued trial on a SQLite study goes to exactly one local worker (``serialize_sqlite``)."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import optuna
from optuna.trial import TrialState

from nas.experiment import Experiment
from nas.search.optuna_backend import make_storage

QUEUED = 60


def _experiment(tmp_path: Path) -> Experiment:
    return Experiment.model_validate({"name": "queue", "space": "digits", "budget": {"trials": QUEUED},
                                      "objectives": [{"name": "params", "kind": "params"}],
                                      "output_dir": str(tmp_path)})


def _take_queued(tmp_path: str, url: str) -> None:
    """A worker that takes queued trials until none is left; each evaluation is instant, so two workers ask for
    the queue's head at nearly the same moments."""
    study = optuna.load_study(study_name="queue", storage=make_storage(url, _experiment(Path(tmp_path))))

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("taken_by", mp.current_process().name)
        return float(trial.suggest_int("x", 0, QUEUED))

    while study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        study.optimize(objective, n_trials=1)


def test_two_workers_never_take_the_same_queued_trial(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="queue", storage=make_storage(url, _experiment(tmp_path)))
    for x in range(QUEUED):
        study.enqueue_trial({"x": x})
    spawn = mp.get_context("spawn")
    procs = [spawn.Process(target=_take_queued, args=(str(tmp_path), url), name=f"w{i}") for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
    # before serialize_sqlite, both could take one trial and the second to finish died on "Cannot tell a
    # COMPLETE trial"
    assert [p.exitcode for p in procs] == [0, 0]
    trials = optuna.load_study(study_name="queue", storage=url).trials
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(t.params["x"] for t in done if "fixed_params" in t.system_attrs) == list(range(QUEUED))
    # a worker that found the queue empty after its check draws one more trial of its own, never a queued one twice
    assert len(done) == len(trials) <= QUEUED + 2
