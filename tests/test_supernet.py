"""The few-shot supernet proxy: weights really shared, deterministic under its seed, its one-time work resumed
after SIGKILL to the same weights, bad options refused in the experiment file with exit code 2, and a search that
uses it."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
import torch
from typer.testing import CliRunner

from nas.cli import app
from proxies.quality import make_proxy
from proxies.quality.supernet import share_weights
from search_spaces import ConfigError, get_arch

ROOT = Path(__file__).parents[1]
OPTIONS = {"steps": 12, "eval_items": 8, "checkpoint_every": 2, "split": ["down[0].resnets"]}

# A tiny run: an untrained digits teacher (distillation works the same), batches of 8, a 12-step supernet.
SCRIPT = """
import json, random, sys
from pathlib import Path
import torch
from proxies.data import digits_cache
from proxies.quality import QualityContext, make_proxy
from search_spaces import get_arch
from search_spaces.space import SearchSpace


def scores(cache, options):
    torch.set_num_threads(1)
    ctx = QualityContext(data=digits_cache(seed=0), seed=3, batch_size=8, eval_items=8,
                         space=SearchSpace.from_yaml(Path("search_spaces/spaces/digits.yaml")), cache_dir=cache)
    ctx.teacher = ctx.build(get_arch("digits"), seed=3).eval()
    proxy = make_proxy("supernet", **options)
    return [proxy(ctx.space.sample(random.Random(i)), ctx).score for i in range(3)]


if __name__ == "__main__":
    print(json.dumps({"scores": scores(Path(sys.argv[1]), json.loads(sys.argv[2]))}))
"""


def _run(cache: Path, options: dict = OPTIONS) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(cache), json.dumps(options)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})


def _scores(proc: subprocess.Popen) -> list[float]:
    out, err = proc.communicate(timeout=900)  # a hang guard: loaded 2-core machines are slow
    assert proc.returncode == 0, err
    return json.loads(out.splitlines()[-1])["scores"]


def _state(cache: Path) -> dict:
    return torch.load(next(cache.glob("supernet/*/state.pt")), weights_only=True)


def test_killed_one_time_work_resumes_to_the_uninterrupted_weights(tmp_path):
    """Killed with SIGKILL after a checkpoint, run again: the same supernets and scores as an uninterrupted run."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    first, victim = _run(whole), _run(cut)
    deadline = time.monotonic() + 900
    while not list(cut.glob("supernet/*/state.pt")):
        assert time.monotonic() < deadline and victim.poll() is None, victim.communicate()
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = _state(cut)["step"]
    assert 0 < killed_at < OPTIONS["steps"]  # killed mid-way, a whole checkpoint left
    resumed = _scores(_run(cut))
    assert _scores(first) == resumed
    a, b = _state(whole), _state(cut)
    assert a["step"] == b["step"] == OPTIONS["steps"]
    for key in a["nets"]:
        for name, tensor in a["nets"][key].items():
            assert torch.equal(tensor, b["nets"][key][name]), (key, name)
    assert not list(tmp_path.rglob("*.tmp"))


def test_deterministic_under_its_seed_and_the_seed_matters():
    namespace: dict = {"__name__": "supernet_script"}
    exec(compile(SCRIPT, "supernet_script", "exec"), namespace)
    threads = torch.get_num_threads()
    try:
        once, again = (namespace["scores"](None, {**OPTIONS, "checkpoint_every": 100}) for _ in range(2))
        assert once == again
        fewer = namespace["scores"](None, {**OPTIONS, "steps": 4})
        assert fewer != once  # the training is what the scores come from
    finally:
        torch.set_num_threads(threads)


def test_micro_batches_train_the_same_supernets():
    """``quality_context.micro_batch`` bounds memory at SD scale; the supernets it trains are the same up to
    float rounding."""
    from proxies.data import digits_cache
    from proxies.quality import QualityContext
    from search_spaces.space import SearchSpace

    space = SearchSpace.from_yaml(ROOT / "search_spaces" / "spaces" / "digits.yaml")
    out = []
    for micro in (None, 3):
        ctx = QualityContext(data=digits_cache(seed=0), seed=3, batch_size=8, eval_items=8, space=space,
                             micro_batch=micro)
        ctx.teacher = ctx.build(get_arch("digits"), seed=3).eval()
        out.append(make_proxy("supernet", steps=4, eval_items=8)(space.sample(random.Random(1)), ctx).score)
    assert out[0] == pytest.approx(out[1], rel=1e-4)


def test_a_student_trains_the_supernets_own_tensors():
    """After share_weights a step on the student moves the supernet's weights: one tensor, not a copy."""
    from proxies.data import digits_cache
    from proxies.quality import QualityContext
    from search_spaces import UNetArch

    ctx = QualityContext(data=digits_cache(seed=0), seed=3, batch_size=4, eval_items=4)
    big = get_arch("digits")
    data = big.to_dict()
    data["down"][1]["attentions"] = 0  # a smaller arch of the same group
    student, supernet = ctx.build(UNetArch.from_dict(data)), ctx.build(big)
    shared, total = share_weights(student, supernet)
    assert 0 < shared == total  # block removal at fixed widths: every tensor has its place in the supernet
    before = supernet.conv_in.weight.detach().clone()
    x0, text, t, _ = ctx.batch(torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    student(x0, t, text).sample.square().mean().backward()
    opt.step()
    assert student.conv_in.weight is supernet.conv_in.weight
    assert not torch.equal(before, supernet.conv_in.weight)


@pytest.mark.parametrize("options,field", [
    ({"steps": 0}, "steps"), ({"lr": 0}, "lr"), ({"warmup": 1.0}, "warmup"), ({"eval_items": 0}, "eval_items"),
    ({"checkpoint_every": "often"}, "checkpoint_every"), ({"split": "down[0].resnets"}, "split"),
    ({"split": ["a", "a"]}, "split"), ({"new_modules": "zero"}, "new_modules"), ({"steps": True}, "steps"),
    ({"max_groups": 0}, "max_groups"), ({"max_groups": "four"}, "max_groups"),
    ({"short_steps": -1}, "short_steps"), ({"short_steps": 2.5}, "short_steps"),
    ({"short_weight": -0.1}, "short_weight"), ({"short_weight": "some"}, "short_weight"),
    ({"short_weight": float("nan")}, "short_weight"), ({"short_eval_items": 0}, "short_eval_items"),
    ({"short_lr": 0}, "short_lr"), ({"train_on": "all"}, "train_on"), ({"sandwich": "yes"}, "sandwich"),
])
def test_bad_options_are_config_errors(options, field):
    with pytest.raises(ConfigError) as exc:
        make_proxy("supernet", **options)
    assert exc.value.field == field


@pytest.mark.parametrize("options,message", [
    ("{steps: 0}", "objectives[1].steps: must be an integer >= 1"),
    ("{split: ['down[7].resnets']}", "objectives[1].split[0]: 'down[7].resnets' is not a decision of the space"),
    ("{lr: fast}", "objectives[1].lr: must be a number > 0"),
    ("{short_weight: -1}", "objectives[1].short_weight: must be a number >= 0"),
])
def test_bad_option_in_experiment_file_is_file_line_field_and_exit_2(tmp_path, options, message):
    exp = tmp_path / "exp.yaml"
    exp.write_text("name: sn\nspace: digits\ndata: digits\nteacher: {arch: digits, train_steps: 2}\n"
                   "objectives:\n  - {name: params, kind: params}\n"
                   f"  - {{name: quality, kind: quality, proxy: supernet, options: {options}}}\n"
                   f"budget: {{trials: 2}}\noutput_dir: {tmp_path / 'runs'}\n")
    res = CliRunner().invoke(app, ["search", str(exp)])
    assert res.exit_code == 2, res.output
    assert f"{exp}:7: {message}" in " ".join(res.output.split())
    assert "Traceback" not in res.output and not (tmp_path / "runs").exists()


def test_a_search_with_two_workers_trains_the_supernets_once(tmp_path):
    """``proxy: supernet`` in a search with two local workers: one process does the one-time work, both score; with
    ``train_on: feasible`` the search hands the proxy its experiment's cost bounds."""
    exp = tmp_path / "exp.yaml"
    exp.write_text("name: sn\nspace: digits\ndata: digits\nseed: 1\nteacher: {arch: digits, train_steps: 2}\n"
                   "objectives:\n  - {name: params, kind: params}\n"
                   "  - {name: quality, kind: quality, proxy: supernet,\n"
                   "     options: {steps: 8, eval_items: 8, split: ['down[0].resnets'], train_on: feasible}}\n"
                   "quality_context: {batch_size: 8, eval_items: 8}\n"
                   "constraints:\n  - {objective: params, max: 400000}\n"
                   f"budget: {{trials: 4}}\noutput_dir: {tmp_path / 'runs'}\n")
    res = CliRunner().invoke(app, ["search", str(exp), "--workers", "2"])
    assert res.exit_code == 0, res.output
    run = tmp_path / "runs" / "sn"
    states = list(run.glob("supernet/*/state.pt"))
    step = torch.load(states[0], weights_only=True)["step"]
    assert len(states) == 1 and 0 < step < 8  # train_on: feasible, the experiment's bound: its share of the steps
    assert "one-time work of the supernet8 proxy" in res.output
    study = optuna.load_study(study_name="sn", storage=f"sqlite:///{run / 'study.db'}")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 4 and len({t.values[1] for t in done}) > 1


def test_auto_split_takes_the_most_damaging_resnet_counts_its_steps_can_feed():
    """``split: auto`` (the default) measures how much each ResNet count's smallest choice damages inheritance and
    splits on the worst, as many as leave every group ``GROUP_STEPS`` steps; with few steps, on none."""
    from proxies.data import digits_cache
    from proxies.quality import QualityContext
    from proxies.quality.supernet import AUTO_DAMAGE, GROUP_STEPS
    from proxies.quality.train import train
    from search_spaces.space import SearchSpace

    space = SearchSpace.from_yaml(ROOT / "search_spaces" / "spaces" / "digits.yaml")
    ctx = QualityContext(data=digits_cache(seed=0), seed=3, batch_size=8, eval_items=8, space=space)
    ctx.teacher = ctx.build(get_arch("digits"), seed=3)
    train(ctx.teacher, ctx, 20, lr=3e-3)  # a teacher whose inheritance a removed ResNet can damage
    ctx.teacher.eval()
    resnets = {d.name for d in space.decisions if d.name.endswith(".resnets") and len(d.choices) > 1}
    few = make_proxy("supernet", steps=12, eval_items=8)
    assert len(few.find_groups(ctx)) == 2 and few.split_names == []  # the mid upsampler's layouts only
    assert set(few.split_damage) == resnets
    many = make_proxy("supernet", steps=4000, eval_items=8)
    groups = many.find_groups(ctx)
    damage = many.split_damage
    assert "down[0].resnets" in many.split_names  # its skips shift: the damage the split is for
    assert len(groups) * GROUP_STEPS <= 4000
    assert all(damage[n] >= AUTO_DAMAGE for n in many.split_names)
    assert many.split_names == sorted(many.split_names, key=lambda n: -damage[n])
    assert {tuple(many.group_of(space, a)) for a in groups.values()} == set(groups)
    capped = make_proxy("supernet", steps=4000, eval_items=8, max_groups=2)
    assert len(capped.find_groups(ctx)) == 2 and capped.split_names == []  # the upsampler's two layouts fill it
    # an explicit list is taken as given
    named = make_proxy("supernet", steps=4000, eval_items=8, split=["down[2].resnets"])
    groups = named.find_groups(ctx)  # split where the third stage exists, on the upsampler everywhere
    assert named.split_names == ["down[2].resnets"] and len(groups) == 6 and named.split_damage == {}


def test_the_short_run_is_the_distill_runs_first_steps_and_weighs_in_as_a_power():
    """Per trial the score is the shared-weight loss times the loss after ``short_steps`` steps from inheritance
    (the same steps as the first of the distill features' run) to the power ``short_weight``; 0 steps or weight
    scores the shared weights alone, and the supernets (the one-time work) are the same either way."""
    from proxies.data import digits_cache
    from proxies.quality import QualityContext
    from proxies.quality.fidelity import cheap_features
    from search_spaces.space import SearchSpace

    space = SearchSpace.from_yaml(ROOT / "search_spaces" / "spaces" / "digits.yaml")
    ctx = QualityContext(data=digits_cache(seed=0), seed=3, batch_size=8, eval_items=8, space=space)
    ctx.teacher = ctx.build(get_arch("digits"), seed=3).eval()
    arch = space.sample(random.Random(1))
    both = make_proxy("supernet", steps=4, eval_items=8, short_steps=3, short_weight=0.5, short_eval_items=8)(arch, ctx)
    alone = make_proxy("supernet", steps=4, eval_items=8, short_steps=0)(arch, ctx)
    unweighted = make_proxy("supernet", steps=4, eval_items=8, short_weight=0)(arch, ctx)
    assert both.details["shared_loss"] == alone.score == unweighted.score
    assert "short_loss" not in alone.details
    short = both.details["short_loss"]
    assert short == pytest.approx(cheap_features(arch, ctx, 3, eval_items=8)["loss@K"], rel=1e-6)
    assert both.score == pytest.approx(alone.score * short ** 0.5, rel=1e-12)
    assert short != cheap_features(arch, ctx, 0, eval_items=8)["loss@0"]  # the steps are taken
    fewer = make_proxy("supernet", steps=4, eval_items=8, short_steps=3, short_eval_items=4)(arch, ctx)
    assert fewer.details["shared_loss"] == alone.score  # the shared weights' evaluation keeps eval_items
    assert fewer.details["short_loss"] == pytest.approx(
        cheap_features(arch, ctx, 3, eval_items=4)["loss@K"], rel=1e-6)


def test_a_checkpoint_that_cannot_be_written_leaves_the_last_one_whole_and_no_partial_file(tmp_path, monkeypatch):
    """A full disk mid-save: the error reaches the caller, the previous checkpoint is still the one on disk and no
    temporary file is left behind to hold the space a rerun needs."""
    import errno

    namespace: dict = {"__name__": "supernet_script"}
    exec(compile(SCRIPT, "supernet_script", "exec"), namespace)
    real_save, saves = torch.save, []

    def save(obj, path, *args, **kwargs):
        saves.append(path)
        if len(saves) == 2:  # the second checkpoint: half a file, then the disk is full
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(OSError, match="No space left"):
            namespace["scores"](tmp_path, OPTIONS)
    finally:
        torch.set_num_threads(threads)
    assert _state(tmp_path)["step"] == OPTIONS["checkpoint_every"]  # the first checkpoint, whole
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def _bounded_context(feasible=None, label: str = "", cache=None):
    from proxies.data import digits_cache
    from proxies.quality import QualityContext
    from search_spaces.space import SearchSpace

    ctx = QualityContext(data=digits_cache(seed=0), seed=3, batch_size=8, eval_items=8, cache_dir=cache,
                         space=SearchSpace.from_yaml(ROOT / "search_spaces" / "spaces" / "digits.yaml"),
                         feasible=feasible, feasible_label=label)
    ctx.teacher = ctx.build(get_arch("digits"), seed=3).eval()
    return ctx


def test_training_draws_only_archs_meeting_the_cost_bounds(monkeypatch):
    """``train_on: feasible``: with bounds in the context, every training step is on an arch meeting them; a group
    none of whose archs meets them gets no steps, and its archs are scored on the teacher's weights as inheritance
    gives them."""
    from dataclasses import replace

    import proxies.quality.supernet as supernet
    from proxies.cost import count_params
    from proxies.quality.base import evaluate
    from proxies.quality.surrogate import arch_key

    bound = 300_000
    feasible = lambda a: a.down[0].resnets == 1 and count_params(a) <= bound  # noqa: E731
    trained = []
    real = supernet.backward_batch
    monkeypatch.setattr(supernet, "backward_batch", lambda model, *a: trained.append(model.arch) or real(model, *a))
    ctx = _bounded_context(feasible, f"params <= {bound}, one ResNet first")
    proxy = make_proxy("supernet", steps=12, eval_items=8, short_steps=0, split=["down[0].resnets"],
                       train_on="feasible")
    lines = []
    proxy.log = lines.append
    proxy.fit(ctx)
    shares = {key: (proxy._groups[key].down[0].resnets, share) for key, share in proxy.feasible_share.items()}
    assert all(share == 0 for resnets, share in shares.values() if resnets == 2)
    assert any(0 < share < 1 for resnets, share in shares.values() if resnets == 1)
    expected = sum(max(1, round(12 / len(shares) * share)) for _, share in shares.values() if share > 0)
    assert len(trained) == len(proxy.schedule()) == expected < 12 and all(map(feasible, trained))
    assert f"training on the archs meeting params <= {bound}, one ResNet first" in lines[1]
    assert f": {expected} of 12 arch-steps" in lines[1]
    assert len(set(map(arch_key, trained))) > 1
    outside = next(a for a in (ctx.space.sample(random.Random(i)) for i in range(100)) if a.down[0].resnets == 2)
    score = proxy(outside, ctx)
    assert score.details["group_trained"] is False
    alone = evaluate(proxy._build(ctx, outside), replace(ctx, eval_items=8))["task_loss"]
    assert score.score == pytest.approx(alone, rel=1e-6)
    inside = next(a for a in (ctx.space.sample(random.Random(i)) for i in range(100)) if feasible(a))
    assert proxy(inside, ctx).details["group_trained"] is True


def test_the_bounds_name_the_cache_and_whole_space_training_keeps_the_old_one(tmp_path):
    """Supernets trained under other bounds are other supernets (another cache folder); with no bounds, or
    ``train_on: space`` (the default), the folder is the one runs made before the option existed."""
    folder = lambda ctx, train_on="feasible": make_proxy(  # noqa: E731
        "supernet", steps=6, train_on=train_on).cache_folder(ctx)
    none = _bounded_context(cache=tmp_path)
    bounded = _bounded_context(lambda a: True, "params <= 1", cache=tmp_path)
    other = _bounded_context(lambda a: True, "params <= 2", cache=tmp_path)
    assert len({folder(none), folder(bounded), folder(other)}) == 3
    assert folder(bounded, train_on="space") == folder(none) == make_proxy("supernet", steps=6).cache_folder(bounded)


def test_under_bounds_each_group_keeps_its_steps_share_of_the_archs_meeting_them():
    """An arch meeting the bounds is drawn as often as on the whole space: each group's steps scale by the share of
    its archs meeting them, interleaved so that every group sees the whole learning-rate schedule."""
    proxy = make_proxy("supernet", steps=16, train_on="feasible")
    proxy._groups = {(0,): None, (1,): None, (2,): None, (3,): None}
    proxy.feasible_share = {(0,): 1.0, (1,): 1.0, (2,): 1.0, (3,): 1.0}
    assert proxy.schedule() == [(0,), (1,), (2,), (3,)] * 4  # no bounds: the groups in turn, all the steps
    proxy.feasible_share = {(0,): 1.0, (1,): 0.5, (2,): 0.25, (3,): 0.0}
    plan = proxy.schedule()
    assert [plan.count((k,)) for k in range(4)] == [4, 2, 1, 0]
    assert (1,) in plan[:4] and (1,) in plan[4:]  # spread over the schedule, not bunched


def test_the_sandwich_rule_also_trains_each_groups_largest_arch(monkeypatch):
    """``sandwich: true``: every step also trains the group's supernet (its largest arch) on the same batch, so
    the shared weights move differently; off, the cache folder is the one runs made before the option existed."""
    import proxies.quality.supernet as supernet

    calls = []
    real = supernet.backward_batch
    monkeypatch.setattr(supernet, "backward_batch", lambda model, ctx, batch, *a: calls.append(
        (model, batch[0].sum().item())) or real(model, ctx, batch, *a))
    ctx = _bounded_context()
    arch = ctx.space.sample(random.Random(1))
    options = {"steps": 4, "eval_items": 8, "short_steps": 0, "split": ["down[0].resnets"]}
    plain = make_proxy("supernet", **options)
    without = plain(arch, ctx).score
    assert len(calls) == 4
    calls.clear()
    proxy = make_proxy("supernet", sandwich=True, **options)
    assert proxy(arch, ctx).score != without
    nets = set(map(id, proxy._nets.values()))
    assert len(calls) == 8 and [id(m) in nets for m, _ in calls] == [False, True] * 4
    assert all(calls[i][1] == calls[i + 1][1] for i in range(0, 8, 2))  # the same batch
    cached = replace(ctx, cache_dir=Path("c"))
    assert proxy.cache_folder(cached) != plain.cache_folder(cached)
