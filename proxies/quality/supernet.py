"""Few-shot weight-sharing supernet proxy: the space's archs share trained weights, each trial only evaluates.

One-time work (once per run, whatever the number of workers): the space is split into groups by the values of the
``split`` decisions (few-shot NAS: archs whose inheritance differs in kind, such as a down stage that keeps one
ResNet so that its up stage's skips shift, get their own supernet), plus every decision whose choices change a width
or the layout (channels, a mid-block upsampler), which no shared tensor could serve. ``split: auto`` (the default)
measures which ResNet counts damage inheritance (:meth:`Supernet._auto_split`) and splits on the worst as far as
``steps`` can feed the groups. Each group's supernet is its largest arch, initialised from the teacher as any
student is. Training draws one arch per step, the groups in turn and the arch uniformly inside its group; the arch
is built, inherits the teacher's weights and then uses the supernet's own tensors for every parameter the supernet
holds with the same shape (the module map of weight inheritance), so the step trains the shared weights with the
ground-truth protocol's loss and schedule (BK-SDM distillation from the teacher, AdamW, cosine with warm-up). What
the supernet cannot hold stays as inheritance left it, in training and in scoring alike.

Training covers the whole space (``train_on: space``, the default) even in a search whose cost constraints rule out
most of it (58% of uniform draws in the DeciDiffusion 1.0 experiment, 91% in 2.0): a small arch's shared weights
are trained by every larger arch that holds them, and without that they rank worse. ``train_on: feasible`` draws
only archs meeting the bounds the context carries (a search passes its experiment's), each group for the share of
its steps that falls on them (:meth:`Supernet.schedule`), so the one-time work shrinks by that share; measured on
the CPU tables (README, "Few-shot supernets") it ranked the archs meeting a MACs bound at Kendall tau 0-0.12
below whole-space training when half the table met it (never above), and 0.22-0.50 below when a quarter did. An
arch of a group with none of them is scored on the teacher's weights as inheritance gives them.

With a ``cache_dir`` in the context the state (weights, optimiser, random generators) is written atomically every
``checkpoint_every`` steps, a file lock makes the processes of one machine do the work once, and a killed run
resumes from its last checkpoint to the same weights bit for bit.

Per trial: build the arch, inherit from the teacher, copy in its group's shared weights, and take the held-out
loss on ``eval_items`` items (lower is better): one evaluation, no training. With ``short_steps`` (default 3) the
arch also inherits afresh and distils that many steps on its own, and the score is the shared-weight loss times
that short run's loss to the power ``short_weight``: the supernet says where training goes, the short run how much
of the damage inheritance did the arch has still to repair, which the ground truth (a few hundred steps from
inheritance) still carries and weight sharing, being trained far longer per weight, has repaired (:meth:`compute`).

Measured on the 64-arch tables of ``benchmarks/proxy_supernet.py`` (README, "Few-shot supernets").
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from proxies.cost import arch_costs
from search_spaces import ConfigError, UNetArch
from search_spaces.inherit import check_new_modules, inherit_weights, module_map, teacher_arch

from .base import QualityContext, QualityProxy, Report, evaluate
from .surrogate import _locked, arch_key
from .train import backward_batch, lr_factor, paired_stages, train

AUTO_DAMAGE = 0.1  # split: auto splits on ResNet counts whose removal raises the inherited loss >= 10.5%
GROUP_STEPS = 500  # ... while every group keeps this many training steps (8 groups of 250 ranked digits worse)
POOL = 1024  # archs sampled (or enumerated) once to find the groups and their largest archs
TRAIN_ON = ("feasible", "space")
MAX_TRIES = 1_000_000  # draws of the rejection sampler per training arch: the rarest trained group holds >= 1/POOL
BUILT = 64  # sub-models kept built during training (they hold only what the supernet cannot share)


@torch.no_grad()
def share_weights(student: nn.Module, supernet: nn.Module) -> tuple[int, int]:
    """Make ``student`` use ``supernet``'s parameter tensors wherever the inheritance module map pairs them and
    shapes agree; return (shared, total) parameter counts. Elsewhere the student keeps its own tensors."""
    mapping = module_map(teacher_arch(student), teacher_arch(supernet))
    theirs = dict(supernet.named_parameters())
    mine = dict(student.named_parameters())
    shared = 0
    for s_mod, t_mod in mapping.items():
        if t_mod is None:
            continue
        for name in [n for n in mine if n.startswith(s_mod + ".")]:
            source = theirs.get(t_mod + name[len(s_mod):])
            if source is not None and source.shape == mine[name].shape:
                owner, leaf = name.rsplit(".", 1)
                student.get_submodule(owner)._parameters[leaf] = source
                shared += source.numel()
    return shared, sum(p.numel() for p in mine.values())


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Supernet(QualityProxy):
    """Few-shot supernets trained once for ``steps`` arch-steps at peak ``lr`` (cosine after ``warmup``), split
    by the ``split`` decisions (``auto``, or names of the space's decisions, e.g. ``[down[1].resnets]``; widths and
    layouts are split on always); per trial the held-out loss of the arch's shared weights on ``eval_items``
    items, times the loss after ``short_steps`` steps of distillation from inheritance to the power
    ``short_weight`` (``short_steps: 0`` scores the shared weights alone). ``train_on``: the whole space or only
    the archs meeting the context's cost bounds (module docstring); ``sandwich``: each step also trains the
    group's supernet, its largest arch, on the same batch (the sandwich rule's largest half: twice the one-time
    work, and on the CPU tables no better, -0.03 to +0.01)."""

    kind = "supernet"

    def __init__(self, steps: int = 1000, lr: float = 1e-3, warmup: float = 0.1, split: str | list[str] = "auto",
                 eval_items: int = 64, checkpoint_every: int = 100, new_modules: str = "fresh",
                 max_groups: int | None = None, short_steps: int = 3, short_weight: float = 0.03,
                 short_eval_items: int = 16, short_lr: float = 5e-4, train_on: str = "space",
                 sandwich: bool = False):
        check_new_modules(new_modules)
        if not isinstance(sandwich, bool):
            raise ConfigError(f"must be true or false, got {sandwich!r}", field="sandwich")
        if train_on not in TRAIN_ON:
            raise ConfigError(f"must be one of {', '.join(TRAIN_ON)}, got {train_on!r}", field="train_on")
        if not _is_int(short_steps) or short_steps < 0:
            raise ConfigError(f"must be an integer >= 0, got {short_steps!r}", field="short_steps")
        if not isinstance(short_weight, int | float) or isinstance(short_weight, bool) or not short_weight >= 0 \
                or not math.isfinite(short_weight):
            raise ConfigError(f"must be a number >= 0, got {short_weight!r}", field="short_weight")
        if max_groups is not None and (not _is_int(max_groups) or max_groups < 1):
            raise ConfigError(f"must be an integer >= 1 (or left out), got {max_groups!r}", field="max_groups")
        for field, value, low in (("steps", steps, 1), ("eval_items", eval_items, 1),
                                  ("short_eval_items", short_eval_items, 1),
                                  ("checkpoint_every", checkpoint_every, 1)):
            if not _is_int(value) or value < low:
                raise ConfigError(f"must be an integer >= {low}, got {value!r}", field=field)
        for field, value in (("lr", lr), ("short_lr", short_lr)):
            if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
                raise ConfigError(f"must be a number > 0, got {value!r}", field=field)
        if not isinstance(warmup, int | float) or isinstance(warmup, bool) or not 0 <= warmup < 1:
            raise ConfigError(f"must be a fraction in [0, 1), got {warmup!r}", field="warmup")
        if split != "auto" and (isinstance(split, str) or not isinstance(split, list | tuple)
                                or not all(isinstance(s, str) for s in split) or len(set(split)) != len(split)):
            raise ConfigError(f"must be 'auto' or a list of distinct decision names, got {split!r}", field="split")
        self.options = {"steps": steps, "lr": float(lr), "warmup": float(warmup),
                        "split": split if split == "auto" else list(split),
                        "eval_items": eval_items, "new_modules": new_modules, "max_groups": max_groups}
        if sandwich:  # in the cache digest only when on: the folders of runs made before the option stay theirs
            self.options["sandwich"] = True
        self.train_on = train_on
        self.checkpoint_every = checkpoint_every
        # per trial, so not in the one-time work's cache digest
        self.short_steps, self.short_weight = short_steps, float(short_weight)
        self.short_eval_items = short_eval_items
        self.short_lr = float(short_lr)
        self.name = f"supernet{steps}"
        self.log: Any = None  # a callable the search sets: a line every checkpoint (the one-time work takes minutes)
        self._nets: dict[tuple, nn.Module] | None = None
        self._groups: dict[tuple, UNetArch] = {}
        self._split_idx: list[int] = []
        self.split_names: list[str] = []  # the decisions split on (``auto``: chosen by inheritance damage)
        self.split_damage: dict[str, float] = {}  # ``auto``: each ResNet-count decision's measured damage
        self.feasible_share: dict[tuple, float] = {}  # group -> share of its sampled archs meeting the cost bounds

    # ---- groups ----------------------------------------------------------------------------------------------

    def _split_decisions(self, space: Any, split: list[str]) -> list[int]:
        """Indices of the decisions that split the space: ``split``, and every width or layout choice."""
        names = [d.name for d in space.decisions]
        for i, name in enumerate(split):
            if name not in names:
                raise ConfigError(f"{name!r} is not a decision of the space (its decisions: {', '.join(names)})",
                                  field=f"split[{i}]")
        out = []
        for i, d in enumerate(space.decisions):
            layout = len(d.choices) > 1 and (d.name.endswith(".channels") or not all(map(_is_int, d.choices)))
            if d.name in split or layout:
                out.append(i)
        return out

    def check_space(self, space: Any) -> None:
        """Refuse a ``split`` naming no decision of ``space`` (before any work is done)."""
        self._split_decisions(space, [] if self.options["split"] == "auto" else self.options["split"])

    @staticmethod
    def _largest_code(space: Any) -> list[int]:
        """Every integer decision at its largest choice (the first choice elsewhere)."""
        return [max(range(len(d.choices)), key=lambda k, d=d: d.choices[k]) if _is_int(d.choices[0]) else 0
                for d in space.decisions]

    def _auto_split(self, ctx: QualityContext) -> list[str]:
        """The ResNet-count decisions whose smallest choice damages inheritance most, as many as the budget gives.

        Removing a ResNet shifts the skip connections its up stage receives, so the teacher's weights fit the
        shallower arch badly (held-out loss right after inheritance jumps), and archs on both sides of such a choice
        need different shared weights; a supernet shared across them underrates what the ResNet is worth (measured
        on digits and shapes2: ResNets not split on valued 3-6x too low, attention sized within 30%). Measured per
        decision: the largest arch and the same arch with that decision at its smallest choice, each inherited from
        the teacher and evaluated once; ``damage`` is the log ratio of their held-out losses. Decisions with damage
        >= ``AUTO_DAMAGE`` are split on, largest damage first, while every group keeps >= ``GROUP_STEPS`` steps (the
        width and layout groups count too) and, with ``max_groups`` (each group's supernet is a whole arch with its
        optimiser state: the memory bound at SD scale), the groups stay within it. Costs 1 + (ResNet-count
        decisions) evaluations."""
        space = ctx.space
        largest = self._largest_code(space)
        try:
            base = space.decode(largest, check=False)
        except (ConfigError, KeyError):
            return []
        if not space.contains(base):
            return []  # no single largest arch to measure against: no depth split
        evaluate_at = replace(ctx, eval_items=self.options["eval_items"])
        reference = math.log(evaluate(self._build(ctx, base), evaluate_at)["task_loss"])
        damage, sizes = {}, {}
        for i, d in enumerate(space.decisions):
            if not (d.name.endswith(".resnets") and len(d.choices) > 1 and all(map(_is_int, d.choices))):
                continue
            code = list(largest)
            code[i] = min(range(len(d.choices)), key=lambda k, d=d: d.choices[k])
            try:
                shallow = space.decode(code, check=False)
            except ConfigError:
                continue
            if space.contains(shallow):
                loss = evaluate(self._build(ctx, shallow), evaluate_at)["task_loss"]
                damage[d.name], sizes[d.name] = math.log(loss) - reference, len(d.choices)
        self.split_damage = damage
        groups = math.prod(len(space.decisions[i].choices) for i in self._split_decisions(space, []))
        chosen = []
        for name in sorted(damage, key=lambda n: -damage[n]):
            fits = groups * sizes[name] * GROUP_STEPS <= self.options["steps"] and (
                self.options["max_groups"] is None or groups * sizes[name] <= self.options["max_groups"])
            if damage[name] >= AUTO_DAMAGE and fits:
                chosen.append(name)
                groups *= sizes[name]
        return chosen

    def group_of(self, space: Any, arch: UNetArch) -> tuple:
        code = space.encode(arch)
        return tuple(code[i] for i in self._split_idx)

    def find_groups(self, ctx: QualityContext) -> dict[tuple, UNetArch]:
        """Group key -> the group's largest arch: every other decision at its largest value when that arch falls
        in the group, else the pool's member with the most parameters."""
        space = ctx.space
        split = self.options["split"]
        self.split_names = self._auto_split(ctx) if split == "auto" else list(split)
        self._split_idx = self._split_decisions(space, self.split_names)
        pool = space.enumerate() if space.cardinality() <= POOL else \
            [space.sample(random.Random(ctx.seed * 7919 + i)) for i in range(POOL)]
        members: dict[tuple, list[UNetArch]] = {}
        for a in pool:
            members.setdefault(self.group_of(space, a), []).append(a)
        accept = self._accept(ctx)
        self.feasible_share = {key: 1.0 if accept is None else sum(map(accept, group)) / len(group)
                               for key, group in members.items()}
        text_len = ctx.data.text.shape[1]
        largest = self._largest_code(space)
        out = {}
        for key in sorted(members):
            code = list(largest)
            for i, k in zip(self._split_idx, key, strict=True):
                code[i] = k
            try:
                big = space.decode(code, check=False)
                ok = space.contains(big) and self.group_of(space, big) == key
            except (ConfigError, KeyError):  # a key with a decision that does not apply (-1): no such code
                ok = False
            if not ok:
                big = max(members[key], key=lambda a: arch_costs(a, batch=1, text_len=text_len).params)
            out[key] = big
        self._groups = out  # what :meth:`schedule` divides the steps among
        return out

    # ---- one-time work ---------------------------------------------------------------------------------------

    def _accept(self, ctx: QualityContext) -> Any:
        """The predicate training draws must meet (None: every arch of the space)."""
        return ctx.feasible if self.train_on == "feasible" else None

    def cache_folder(self, ctx: QualityContext) -> Path | None:
        if ctx.cache_dir is None:
            return None
        # scoring does not change the supernets; an unset max_groups keeps the folders of runs made before it, and
        # so does training on the whole space (no bounds, or train_on: space): it trains what they trained
        trained = {k: v for k, v in self.options.items()
                   if k != "eval_items" and not (k == "max_groups" and v is None)}
        if self._accept(ctx) is not None:
            trained["feasible"] = ctx.feasible_label
        digest = hashlib.sha1(json.dumps({**trained, "seed": ctx.seed}, sort_keys=True).encode())
        return Path(ctx.cache_dir) / "supernet" / f"{self.name}-{digest.hexdigest()[:8]}"

    def fit(self, ctx: QualityContext) -> dict[tuple, nn.Module]:
        """The trained supernets (the one-time work on first use in this process; from the cache when done)."""
        if self._nets is not None:
            return self._nets
        if ctx.space is None:
            raise ConfigError("the supernet proxy needs the search space to build its supernets", field="space")
        if ctx.teacher is None:
            raise ConfigError("the supernet proxy inherits from and distils a teacher", field="teacher")
        self._groups = self.find_groups(ctx)
        if self.log is not None:
            damage = ", ".join(f"{k} {v:+.2f}" for k, v in self.split_damage.items())
            split = self.split_names or "widths and layouts only"
            self.log(f"{self.name}: {len(self._groups)} group(s), split on {split}"
                     + (f" (inheritance damage, log loss: {damage})" if damage else ""))
            if self._accept(ctx) is not None:
                bounds = ctx.feasible_label or "the cost bounds"
                trained = [k for k in self._groups if self.feasible_share[k] > 0]
                self.log(f"{self.name}: training on the archs meeting {bounds} ({len(trained)} of "
                         f"{len(self._groups)} group(s) hold some): {len(self.schedule())} of "
                         f"{self.options['steps']} arch-steps" if trained else
                         f"{self.name}: no sampled arch meets {bounds}; training on the whole space")
        folder = self.cache_folder(ctx)
        if folder is None:
            self._nets = self._train(ctx, None)
        else:
            with _locked(folder / ".lock"):
                self._nets = self._train(ctx, folder / "state.pt")
        return self._nets

    def trained_groups(self) -> list[tuple]:
        """The groups that get training steps: those with a sampled arch meeting the bounds (every group when none
        has one: then the bounds are not honoured, and the log says so)."""
        keys = sorted(k for k in self._groups if self.feasible_share.get(k, 1.0) > 0)
        return keys or sorted(self._groups)

    def schedule(self) -> list[tuple]:
        """The group of each training step. On the whole space, ``steps`` in all, the groups in turn. Under cost
        bounds, each group's share of ``steps`` times the share of its archs meeting them (at least one step), so
        that an arch meeting them is drawn as often as on the whole space; the groups interleaved in proportion
        (smooth weighted round robin), so that every group sees the whole learning-rate schedule."""
        keys, steps = self.trained_groups(), self.options["steps"]
        if all(self.feasible_share.get(k, 1.0) >= 1.0 for k in keys) or not any(
                self.feasible_share.get(k, 1.0) > 0 for k in keys):
            return [keys[i % len(keys)] for i in range(steps)]
        quota = {k: max(1, round(steps / len(self._groups) * self.feasible_share[k])) for k in keys}
        total = sum(quota.values())
        done = dict.fromkeys(keys, 0)
        out = []
        for i in range(total):
            key = max(keys, key=lambda k: quota[k] * (i + 1) / total - done[k])
            done[key] += 1
            out.append(key)
        return out

    def _build(self, ctx: QualityContext, arch: UNetArch) -> nn.Module:
        model = ctx.build(arch)
        inherit_weights(model, ctx.teacher, new=self.options["new_modules"])
        return model

    def _train(self, ctx: QualityContext, state_path: Path | None) -> dict[tuple, nn.Module]:
        o = self.options
        keys = self.trained_groups()
        accept = self._accept(ctx) if any(self.feasible_share.get(k, 1.0) > 0 for k in keys) else None
        plan = self.schedule()
        nets = {k: self._build(ctx, self._groups[k]) for k in keys}
        params = [p for k in keys for p in nets[k].parameters()]
        opt = torch.optim.AdamW(params, lr=o["lr"], weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i, len(plan), "cosine", o["warmup"]))
        rng = random.Random(ctx.seed)
        gen = torch.Generator().manual_seed(ctx.seed)
        step = 0
        if state_path is not None and state_path.is_file():
            state = torch.load(state_path, map_location=ctx.device, weights_only=True)
            for k in keys:
                nets[k].load_state_dict(state["nets"][str(list(k))])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            rng.setstate(_tuple(state["rng"]))
            gen.set_state(state["generator"])
            step = state["step"]
        space = ctx.space
        models: OrderedDict[str, tuple[nn.Module, list]] = OrderedDict()
        ctx.teacher.eval().requires_grad_(False)
        largest = {k: paired_stages(nets[k], ctx.teacher) for k in keys} if o.get("sandwich") else {}
        while step < len(plan):
            key = plan[step]
            arch = space.sample(rng, max_tries=MAX_TRIES, accept=lambda a, key=key: self.group_of(space, a) == key
                                and (accept is None or accept(a)))
            if arch_key(arch) not in models:
                model = self._build(ctx, arch)
                share_weights(model, nets[key])
                shared = {id(p) for p in nets[key].parameters()}
                for p in model.parameters():
                    p.requires_grad_(id(p) in shared)  # the rest stays as inheritance left it, as when scored
                models[arch_key(arch)] = (model, paired_stages(model, ctx.teacher))
                if len(models) > BUILT:
                    models.popitem(last=False)
            models.move_to_end(arch_key(arch))
            model, pairs = models[arch_key(arch)]
            opt.zero_grad(set_to_none=True)
            model.train()
            batch = ctx.batch(gen)
            total = backward_batch(model, ctx, batch, ctx.teacher, pairs)
            if largest:  # the sandwich rule's largest arch: the group's supernet itself, on the same batch
                backward_batch(nets[key], ctx, batch, ctx.teacher, largest[key])
            opt.step()
            sched.step()
            if not torch.isfinite(torch.tensor(total)):
                raise FloatingPointError(f"supernet training loss became {total} at step {step + 1}")
            step += 1
            if step % self.checkpoint_every == 0 or step == len(plan):
                if state_path is not None:
                    self._save(state_path, nets, opt, sched, rng, gen, step)
                if self.log is not None:
                    self.log(f"{self.name}: {len(nets)} supernet(s), step {step}/{len(plan)}, loss {total:.4f}")
        for net in nets.values():
            net.eval().requires_grad_(False)
        return nets

    @staticmethod
    def _save(path: Path, nets: dict, opt: Any, sched: Any, rng: random.Random, gen: torch.Generator,
              step: int) -> None:
        state = {"nets": {str(list(k)): net.state_dict() for k, net in nets.items()}, "optimizer": opt.state_dict(),
                 "scheduler": sched.state_dict(), "rng": _lists(rng.getstate()), "generator": gen.get_state(),
                 "step": step, "saved_at": time.time()}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            torch.save(state, tmp)
            os.replace(tmp, path)  # a kill leaves the previous checkpoint whole
        except BaseException:
            # a full disk (at SD scale a checkpoint is ~12 bytes per supernet parameter, and the next is written
            # beside the last) must not leave a partial file that holds the space the rerun needs
            tmp.unlink(missing_ok=True)
            raise

    # ---- per trial -------------------------------------------------------------------------------------------

    def compute(self, arch: UNetArch, ctx: QualityContext, report: Report | None) -> tuple[float, dict[str, Any]]:
        nets = self.fit(ctx)
        key = self.group_of(ctx.space, arch)
        if key not in self._groups:
            raise ConfigError(f"the arch falls in no supernet group ({key}); is it of the search space?",
                              field="arch")
        at = replace(ctx, eval_items=self.options["eval_items"])
        model = self._build(ctx, arch)
        if key in nets:  # the shared weights: the same module map and shapes as in training
            inherit_weights(model, nets[key])
        # else no arch meeting the bounds falls in its group: untrained, that group's supernet is the teacher's weights
        loss = evaluate(model, at)["task_loss"]
        details: dict[str, Any] = {"group": list(key), "group_trained": key in nets, "shared_loss": loss}
        if not (self.short_steps and self.short_weight):
            return loss, details
        # Why a short run as well: the ground truth is a few hundred steps from inheritance, so it still carries
        # part of the damage inheritance did, and that part interacts with the rest of the arch (digits: a second
        # attention in the middle up stage hurts at 200 steps when its down stage keeps one ResNet, helps when it
        # keeps two). A supernet trains each shared weight far longer than that and has repaired it, so its scores
        # are additive over the decisions; the loss after a few steps from inheritance is what is left. Measured
        # on the four validated runs (README, "Few-shot supernets"; the defaults): 0.03 ranks every run and seed
        # at >= 0.87; weights 0.02-0.04 do as well, and at 0.05 shapes2 seed 1's worst seed falls to 0.74 (the
        # short run, weighed too much, starts to reorder the groups inheritance damages). Chosen on those runs,
        # not out of sample.
        short_loss = details["short_loss"] = self.short_run(arch, ctx)
        return loss * short_loss ** self.short_weight, details

    def short_run(self, arch: UNetArch, ctx: QualityContext) -> float:
        """The held-out loss on ``short_eval_items`` items after ``short_steps`` distillation steps from inheritance
        (BK-SDM's loss at the constant rate ``short_lr``, the context's data order): the first steps of the
        ``distill`` proxy's run at its default rate."""
        at = replace(ctx, eval_items=self.short_eval_items)
        model = self._build(ctx, arch)
        train(model, at, self.short_steps, lr=self.short_lr, teacher=ctx.teacher)
        return evaluate(model, at)["task_loss"]


def _lists(value: Any) -> Any:
    """``random.Random`` state as nested lists (what a weights-only checkpoint can hold)."""
    return [_lists(v) for v in value] if isinstance(value, tuple) else value


def _tuple(value: Any) -> Any:
    return tuple(_tuple(v) for v in value) if isinstance(value, list) else value
