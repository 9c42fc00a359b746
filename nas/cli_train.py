"""``unet-nas export`` and ``unet-nas train``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from nas.cli import AllowPickle, app, console, load_arch, quiet_dependency_warnings, user_errors
from search_spaces.errors import ConfigError


@app.command("export")
@user_errors
def export_cmd(
    run: Annotated[Path | None, typer.Argument(help="A search run folder (runs/<name>); with --trial.")] = None,
    trial: Annotated[int | None, typer.Option(help="The trial of the run whose arch to export.")] = None,
    arch: Annotated[str | None, typer.Option(help="Or an arch: a reference name or an arch YAML/JSON file.")] = None,
    teacher: Annotated[Path | None, typer.Option(help="Teacher folder to inherit weights from; default: the "
                                                 "run's teacher. Without one, all weights are fresh.")] = None,
    teacher_subfolder: Annotated[str | None, typer.Option("--teacher-subfolder", help="e.g. unet")] = None,
    out: Annotated[Path, typer.Option(help="The model folder to write.")] = Path("export"),
    recipe: Annotated[Path | None, typer.Option(help="Recipe template for train.yaml; default: "
                                                "experiments/train_digits.yaml for digits data, else "
                                                "train_decidiffusion_v1.yaml.")] = None,
    data: Annotated[str | None, typer.Option(help="Data for train.yaml (digits or a cache folder); default: "
                                             "the run's.")] = None,
    storage: Annotated[str | None, typer.Option(help="The run's storage URL if not its study.db.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the weights that are not inherited.")] = 0,
    new_modules: Annotated[str, typer.Option("--new-modules", help="How the modules the teacher lacks start: "
                                             "fresh (random) or identity (pass their input through).")] = "fresh",
    pipeline: Annotated[Path | None, typer.Option(help="Also write a diffusers pipeline folder here "
                                                  "(StableDiffusionPipeline / DiffusionPipeline.from_pretrained "
                                                  "load it).")] = None,
    pipeline_from: Annotated[Path | None, typer.Option("--pipeline-from", help="Stable Diffusion folder whose VAE, "
                                                       "text encoder and tokenizer the pipeline takes; default: "
                                                       "the teacher's.")] = None,
    allow_pickle: AllowPickle = False,
) -> None:
    """Write a chosen arch as a diffusers model folder with inherited teacher weights and a train.yaml (and with
    --pipeline a complete diffusers pipeline)."""
    from nas.export import arch_from_run, export

    quiet_dependency_warnings()
    if (run is None) == (arch is None):
        raise ConfigError("give a run folder with --trial, or --arch", field="RUN")
    source: dict[str, object]
    if run is not None:
        if trial is None:
            raise ConfigError("a run needs --trial N (see the run's trials.csv or summary.md)", field="--trial")
        choice = arch_from_run(run, trial, storage)
        chosen = choice.arch
        teacher_dir = teacher if teacher is not None else choice.teacher
        subfolder = teacher_subfolder if teacher is not None else choice.teacher_subfolder
        data = data if data is not None else choice.data
        source = {"run": str(run), "trial": trial}
    else:
        chosen = load_arch(arch)
        teacher_dir, subfolder = teacher, teacher_subfolder
        source = {"arch": str(arch)}
    folder, report = export(chosen, out, teacher=teacher_dir, teacher_subfolder=subfolder, data=data,
                            recipe=recipe, seed=seed, source=source, allow_pickle=allow_pickle, pipeline=pipeline,
                            pipeline_from=pipeline_from, new_modules=new_modules)
    console.print(f"wrote {folder}: config.json + diffusion_pytorch_model.safetensors, arch.yaml, "
                  "inheritance.json, train.yaml")
    if pipeline is not None:
        console.print(f"wrote the pipeline {pipeline}: DiffusionPipeline.from_pretrained({str(pipeline)!r}) loads it")
    console.print(report.summary() if report is not None else "no teacher: every weight is freshly initialised")
    console.print(f"train it with: unet-nas train {folder / 'train.yaml'}")


@app.command("train")
@user_errors
def train_cmd(
    file: Annotated[Path, typer.Argument(help="Training recipe YAML.")],
    out: Annotated[Path | None, typer.Option(help="Output folder; default: the recipe's output_dir, else "
                                             "runs/<name>.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint in the output "
                                         "folder.")] = False,
    threads: Annotated[int | None, typer.Option(min=1, help="torch CPU threads; default: torch's (all cores), "
                                                "or with --resume the run's own setting.")] = None,
    check: Annotated[bool, typer.Option("--check", help="Validate the recipe and print its phases; train "
                                        "nothing.")] = False,
    stop_after: Annotated[int | None, typer.Option("--stop-after", min=1, help="Stop right after this global "
                                                   "step's checkpoint (continue later with --resume).")] = None,
    allow_pickle: AllowPickle = False,
) -> None:
    """Train a model with a recipe (one process; accelerate launch -m nas train FILE for many)."""
    from nas.train.recipe import load_recipe

    quiet_dependency_warnings()
    recipe = load_recipe(file)
    if check:
        _print_phases(recipe)
        return
    from nas.train import Trainer

    folder = out or (recipe.path(recipe.output_dir) if recipe.output_dir else Path("runs") / recipe.name)
    threads = _threads(folder, threads, resume)
    trainer = Trainer(recipe, folder, log=lambda m: console.print(m, highlight=False), stop_after=stop_after,
                      allow_pickle=allow_pickle)
    try:
        trainer.check()
        if resume or not (trainer.checkpoints() or (folder / "metrics.json").exists()):  # else run() refuses
            _save_settings(folder, threads)
        metrics = trainer.run(resume=resume)
    except ConfigError as exc:  # a recipe field that does not fit the data, model or machine: point at its line
        raise (exc.located(str(file), _lines(file)) if exc.field and not exc.source else exc) from None
    except KeyboardInterrupt:
        console.print(f"stopped at step {trainer.step}; continue with: unet-nas train {file} --resume"
                      + (f" --out {out}" if out else ""))
        raise typer.Exit(130) from None
    if metrics is None:  # stopped by --stop-after, or a process other than the main one
        if trainer.step < recipe.total_steps:
            console.print(f"stopped after step {trainer.step}; continue with --resume")
        return
    acc = metrics.get("digit_accuracy")
    console.print(f"done: {metrics['steps']} steps, final loss {metrics['final_loss']:.4f}, held-out loss "
                  f"{metrics['val_loss']:.4f}" + (f", digit accuracy {acc:.0%}" if acc is not None else "")
                  + f"; model in {folder / 'model'}, metrics in {folder / 'metrics.json'}")


RUN_SETTINGS = "run_settings.json"


def _threads(folder: Path, threads: int | None, resume: bool) -> int:
    """The torch thread count of this run: ``--threads``; else, resuming, the count the run started with (stored
    in ``run_settings.json``, so a resumed run computes as the first part did); else torch's default."""
    import json

    import torch

    path = folder / RUN_SETTINGS
    saved: dict[str, object] = {}
    if resume and path.is_file():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"unreadable ({exc}); pass --threads", source=str(path)) from None
    if threads is None and isinstance(saved.get("threads"), int) and saved["threads"] > 0:
        threads = int(saved["threads"])
        console.print(f"--threads {threads}: the run's own setting (pass --threads to change it)", highlight=False)
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def _save_settings(folder: Path, threads: int) -> None:
    """Store the run's settings for the next ``--resume`` (once the recipe has passed its checks)."""
    from search_spaces.yamlio import atomic_write, dump_json

    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / RUN_SETTINGS, dump_json({"threads": threads}))


def _lines(file: Path) -> dict[str, int]:
    from search_spaces.yamlio import read_file

    return read_file(file)[1]


def _print_phases(recipe: object) -> None:
    from rich.table import Table

    table = Table("phase", "steps", "px", "batch", "optimizer", "lr", "schedule", "EMA", "distill",
                  title=f"{recipe.name}: {recipe.total_steps:,} steps")  # type: ignore[attr-defined]
    for p in recipe.phases:  # type: ignore[attr-defined]
        table.add_row(p.name, f"{p.steps:,}", str(p.resolution), f"{p.batch:,}", p.optimizer, f"{p.lr:g}",
                      p.lr_schedule + (f" (+{p.warmup_steps} warm-up)" if p.warmup_steps else ""),
                      "yes" if p.ema else "", "yes" if p.distill else "")
    console.print(table)
