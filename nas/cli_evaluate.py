"""``unet-nas evaluate``: quality against sampling steps and seconds per image, teacher against students."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from nas.cli import app, console, user_errors
from search_spaces.errors import ConfigError


def _ints(value: str, option: str) -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"expected comma-separated integers, got {value!r}", field=option) from None
    if not out or any(v < 1 for v in out):
        raise ConfigError(f"expected positive integers, got {value!r}", field=option)
    return sorted(set(out))


def _model(arg: str, role: str) -> tuple[str | None, Path, str]:
    """``NAME=PATH`` or ``PATH``."""
    name, sep, path = arg.partition("=")
    if not sep:
        name, path = None, arg
    p = Path(path)
    if not p.is_dir():
        raise ConfigError("model folder not found (a FlexibleUNet or diffusers U-Net folder, or a pipeline folder)",
                          field="MODELS" if role == "student" else "--teacher", source=str(p))
    return name, p, role


@app.command("evaluate")
@user_errors
def evaluate_cmd(
    models: Annotated[list[str] | None, typer.Argument(help="Student model folders (U-Net or pipeline), as PATH or "
                                                            "NAME=PATH.")] = None,
    teacher: Annotated[str | None, typer.Option(help="The teacher folder (PATH or NAME=PATH): relative FID and the "
                                                     "headline are against it.")] = None,
    prompts: Annotated[Path | None, typer.Option(help="Prompt file: one caption per line, JSONL (text/caption + "
                                                      "optional image/file_name) or COCO captions JSON. Default for "
                                                      "U-Net folders: the built-in digits captions.")] = None,
    out: Annotated[Path, typer.Option(help="Output folder (reruns reuse the images in it).")] = Path("evaluation"),
    steps: Annotated[str, typer.Option(help="Sampling step counts, comma-separated.")] = "10,20,30,50",
    teacher_steps: Annotated[int | None, typer.Option("--teacher-steps", min=1, help="The teacher's reference step "
                                                      "count; default: the largest of --steps.")] = None,
    sampler: Annotated[str, typer.Option(help="Samplers, comma-separated: ddim (trailing timesteps) and/or dpmpp "
                                              "(DPM-Solver++ multistep).")] = "ddim",
    guidance: Annotated[float | None, typer.Option(min=1.0, help="Classifier-free guidance scale; default: a "
                                                   "pipeline's sampling.json, else 3.0.")] = None,
    guidance_rescale: Annotated[float | None, typer.Option("--guidance-rescale", min=0.0, max=1.0,
                                                           help="Rescaled CFG (Lin et al.); default: a pipeline's "
                                                                "sampling.json, else 0.7.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the per-prompt noise and the bootstrap.")] = 0,
    num_prompts: Annotated[int | None, typer.Option("--num-prompts", min=2, help="Use the first N prompts.")] = None,
    images_per_class: Annotated[int, typer.Option("--images-per-class", min=1, help="Digits: images per digit "
                                                  "without a prompt file.")] = 20,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per generation batch.")] = 50,
    bootstrap: Annotated[int, typer.Option(min=10, help="Bootstrap rounds for the intervals.")] = 200,
    tolerance: Annotated[float, typer.Option(min=0.0, help="A student matches at FID <= (1 + tolerance) x the "
                                             "teacher's.")] = 0.10,
    timing_repeats: Annotated[int, typer.Option("--timing-repeats", min=1, help="Timed one-image runs per "
                                                "setting.")] = 3,
    inception: Annotated[Path | None, typer.Option(help="Local TorchScript Inception file for FID of pipelines "
                                                        "(e.g. pt_inception-2015-12-05.pt).")] = None,
    no_fid: Annotated[bool, typer.Option("--no-fid", help="Pipelines: skip FID (no Inception file).")] = False,
    clip: Annotated[Path | None, typer.Option(help="Local CLIP model folder for the CLIP score.")] = None,
    pipeline_from: Annotated[Path | None, typer.Option("--pipeline-from", help="Stable Diffusion folder whose VAE, "
                                                       "text encoder and tokenizer drive U-Net folders.")] = None,
    image_root: Annotated[Path | None, typer.Option("--image-root", help="Folder the prompt file's image paths "
                                                    "are relative to; default: the file's.")] = None,
    device: Annotated[str, typer.Option(help="torch device.")] = "cpu",
    threads: Annotated[int, typer.Option(min=1, help="torch CPU threads (quality numbers are reproducible for "
                                         "one thread count).")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print the evaluation JSON.")] = False,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Also read pickle checkpoints "
                                               "(weights-only).")] = False,
) -> None:
    """Generate at a sweep of step counts and score FID, relative FID, text alignment and seconds per image; the
    headline says at how many steps each student matches the teacher, and how much faster that is."""
    import json

    from nas.evaluate import DigitsBackend, EvalConfig, Evaluation, PipelineBackend
    from nas.pipeline import is_pipeline, sampling_defaults
    from nas.prompts import load_prompts
    from proxies.quality.sampling import SAMPLERS

    samplers = [s.strip() for s in sampler.split(",") if s.strip()]
    unknown = [s for s in samplers if s not in SAMPLERS]
    if unknown or not samplers:
        raise ConfigError(f"unknown sampler {', '.join(unknown) or sampler!r} (known: {', '.join(SAMPLERS)})",
                          field="--sampler")
    entries = ([_model(teacher, "teacher")] if teacher else []) + [_model(m, "student") for m in models or []]
    if not entries:
        raise ConfigError("give at least one model (and --teacher for relative FID and the headline)", field="MODELS")
    specs = _names(entries)
    prompt_list = load_prompts(prompts, image_root=image_root, limit=num_prompts) if prompts is not None else None
    pipelines = [s for s in specs if is_pipeline(s.path)]
    defaults = sampling_defaults(pipelines[0].path) if pipelines else {}
    cfg = EvalConfig(steps=_ints(steps, "--steps"), samplers=samplers, teacher_steps=teacher_steps,
                     guidance=guidance if guidance is not None else float(defaults.get("guidance_scale", 3.0)),
                     guidance_rescale=guidance_rescale if guidance_rescale is not None
                     else float(defaults.get("guidance_rescale", 0.7)),
                     seed=seed, batch_size=batch_size, bootstrap=bootstrap, tolerance=tolerance,
                     timing_repeats=timing_repeats, images_per_class=images_per_class)
    import torch

    torch.set_num_threads(threads)
    if pipelines or pipeline_from is not None:
        if prompt_list is None:
            raise ConfigError("pipelines need a prompt file", field="--prompts")
        backend = PipelineBackend(cfg, prompt_list, inception, clip, pipeline_from, device, allow_pickle, no_fid)
    else:
        if inception is not None or clip is not None:
            raise ConfigError("U-Net folders alone are evaluated on the built-in digits (classifier features and "
                              "digit accuracy): --inception and --clip need pipelines or --pipeline-from",
                              field="--inception" if inception is not None else "--clip")
        if prompt_list is not None and num_prompts is None and len(prompt_list) < 2:
            raise ConfigError("FID needs at least 2 prompts", field="--prompts")
        backend = DigitsBackend(cfg, prompt_list, allow_pickle)
    evaluation = Evaluation(specs, backend, cfg, out, log=console.print, progress=not as_json)
    result = evaluation.run()
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    _print(result, out, evaluation.generated)


def _names(entries: list[tuple[str | None, Path, str]]):
    from nas.evaluate import ModelSpec

    specs, used = [], set()
    for name, path, role in entries:
        if name is None:
            name = path.resolve().name
            if name in ("model", "unet", "pipeline") or name in used:
                name = f"{path.resolve().parent.name}-{name}"
        if name in used:
            raise ConfigError(f"two models are named {name!r}: name them NAME=PATH", field="MODELS")
        if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ConfigError(f"model name {name!r}: use letters, digits, '-', '_' and '.'", field="MODELS")
        used.add(name)
        specs.append(ModelSpec(name, path, role))
    return specs


def _print(result: dict, out: Path, generated: int) -> None:
    from rich.table import Table

    score = result["text_score"]
    table = Table("model", "sampler", "steps", "FID", "95% interval", "rel. FID", *([score] if score else []),
                  "s/image", "U-Net s", title=f"{out / 'evaluation.json'}: {result['images_per_setting']} images "
                                                "per setting")
    for name, by_sampler in result["results"].items():
        for sampler, rows in by_sampler.items():
            for r in rows:
                s = r["seconds_per_image"]
                table.add_row(name, sampler, str(r["steps"]), _f(r.get("fid")),
                              "-".join(_f(v) for v in r.get("fid_interval", [])) or "", _f(r.get("relative_fid")),
                              *([_f(r.get(score))] if score else []), f"{s['pipeline_min']:.4f}",
                              f"{s['unet_min']:.4f}")
    console.print(table)
    console.print(f"{generated} batches generated, the rest reused")
    for h in result["headline"]:
        console.print(h["claim"])
    console.print(f"plots: {out / 'quality_vs_steps.png'}, {out / 'quality_vs_seconds.png'}; grids: {out / 'grids'}")


def _f(v: float | None) -> str:
    return "" if v is None else f"{v:.3g}"
