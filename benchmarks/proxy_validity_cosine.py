"""A ground truth validated against 5x longer training, its repeat noise, and the multi-fidelity surrogate.

The ground-truth protocol is :func:`proxies.quality.fidelity.full_fidelity`: the teacher's weights, BK-SDM's
distillation loss, ``--gt-steps`` AdamW steps on a cosine schedule with 10% warm-up that decays to zero, then
the held-out loss on the whole validation split over 20 timesteps.

1. Teacher and space of ``--benchmark`` as in ``proxy_validity.py`` (same seed, same 24 random test archs).
2. ``--validate`` archs spread over the space (the surrogate's own farthest-point design, both kinds of arch
   included): ground truth, and the same protocol at ``--long-factor`` x the steps. Kendall tau between the two
   rankings is ``ground_truth_validity_tau``.
3. Repeat noise: the first ``--repeat`` design archs again with another data-order seed; the per-run noise, the
   share of arch pairs whose difference is within noise, and the tau two repeat ground truths would reach. The
   first ``--long-repeat`` design archs' 5x runs are repeated the same way: the 5x ranking's own noise, and with
   it the validity a ground truth could show if its order were the 5x order (``ground_truth_validity_ceiling``).
4. Every arch's cheap features (inheritance plus 20 distillation steps, held-out loss at 0/5/10/20).
5. Proxies on the test archs only (never an anchor): MACs, params, ``distill_task@K``, and the surrogate fitted
   on the first n design archs' ground truth (its one-time cost, n ground-truth runs, divided by 200 trials and
   added to the per-arch cost), for several n, K and feature sets; also an additive model on the arch encoding.

Every run is cached in a work folder as it finishes, so a cut-off run keeps its data. ``--part all`` works
through every job (design archs, test archs, repeats, 5x runs), each claimed under a lock, so several
single-threaded processes on one work folder share the list; ``--part main``/``design``/``long`` run parts
alone; ``--part validity`` runs the ground truth's validity study alone (design archs at 1x and 5x, repeats of
both, optionally ``--mid-steps``; ``--spread N`` adds N archs picked over the range of quality, see
:func:`spread_archs`), ``--part signals`` every validity arch's cheap signals, and ``--part validity-report``
writes it to ``proxy_gt_validity_BENCHMARK_seedN.json``;
``--new-modules identity`` starts what the teacher lacks as the identity in every run (ground truth and
proxies, work folder ``..._identity``), ``--part proxies`` runs what ``proxy_identity_init.py`` compares (the
design archs' jobs and the test archs' proxies, no test ground truth) and ``--teacher-from`` copies another work
folder's teacher; ``--part report`` analyses whatever is finished; ``--part table-validity`` (with ``--tests table``)
trains ``--table-validity`` random archs of the table itself at 5x and ``--part table-validity-report`` writes that
validity test to ``proxy_gt_validity_table_<run>.json`` (:mod:`proxy_validity_table`). ``--tests table``:
the test archs are every arch of the benchmark's 64-arch sub-space of :func:`table_space` (the search-quality study's
table; results file suffixed ``_table`` except on digits) instead of ``--archs`` random ones; each test and design
arch also gets the short cosine runs of ``short_cosine_runs`` (4% and 8% of ``--gt-steps``). ``--device cuda`` trains
every run on a GPU: the 5x test of a 1,000-step ground truth (5,000-step runs) takes 12-35 minutes of one CPU core per
arch; the GPU trains its own teacher in its own work folder (``..._cuda``), and several processes share one GPU as
they share the CPU.

    python benchmarks/proxy_validity_cosine.py --part all & python benchmarks/proxy_validity_cosine.py --part all
    python benchmarks/proxy_validity_cosine.py --part report

Writes ``benchmarks/results/proxy_validity_cosine[_seedN].json``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import random
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from common import teacher_suffix
from proxy_validity import LR
from proxy_validity_report import short_cosine_runs
from proxy_validity_spread import SPREAD_SIGNAL, pick_spread, spread_pool

from proxies.benchmark import BENCHMARKS, TEACHER_STEPS, get_benchmark
from proxies.quality import QualityContext
from proxies.quality.fidelity import cheap_features, full_fidelity
from proxies.quality.surrogate import arch_key, design
from proxies.quality.train import train
from search_spaces import UNetArch, get_arch
from search_spaces.checkpoints import load_unet, save_pretrained
from search_spaces.space import SearchSpace
from search_spaces.yamlio import atomic_write

CHECKPOINTS = (5, 10, 20)
TRIALS = 200  # one-time costs are divided by this many trials
SHORT_EVAL_ITEMS = 64


def table_space(benchmark: str = "digits") -> dict:
    """The 64-arch sub-space of ``benchmark``'s space whose every arch gets the ground truth (the search-quality
    study), everything not listed at the teacher's choice. digits: the three down stages' ResNet counts (the first
    breaks inheritance at 1), the mid block's, and attention in the last two up stages. shapes and shapes2 (one
    space): the ResNet counts of the second and third down stages (the second breaks inheritance at 1: held-out
    loss 0.44-0.48 right after inheritance on shapes2 seed 1, against 0.12-0.28) and of the mid block, the mid block's
    attention, a second attention in the first up stage (a module the teacher lacks) and the second up stage's."""
    import yaml

    from search_spaces import space_path

    base = "shapes" if benchmark in ("shapes", "shapes2") else benchmark
    if base not in ("digits", "shapes"):
        raise ValueError(f"no table sub-space for benchmark {benchmark!r}")
    data = yaml.safe_load(space_path(base).read_text())
    data["name"] = f"{base}_table"
    data["stages"] = [3]
    data["down"][0]["attentions"] = 0
    if base == "digits":
        data["down"][1]["attentions"] = 1
        data["mid"].update(resnets=[1, 2], attentions=1, upsample=False)
        data["up"][0]["attentions"] = 1
        data["up"][1]["attentions"] = [1, 2]
        return data
    data["down"][1].update(resnets=[1, 2], attentions=1)
    data["down"][2].update(resnets=[1, 2], attentions=1)
    data["mid"].update(resnets=[1, 2], attentions=[0, 1], upsample=False)
    data["up"][0]["attentions"] = [1, 2]
    data["up"][1]["attentions"] = [0, 1]
    data["up"][2]["attentions"] = 0
    return data


def cached(path: Path, make) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    value = make()
    atomic_write(path, json.dumps(value, indent=1) + "\n")
    return value


def setup(args) -> tuple[QualityContext, SearchSpace, list[UNetArch], list[UNetArch]]:
    """The context with its teacher (trained once, cached), the space, the design archs and the test archs
    (``--archs`` random ones, or with ``--tests table`` every arch of :func:`table_space`)."""
    bench = get_benchmark(args.benchmark, seed=0)
    data = bench.data
    ctx = QualityContext(data=data, seed=args.seed, batch_size=64, eval_items=128, device=args.device)
    saved = args.work / "teacher"
    args.work.mkdir(parents=True, exist_ok=True)
    with open(args.work / "teacher.lock", "a") as lock:  # one process trains it, the others wait and load it
        fcntl.flock(lock, fcntl.LOCK_EX)
        source = getattr(args, "teacher_from", None)
        if not (saved / "config.json").is_file() and source is not None:  # another run's teacher, bit for bit
            save_pretrained(load_unet(source / "teacher"), saved)
        if not (saved / "config.json").is_file():  # every process then loads the saved one: the same teacher
            print(f"training the teacher ({args.teacher_steps} steps)...", flush=True)
            teacher = ctx.build(get_arch(bench.teacher), seed=args.seed)
            train(teacher, ctx, args.teacher_steps, lr=LR, seed=args.seed)
            save_pretrained(teacher, saved)
        fcntl.flock(lock, fcntl.LOCK_UN)
    ctx.teacher = load_unet(saved).to(args.device).eval()
    ctx.new_modules = args.new_modules
    ctx.batch_size = args.batch  # the teacher as in proxy_validity.py; students train on batches of --batch
    space = SearchSpace.from_yaml(bench.space)
    ctx.space = space
    rng = random.Random(args.seed)  # the very archs of proxy_validity.py
    tests: list[UNetArch] = []
    if args.tests == "table":
        tests = SearchSpace(table_space(args.benchmark)).enumerate()
    while len(tests) < args.archs and args.tests == "random":
        a = space.sample(rng)
        if a not in tests:
            tests.append(a)
    anchors = design(space, args.validate, args.seed, text_len=data.text.shape[1])
    return ctx, space, anchors, tests


def gt(args, ctx, arch, steps, data_seed) -> dict:
    path = args.work / f"gt-{arch_key(arch)}-{steps}-{data_seed}.json"
    return cached(path, lambda: {"arch": arch.to_dict(),
                                 **full_fidelity(arch, ctx, steps, lr=args.gt_lr, seed=data_seed,
                                                 distill=args.gt_loss == "bksdm")})


def features(args, ctx, arch) -> dict:
    def make():
        f = cheap_features(arch, ctx, max(CHECKPOINTS), eval_items=args.feature_eval_items, checkpoints=CHECKPOINTS)
        t = time.perf_counter()  # one held-out evaluation's cost, to price each K as if measured alone
        cheap_features(arch, ctx, 0, eval_items=args.feature_eval_items)
        f["eval_seconds"] = time.perf_counter() - t
        return {"arch": arch.to_dict(), **f}
    return cached(args.work / f"feat-{arch_key(arch)}.json", make)


def short_cosine(args, ctx, arch) -> dict:
    """The ground-truth protocol at ``k`` steps and a small evaluation, for every (k, lr) of
    :func:`short_cosine_runs` of this ground truth's length."""
    out = {}
    for k, lr in short_cosine_runs(args.gt_steps):
        path = args.work / f"cos-{arch_key(arch)}-{k}-{lr:g}.json"
        out[f"cosine@{k}/lr{lr:g}"] = cached(path, lambda k=k, lr=lr: full_fidelity(
            arch, ctx, k, lr=lr, seed=args.seed, eval_items=SHORT_EVAL_ITEMS, distill=args.gt_loss == "bksdm"))
    return out


@contextmanager
def claim(args, name: str):
    """True when this process may do job ``name``: it holds the job's lock (released by the OS if it dies), so
    two processes sharing the work folder never run the same job."""
    path = args.work / "claims" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_proxies(args) -> None:
    """The proxies' runs without the test archs' ground truths: every design arch's ground truth, features and
    short cosine runs (the surrogates' anchors), then every test arch's features and short cosine runs, each
    claimed. What ``proxy_identity_init.py`` needs of an identity run: it judges the test archs by the fresh
    run's ground truth (``--teacher-from`` that run's work folder gives both the same teacher)."""
    ctx, _, anchors, tests = setup(args)
    jobs = [(f"design-{i}", lambda a=a: (gt(args, ctx, a, args.gt_steps, args.seed), features(args, ctx, a),
                                          short_cosine(args, ctx, a))) for i, a in enumerate(anchors)]
    jobs += [(f"proxies-{i}", lambda a=a: (features(args, ctx, a), short_cosine(args, ctx, a)))
             for i, a in enumerate(tests)]
    run_claimed(args, jobs)


def run_claimed(args, jobs: list[tuple[str, Any]]) -> None:
    """Each (name, job) whose claim this process gets, in order; another process sharing the work folder takes
    the others."""
    for name, job in jobs:
        with claim(args, name) as mine:
            if mine:
                t = time.perf_counter()
                job()
                print(f"{name}: {time.perf_counter() - t:.0f}s", flush=True)


def run_all(args) -> None:
    """Every job of the run in priority order, each claimed so that several processes share the list."""
    ctx, _, anchors, tests = setup(args)
    jobs = [(f"design-{i}", lambda a=a: (gt(args, ctx, a, args.gt_steps, args.seed), features(args, ctx, a),
                                          short_cosine(args, ctx, a))) for i, a in enumerate(anchors)]
    jobs += [(f"test-{i}", lambda a=a: (gt(args, ctx, a, args.gt_steps, args.seed), features(args, ctx, a),
                                        short_cosine(args, ctx, a))) for i, a in enumerate(tests)]
    jobs += [(f"repeat-{i}", lambda a=a: gt(args, ctx, a, args.gt_steps, args.seed + 1000))
             for i, a in enumerate(anchors[: args.repeat])]
    jobs += [(f"long-{i}", lambda a=a: gt(args, ctx, a, args.gt_steps * args.long_factor, args.seed))
             for i, a in enumerate(anchors)]
    jobs += [(f"long-repeat-{i}", lambda a=a: gt(args, ctx, a, args.gt_steps * args.long_factor, args.seed + 1000))
             for i, a in enumerate(anchors[: args.long_repeat])]
    run_claimed(args, jobs)


def group(arch: UNetArch) -> str:
    """``broken``: the first down stage keeps one ResNet, so the last up stage loses one and its skip."""
    return "broken" if arch.down[0].resnets == 1 else "kept"


def run_main(args) -> None:
    ctx, _, anchors, tests = setup(args)
    for i, a in enumerate(anchors):
        g = gt(args, ctx, a, args.gt_steps, args.seed)
        features(args, ctx, a)
        print(f"design {i}: {group(a)} gt {g['task_loss']:.4f} ({g['seconds']:.0f}s)", flush=True)
    for i, a in enumerate(anchors[: args.repeat]):
        g = gt(args, ctx, a, args.gt_steps, args.seed + 1000)
        print(f"repeat {i}: gt {g['task_loss']:.4f}", flush=True)
    for i, a in enumerate(tests):
        g = gt(args, ctx, a, args.gt_steps, args.seed)
        f = features(args, ctx, a)
        print(f"test {i}: {group(a)} gt {g['task_loss']:.4f} loss@20 {f['loss@K']:.4f} ({g['seconds']:.0f}s)",
              flush=True)


def run_design(args) -> None:
    """Ground truth, features and short cosine runs of some design archs, then repeats of some (a helper beside
    ``main``; with ``--gt-steps`` it also completes the design archs' ``signals_vs_longest`` of the validity report)."""
    ctx, _, anchors, _ = setup(args)
    for i in args.indices or range(len(anchors)):
        g = gt(args, ctx, anchors[i], args.gt_steps, args.seed)
        features(args, ctx, anchors[i])
        short_cosine(args, ctx, anchors[i])
        print(f"design {i}: {group(anchors[i])} gt {g['task_loss']:.4f} ({g['seconds']:.0f}s)", flush=True)
    for i in args.repeat_indices or ():
        g = gt(args, ctx, anchors[i], args.gt_steps, args.seed + 1000)
        print(f"repeat {i}: gt {g['task_loss']:.4f}", flush=True)


def run_validity(args) -> None:
    """The ground truth's validity study alone, on this machine's teacher: the design archs at ``--gt-steps``
    and at ``--long-factor`` x, then the first ``--long-repeat`` 5x runs and the first ``--repeat`` ground
    truths again under another data-order seed, then every design arch at ``--mid-steps`` (does a longer ground
    truth move towards the 5x order?). Jobs are claimed, so several processes share the list."""
    ctx, space, anchors, _ = setup(args)
    long_steps = args.gt_steps * args.long_factor
    jobs = [(f"validity-gt-{i}", a, args.gt_steps, args.seed) for i, a in enumerate(anchors)]
    jobs += [(f"validity-long-{i}", a, long_steps, args.seed) for i, a in enumerate(anchors)]
    jobs += [(f"validity-long-repeat-{i}", a, long_steps, args.seed + 1000)
             for i, a in enumerate(anchors[: args.long_repeat])]
    jobs += [(f"validity-repeat-{i}", a, args.gt_steps, args.seed + 1000) for i, a in enumerate(anchors[: args.repeat])]
    jobs += [(f"validity-mid-{i}", a, args.mid_steps, args.seed) for i, a in enumerate(anchors) if args.mid_steps]
    run_jobs(args, ctx, jobs)
    if args.spread:
        spread = spread_archs(args, ctx, space, anchors)
        run_jobs(args, ctx, [(f"validity-spread-gt-{i}", a, args.gt_steps, args.seed) for i, a in enumerate(spread)]
                 + [(f"validity-spread-long-{i}", a, long_steps, args.seed) for i, a in enumerate(spread)])


def run_table_validity(args) -> None:
    """The ground truth's validity on the table itself (``--tests table``): ``--table-validity`` table archs drawn
    at random (:func:`proxy_validity_table.table_validity_archs`), each at the ground truth's length (the table's
    own run, cached) and at ``--long-factor`` x, then its cheap signals, then the first ``--table-repeat`` of them
    at both lengths under another data-order seed; claimed, so several processes share them."""
    from proxy_validity_table import table_validity_archs

    ctx, _, anchors, tests = setup(args)
    drawn = table_validity_archs(tests, anchors, args.table_validity, args.seed)
    long_steps = args.gt_steps * args.long_factor
    run_jobs(args, ctx, [(f"table-validity-gt-{arch_key(a)}", a, args.gt_steps, args.seed) for a in drawn]
             + [(f"table-validity-long-{arch_key(a)}", a, long_steps, args.seed) for a in drawn])
    run_claimed(args, [(f"table-validity-signals-{arch_key(a)}", lambda a=a: (features(args, ctx, a),
                                                                             short_cosine(args, ctx, a)))
                       for a in drawn])
    repeated = drawn[: args.table_repeat]  # the noise of both lengths, measured on the table's own archs
    run_jobs(args, ctx, [(f"table-validity-repeat-{arch_key(a)}", a, args.gt_steps, args.seed + 1000) for a in repeated]
             + [(f"table-validity-long-repeat-{arch_key(a)}", a, long_steps, args.seed + 1000) for a in repeated])


def run_signals(args) -> None:
    """Every validity arch's cheap signals (features and the short cosine runs of this ``--gt-steps``): the design
    archs, then the ``--spread`` archs, each claimed so that several processes share them. With them the
    validity report ranks every signal against the ground truth and the 5x runs on all the validity archs."""
    ctx, space, anchors, _ = setup(args)
    archs = list(anchors) + (spread_archs(args, ctx, space, anchors) if args.spread else [])
    for i, a in enumerate(archs):
        with claim(args, f"signals-{args.gt_steps}-{i}") as mine:
            if mine:
                t = time.perf_counter()
                features(args, ctx, a)
                short_cosine(args, ctx, a)
                print(f"signals {i}: {time.perf_counter() - t:.0f}s", flush=True)


def run_jobs(args, ctx, jobs: list[tuple[str, UNetArch, int, int]]) -> None:
    """Ground-truth runs (name, arch, steps, data-order seed), each claimed so that several processes share them."""
    for name, arch, steps, seed in jobs:
        with claim(args, name) as mine:
            if mine:
                g = gt(args, ctx, arch, steps, seed)
                print(f"{name}: {g['task_loss']:.4f} ({g['seconds']:.0f}s)", flush=True)


def spread_archs(args, ctx, space, anchors) -> list[UNetArch]:
    """``--spread`` more validity archs, spread over the range of quality: from ``--spread-pool`` random archs that
    are not design archs, those at evenly spaced ranks of ``distill_task@20`` (each pool arch's cheap features,
    cached like every other run; several processes share the pool by claims and wait for each other's).

    Why by quality: the design archs are spread over the arch encoding and already span the space's parameter
    range (shapes: 137k-514k parameters of 119k-565k), yet end within 6-20% of each other in held-out loss; a
    validity test "on archs spread over the range" needs archs chosen by how good they are, and
    ``distill_task@20`` is the cheapest signal that ranks the trained order well above chance on every run."""
    pool = spread_pool(space, anchors, args.spread_pool, args.seed)
    for i, a in enumerate(pool):
        with claim(args, f"spread-pool-{i}") as mine:
            if mine:
                features(args, ctx, a)
    paths = [args.work / f"feat-{arch_key(a)}.json" for a in pool]
    while not all(p.is_file() for p in paths):  # another process is still computing its share
        time.sleep(5)
    signal = [json.loads(p.read_text())["curve"][SPREAD_SIGNAL] for p in paths]
    return [pool[i] for i in pick_spread(signal, args.spread)]


def run_long(args) -> None:
    ctx, _, anchors, _ = setup(args)
    for i in args.indices or range(len(anchors)):  # several processes may share the list, each its own indices
        a = anchors[i]
        g = gt(args, ctx, a, args.gt_steps * args.long_factor, args.seed)
        print(f"long {i}: {group(a)} gt {g['task_loss']:.4f} ({g['seconds']:.0f}s)", flush=True)


if __name__ == "__main__":
    from proxy_validity_report import report, validity_report
    from proxy_validity_table import table_validity_report

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", required=True,
                        choices=("all", "main", "design", "long", "validity", "signals", "proxies",
                                 "validity-report", "table-validity", "table-validity-report", "report"),
                        help="all: every job, shareable by several processes on one work folder")
    parser.add_argument("--tests", choices=("random", "table"), default="random",
                        help="test archs: --archs random ones, or all 64 of the benchmark's table sub-space")
    parser.add_argument("--benchmark", choices=BENCHMARKS, default="digits", help="data, teacher and space")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--archs", type=int, default=24)
    parser.add_argument("--gt-steps", type=int, default=200)
    parser.add_argument("--gt-lr", type=float, default=1e-3, help="peak learning rate of the ground-truth runs")
    parser.add_argument("--gt-loss", choices=("bksdm", "task"), default="bksdm",
                        help="the ground truth's (and the short cosine runs') training loss: BK-SDM distillation, or "
                             "the task loss alone after inheritance")
    parser.add_argument("--long-factor", type=int, default=5)
    parser.add_argument("--validate", type=int, default=10, help="design archs: 5x validation, surrogate anchors")
    parser.add_argument("--repeat", type=int, default=6)
    parser.add_argument("--long-repeat", type=int, default=0,
                        help="repeat the 5x runs of the first N design archs (another data-order seed)")
    parser.add_argument("--mid-steps", type=int, default=0,
                        help="validity: also every design arch's ground truth at this many steps (0: none)")
    parser.add_argument("--spread", type=int, default=0,
                        help="validity: N more archs picked by distill_task@20 over a random pool (0: none)")
    parser.add_argument("--table-validity", type=int, default=12,
                        help="table-validity and its report (--tests table): table archs drawn at random for the "
                             "validity test on the table itself")
    parser.add_argument("--table-repeat", type=int, default=3,
                        help="table-validity: repeat the first N drawn archs at both lengths (another data-order seed)")
    parser.add_argument("--spread-pool", type=int, default=24, help="validity: the pool --spread picks from")
    parser.add_argument("--teacher-steps", type=int, help="default: the benchmark's (shapes2 4,000; else 400)")
    parser.add_argument("--feature-eval-items", type=int, default=64)
    parser.add_argument("--indices", type=int, nargs="*", help="long, design: only these design archs, in order")
    parser.add_argument("--repeat-indices", type=int, nargs="*", help="design: then repeat these design archs")
    parser.add_argument("--batch", type=int, default=32, help="batch size of every student run (GT and proxies)")
    parser.add_argument("--new-modules", choices=("fresh", "identity"), default="fresh",
                        help="how inheritance starts the modules the teacher lacks (every run: GT and proxies)")
    parser.add_argument("--device", default="cpu",
                        help="where every run trains (cuda: a GPU trains its own teacher, in its own work folder)")
    parser.add_argument("--teacher-from", type=Path, default=None,
                        help="copy this work folder's teacher instead of training one (e.g. the fresh run's, for "
                             "--new-modules identity)")
    parser.add_argument("--work", type=Path, default=None,
                        help="cache folder (default runs/proxy_validity_cosine_BENCHMARK_seedN, suffixed by the "
                             "options that differ from their defaults)")
    args = parser.parse_args()
    if args.part.startswith("table-validity") and args.tests != "table":
        parser.error(f"--part {args.part} needs --tests table")
    args.teacher_steps = args.teacher_steps or TEACHER_STEPS[args.benchmark]
    init = "" if args.new_modules == "fresh" else f"_{args.new_modules}"
    init += "" if args.gt_lr == 1e-3 else f"_gtlr{args.gt_lr:g}"
    init += "" if args.gt_loss == "bksdm" else f"_gt{args.gt_loss}"
    init += teacher_suffix(args.teacher_steps)
    init += "" if args.device == "cpu" else f"_{args.device.split(':')[0]}"  # another device trains another teacher
    args.work = args.work or Path("runs") / f"proxy_validity_cosine_{args.benchmark}_seed{args.seed}{init}"
    args.archs = 0 if args.tests == "table" else args.archs
    torch.set_num_threads(1)
    parts = {"all": run_all, "main": run_main, "design": run_design, "long": run_long, "validity": run_validity,
             "signals": run_signals, "proxies": run_proxies, "table-validity": run_table_validity,
             "table-validity-report": lambda a: table_validity_report(a, setup),
             "validity-report": lambda a: validity_report(a, setup, group),
             "report": lambda a: report(a, setup, gt, features, group)}
    parts[args.part](args)
