"""The multi-fidelity surrogate proxy: deterministic under its seed, its one-time work done once per machine and
resumed after SIGKILL, bad options refused in the experiment file with exit code 2."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from nas.cli import app
from proxies.quality import make_proxy
from search_spaces import ConfigError

ROOT = Path(__file__).parents[1]
OPTIONS = {"anchors": 3, "anchor_steps": 2, "steps": 1, "eval_items": 8, "pool": 8, "anchor_eval_items": 16}

# A tiny run: an untrained digits teacher (distillation works the same), batches of 8, two-step anchors.
SCRIPT = """
import json, random, sys
from pathlib import Path
import torch
from proxies.data import digits_cache
from proxies.quality import QualityContext, make_proxy
from search_spaces import get_arch
from search_spaces.space import SearchSpace


def score(cache, options):
    torch.set_num_threads(1)
    ctx = QualityContext(data=digits_cache(seed=0), seed=3, batch_size=8, eval_items=8,
                         space=SearchSpace.from_yaml(Path("search_spaces/spaces/digits.yaml")), cache_dir=cache)
    ctx.teacher = ctx.build(get_arch("digits"), seed=3).eval()
    return make_proxy("surrogate", **options)(ctx.space.sample(random.Random(5)), ctx).score


if __name__ == "__main__":
    print(json.dumps({"score": score(Path(sys.argv[1]), json.loads(sys.argv[2]))}))
"""


def _run(cache: str, options: dict = OPTIONS) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SCRIPT, cache, json.dumps(options)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})


def _score(proc: subprocess.Popen) -> float:
    out, err = proc.communicate(timeout=900)  # a hang guard: loaded 2-core machines are slow
    assert proc.returncode == 0, err
    return json.loads(out.splitlines()[-1])["score"]


def _anchors(folder: Path) -> list[dict]:
    """The cached anchors without their timings (which differ from run to run)."""
    files = sorted(next((folder / "surrogate").iterdir()).glob("anchor-*.json"))
    out = []
    for f in files:
        r = json.loads(f.read_text())
        r["full_fidelity"].pop("seconds")
        r["features"].pop("seconds")
        r["features"].pop("clock")
        out.append(r)
    return out


def test_killed_one_time_work_resumes_to_the_uninterrupted_result(tmp_path):
    """A run killed with SIGKILL after its first anchor, then run again, equals an uninterrupted run."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    first, victim = _run(str(whole)), _run(str(cut))
    deadline = time.monotonic() + 900
    while not list(cut.glob("surrogate/*/anchor-000.json")):
        assert time.monotonic() < deadline and victim.poll() is None, victim.communicate()
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    done = list(cut.glob("surrogate/*/anchor-*.json"))
    assert 1 <= len(done) < OPTIONS["anchors"]  # killed mid-way
    kept = {p.name: p.stat().st_mtime_ns for p in done}
    resumed = _score(_run(str(cut)))
    assert {p.name: p.stat().st_mtime_ns for p in done} == kept  # finished anchors were reused, not redone
    assert _score(first) == resumed
    assert _anchors(whole) == _anchors(cut) and len(_anchors(whole)) == OPTIONS["anchors"]
    assert not list(tmp_path.rglob("*.tmp*"))


@pytest.mark.parametrize("extra", [{}, {"features": ["loss@K", "macs"], "schedule": "cosine", "lr": 2e-3},
                                   {"new_modules": "identity"}])
def test_deterministic_under_its_seed_without_a_cache(extra):
    namespace: dict = {"__name__": "surrogate_script"}
    exec(compile(SCRIPT, "surrogate_script", "exec"), namespace)
    threads = torch.get_num_threads()
    try:
        assert namespace["score"](None, {**OPTIONS, **extra}) == namespace["score"](None, {**OPTIONS, **extra})
    finally:
        torch.set_num_threads(threads)


def test_features_and_schedule_change_the_fit_and_its_cache_key():
    default, short = make_proxy("surrogate"), make_proxy("surrogate", features=["loss@K", "macs"], schedule="cosine")
    assert "features" not in default.options  # the default's cache folder keeps its old key
    assert short.features == ("loss@K", "macs") and short.options["schedule"] == "cosine"
    assert short.name.endswith("_cosine") and short.name != default.name
    identity = make_proxy("surrogate", new_modules="identity")
    assert "new_modules" not in default.options and identity.options["new_modules"] == "identity"


def test_identity_new_modules_reach_every_inheriting_proxy():
    """``new_modules: identity`` changes what inheritance gives an arch with an attention the teacher lacks (the
    held-out loss right after inheritance), for the distillation proxy as for inherited short training."""
    from proxies.data import digits_cache
    from proxies.quality import QualityContext
    from search_spaces import UNetArch, get_arch

    torch.manual_seed(0)
    ctx = QualityContext(data=digits_cache(seed=0), seed=3, batch_size=8, eval_items=8)
    ctx.teacher = ctx.build(get_arch("digits"), seed=3).eval()
    data = get_arch("digits").to_dict()
    data["up"][0].update(attentions=1, heads=2)  # the teacher has none there
    arch = UNetArch.from_dict(data)
    for name, opts in (("distill", {"steps": 0, "metric": "task"}), ("short_train", {"init": "inherit", "steps": 1,
                                                                                    "lr": 1e-12, "eval_every": 1})):
        fresh, identity = (make_proxy(name, **opts, new_modules=n)(arch, ctx).score for n in ("fresh", "identity"))
        assert fresh != identity, name
        assert make_proxy(name, **opts, new_modules="identity")(arch, ctx).score == identity  # deterministic


@pytest.mark.parametrize("options,field", [
    ({"anchors": 2}, "anchors"), ({"steps": -1}, "steps"), ({"warmup": 1.5}, "warmup"),
    ({"lr": 0}, "lr"), ({"anchors": 8, "pool": 4}, "pool"), ({"anchor_steps": "many"}, "anchor_steps"),
    ({"features": ["loss@K", "flops"]}, "features"), ({"features": "macs"}, "features"),
    ({"features": []}, "features"), ({"schedule": "linear"}, "schedule"), ({"new_modules": "zero"}, "new_modules"),
])
def test_bad_options_are_config_errors(options, field):
    with pytest.raises(ConfigError) as exc:
        make_proxy("surrogate", **options)
    assert exc.value.field == field


@pytest.mark.parametrize("proxy,message", [
    ("surrogate, options: {anchors: 1}", "objectives[1].anchors: must be an integer >= 3"),
    ("distill, options: {new_modules: random}", "objectives[1].new_modules: must be one of fresh, identity"),
    ("short_train, options: {init: inherit, new_modules: 1}", "objectives[1].new_modules: must be one of"),
])
def test_bad_option_in_experiment_file_is_file_line_field_and_exit_2(tmp_path, proxy, message):
    exp = tmp_path / "exp.yaml"
    exp.write_text("name: sur\nspace: digits\ndata: digits\nteacher: {arch: digits, train_steps: 2}\n"
                   "objectives:\n  - {name: params, kind: params}\n"
                   f"  - {{name: quality, kind: quality, proxy: {proxy}}}\n"
                   f"budget: {{trials: 2}}\noutput_dir: {tmp_path / 'runs'}\n")
    res = CliRunner().invoke(app, ["search", str(exp)])
    assert res.exit_code == 2, res.output
    assert f"{exp}:7: {message}" in " ".join(res.output.split())
    assert "Traceback" not in res.output and not (tmp_path / "runs").exists()


def test_cosine_schedule_warms_up_then_decays_to_zero():
    from proxies.quality.train import lr_factor

    f = [lr_factor(i, 100, "cosine", warmup=0.1) for i in range(100)]
    assert f[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert f[10] == 1.0 and all(a >= b for a, b in itertools.pairwise(f[10:])) and f[-1] < 1e-3
    assert lr_factor(57, 100) == 1.0
    with pytest.raises(ValueError):
        lr_factor(0, 10, "linear")


def test_full_fidelity_without_distillation_trains_on_the_task_loss_alone():
    """``distill=False``: the teacher gives the inherited weights and nothing else, so the run equals inheritance
    plus training with no teacher, and differs from the distilled run."""
    from dataclasses import replace

    from proxies.data import digits_cache
    from proxies.quality import QualityContext
    from proxies.quality.base import evaluate
    from proxies.quality.fidelity import GT_TIMESTEPS, full_fidelity
    from proxies.quality.train import train
    from search_spaces import get_arch
    from search_spaces.inherit import inherit_weights

    torch.manual_seed(0)
    ctx = QualityContext(data=digits_cache(seed=0), seed=3, batch_size=8, eval_items=8)
    ctx.teacher = ctx.build(get_arch("digits"), seed=3).eval()
    arch = get_arch("digits")
    task = full_fidelity(arch, ctx, 3, seed=1, eval_items=8, distill=False)["task_loss"]
    kd = full_fidelity(arch, ctx, 3, seed=1, eval_items=8)["task_loss"]
    model = ctx.build(arch)
    inherit_weights(model, ctx.teacher, new=ctx.new_modules)
    train(model, ctx, 3, seed=1, schedule="cosine", warmup=0.1)
    by_hand = evaluate(model, replace(ctx, eval_items=8, eval_timesteps=GT_TIMESTEPS))["task_loss"]
    assert task == pytest.approx(by_hand, rel=1e-6) and task != pytest.approx(kd, rel=1e-6)
