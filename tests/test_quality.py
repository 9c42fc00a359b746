"""Quality proxies on tiny archs: every proxy runs, is deterministic, and the KD proxy ranks sensibly."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from proxies.data import digits_cache
from proxies.quality import QualityContext, evaluate, make_proxy
from proxies.quality.train import train
from search_spaces import ConfigError, UNetArch, get_arch

PRUNED = {  # the digits teacher cut to the bone: two stages, one ResNet each side, no attention, no mid block
    "name": "pruned", "sample_size": 8, "in_channels": 1, "out_channels": 1, "cross_attention_dim": 16,
    "norm_num_groups": 8, "time_embedding_dim": 64,
    "down": [{"channels": 16, "resnets": 1, "downsample": True}, {"channels": 32, "resnets": 1}],
    "mid": None,
    "up": [{"channels": 32, "resnets": 2, "upsample": True}, {"channels": 16, "resnets": 2}],
}


@pytest.fixture(scope="module")
def ctx():
    torch.set_num_threads(1)
    context = QualityContext(data=digits_cache(), seed=0, batch_size=32, eval_items=64, eval_timesteps=4)
    teacher = context.build(get_arch("digits"))
    train(teacher, context, 40, lr=2e-3)
    context.teacher = teacher.eval()
    return context


NEAR_TEACHER = get_arch("digits").to_dict()
NEAR_TEACHER["up"][2]["attentions"] = 0  # drop one attention


@pytest.mark.parametrize("name,options", [
    ("grad_norm", {}), ("snip", {}), ("synflow", {}), ("jacob_cov", {"batch": 8}),
    ("distill", {"steps": 0}), ("distill", {"steps": 3, "metric": "task"}),
    ("distill", {"steps": 4, "metric": "task", "schedule": "cosine", "lr": 2e-3}),
    ("short_train", {"steps": 3, "eval_every": 1}), ("short_train", {"steps": 2, "init": "inherit"}),
])
def test_every_proxy_scores_and_is_deterministic(ctx, name, options):
    arch = UNetArch.from_dict(NEAR_TEACHER)
    proxy = make_proxy(name, **options)
    first, second = proxy(arch, ctx), proxy(arch, ctx)
    assert math.isfinite(first.score) and first.seconds > 0
    assert first.score == second.score
    assert proxy.kind in ("zero_cost", "distill", "short_train")


def test_kd_proxy_ranks_near_teacher_above_pruned(ctx):
    proxy = make_proxy("distill", steps=0)
    near = proxy(UNetArch.from_dict(NEAR_TEACHER), ctx)
    pruned = proxy(UNetArch.from_dict(PRUNED), ctx)
    assert near.score < pruned.score
    assert near.details["new_params"] == 0 < pruned.details["inherited_params"]
    identical = proxy(get_arch("digits"), ctx)
    assert identical.score == 0.0  # the teacher itself: nothing to distil


def test_cosine_distill_differs_from_constant_and_ends_at_rate_zero(ctx):
    """The schedule reaches the optimiser: a cosine run is not the constant-rate run of the same steps."""
    arch = UNetArch.from_dict(PRUNED)
    constant = make_proxy("distill", steps=4, lr=2e-3, metric="task")(arch, ctx)
    cosine = make_proxy("distill", steps=4, lr=2e-3, metric="task", schedule="cosine")(arch, ctx)
    assert cosine.score != constant.score and make_proxy("distill", schedule="cosine").name.endswith("_cosine")


def test_short_train_reports_and_stops_early(ctx):
    seen = []

    def report(step: int, value: float) -> bool:
        seen.append((step, value))
        return step >= 2

    result = make_proxy("short_train", steps=10, eval_every=1)(get_arch("digits"), ctx, report)
    assert [s for s, _ in seen] == [1, 2] and result.details["stopped_at"] == 2


def test_micro_batches_and_checkpointing_give_the_same_step(ctx):
    arch = UNetArch.from_dict(PRUNED)
    models, losses = [], []
    for micro, ckpt in ((None, False), (8, False), (8, True)):
        c = QualityContext(data=ctx.data, seed=0, batch_size=32, micro_batch=micro, gradient_checkpointing=ckpt)
        m = c.build(arch)
        losses.append(train(m, c, 1, lr=1e-3)["losses"][0])
        models.append(m)
    assert losses[1] == pytest.approx(losses[0], rel=1e-5) and losses[2] == pytest.approx(losses[0], rel=1e-5)
    whole = evaluate(models[0], ctx, teacher=ctx.teacher)  # evaluation in micro-batches: the same figures
    chunked = evaluate(models[0], replace(ctx, micro_batch=24), teacher=ctx.teacher)  # 64 items: 24 + 24 + 16
    assert chunked["task_loss"] == pytest.approx(whole["task_loss"], rel=1e-5)
    assert chunked["kd_loss"] == pytest.approx(whole["kd_loss"], rel=1e-5)
    # Adam's first step is about lr * sign(grad): rounding may flip a near-zero gradient's sign, so compare the
    # updated weights on average rather than element by element
    ref = torch.cat([p.detach().flatten() for p in models[0].parameters()])
    for other in models[1:]:
        diff = (ref - torch.cat([p.detach().flatten() for p in other.parameters()])).abs()
        assert diff.mean() < 1e-6 and diff.max() <= 2.5e-3


def test_proxy_errors_are_clear(ctx):
    with pytest.raises(ConfigError, match="unknown quality proxy"):
        make_proxy("magic")
    with pytest.raises(ConfigError, match="metric"):
        make_proxy("distill", metric="fid")
    for options, field in (({"schedule": "step"}, "schedule"), ({"warmup": 1.0}, "warmup"), ({"lr": -1}, "lr"),
                           ({"steps": 2.5}, "steps")):
        with pytest.raises(ConfigError) as exc:
            make_proxy("distill", **options)
        assert exc.value.field == field
    no_teacher = QualityContext(data=ctx.data)
    with pytest.raises(ConfigError, match="needs a teacher"):
        make_proxy("distill")(get_arch("digits"), no_teacher)
    with pytest.raises(ConfigError, match="channels"):
        make_proxy("grad_norm")(get_arch("tiny"), ctx)


def test_bf16_mixed_precision_runs_every_proxy_under_autocast(ctx):
    """``mixed_precision="bf16"``: the same proxy, deterministic, close to fp32 but not equal to it (autocast is on);
    SynFlow's float64 is left alone; the weights stay fp32."""
    arch = UNetArch.from_dict(NEAR_TEACHER)
    bf16 = replace(ctx, mixed_precision="bf16")
    proxy = make_proxy("distill", steps=2, metric="task")
    fp32, first, second = proxy(arch, ctx), proxy(arch, bf16), proxy(arch, bf16)
    assert first.score == second.score and first.score != fp32.score
    assert first.score == pytest.approx(fp32.score, rel=0.05)
    synflow = make_proxy("synflow")
    assert synflow(arch, bf16).score == synflow(arch, ctx).score
    with bf16.autocast():
        assert torch.is_autocast_enabled("cpu")
    assert next(bf16.build(arch).parameters()).dtype == torch.float32
    with pytest.raises(ConfigError) as exc:
        QualityContext(data=ctx.data, mixed_precision="fp8")
    assert exc.value.field == "mixed_precision"


def test_the_teachers_evaluation_outputs_are_reused_until_its_weights_change(ctx):
    """The teacher's outputs on the fixed evaluation grid are computed once per context and grid: the same kd loss
    as a context without them, no teacher forward the second time, and a fresh forward once its weights move."""
    import copy

    teacher = copy.deepcopy(ctx.teacher)
    c = replace(ctx, teacher=teacher, teacher_outputs={})
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    model = c.build(UNetArch.from_dict(PRUNED))
    first = evaluate(model, c, teacher=teacher)
    n_first = len(calls)
    again = evaluate(model, c, teacher=teacher)
    assert n_first == c.eval_timesteps and len(calls) == n_first  # none the second time
    assert again == first == evaluate(model, replace(c, teacher_outputs={}), teacher=teacher)
    other_grid = evaluate(model, replace(c, eval_items=16), teacher=teacher)  # another grid: its own outputs
    assert len(calls) == 3 * n_first and other_grid["kd_loss"] != first["kd_loss"]
    with torch.no_grad():
        next(teacher.parameters()).add_(0.01)
    moved = evaluate(model, c, teacher=teacher)
    assert len(calls) == 4 * n_first and moved["kd_loss"] != first["kd_loss"]
    assert moved["task_loss"] == first["task_loss"]
