"""``unet-nas export``: a chosen architecture as a diffusers model folder, ready to train.

The folder holds ``config.json`` + ``diffusion_pytorch_model.safetensors`` (``FlexibleUNet2DConditionModel``:
``from_pretrained(DIR)`` loads it and it drops into a StableDiffusionPipeline built from the teacher's other
parts), ``arch.yaml``, ``inheritance.json`` (which modules took the teacher's weights, which are new) and
``train.yaml``: a training recipe whose model is this folder, its teacher the search's teacher and its data the
search's data. It is written to a temporary folder and renamed, so a crash leaves no half-written export.

The arch comes from a search run (``--trial N``: the trial's arch as the study recorded it) or a file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from search_spaces import ConfigError, FlexibleUNet2DConditionModel, UNetArch
from search_spaces.checkpoints import load_unet
from search_spaces.inherit import InheritanceReport, check_new_modules, inherit_weights
from search_spaces.yamlio import atomic_write, dump_json, dump_yaml, read_file

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


@dataclass
class RunChoice:
    """What a search run says about one trial: its arch, and the teacher and data the search used."""

    arch: UNetArch
    trial: int
    teacher: Path | None
    teacher_subfolder: str | None
    data: str | None


def arch_from_run(run: str | os.PathLike, trial: int, storage: str | None = None) -> RunChoice:
    """Trial ``trial`` of the search in ``run`` (``runs/<name>``), read from the run's study."""
    import optuna

    from .experiment import load_experiment, run_storage_url
    from .report import redact
    from .search.optuna_backend import make_storage

    run = Path(run)
    path = run / "experiment.yaml"
    if not path.is_file():
        raise ConfigError("not a search run folder (no experiment.yaml)", source=str(run))
    exp = load_experiment(path, overrides={"output_dir": str(run.parent), "name": run.name})
    url = run_storage_url(exp, storage, path)
    try:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.load_study(study_name=exp.name, storage=make_storage(url, exp))
    except KeyError:
        raise ConfigError(f"no study {exp.name!r} in {redact(url)}", field="storage", source=str(path)) from None
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    if trial not in trials:
        known = f"0-{max(trials)}" if trials else "none"
        raise ConfigError(f"no trial {trial} in the study (trials: {known})", field="--trial")
    t = trials[trial]
    if "arch" not in t.user_attrs:
        raise ConfigError(f"trial {trial} recorded no arch (state {t.state.name})", field="--trial")
    if t.state.name != "COMPLETE":
        raise ConfigError(f"trial {trial} did not complete (state {t.state.name}"
                          + (f": {t.user_attrs['error']}" if "error" in t.user_attrs else "") + ")", field="--trial")
    arch = UNetArch.from_dict(t.user_attrs["arch"])
    teacher, subfolder = None, None
    if (run / "teacher" / "config.json").is_file():  # a teacher the search trained itself
        teacher = run / "teacher"
    elif exp.teacher is not None and exp.teacher.path is not None:
        teacher, subfolder = exp.path(exp.teacher.path), exp.teacher.subfolder
    data = None
    if exp.data is not None:
        remote = "://" in exp.data  # a sharded dataset on an object store: the URL is already absolute
        data = exp.data if exp.data == "digits" or remote else str(exp.path(exp.data).resolve())
    return RunChoice(arch, trial, teacher, subfolder, data)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt", ".pth")


def teacher_digest(folder: str | os.PathLike, subfolder: str | None = None) -> str:
    """SHA-256 over a model folder's ``config.json`` and weight files (names and bytes, in name order): what a
    student's ``train.yaml`` pins, so that re-running the search (which re-trains its teacher in place) cannot
    silently change the teacher a later ``unet-nas train`` distills from."""
    import hashlib

    root = Path(folder) / (subfolder or "")
    files = sorted(p for p in root.iterdir() if p.is_file() and (p.name == "config.json"
                                                                 or p.suffix in WEIGHT_SUFFIXES))
    if not files:
        raise ConfigError("not a model folder (no config.json or weights)", source=str(root))
    digest = hashlib.sha256()
    for p in files:
        digest.update(p.name.encode() + b"\0")
        with open(p, "rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def check_teacher_pin(folder: str | os.PathLike, subfolder: str | None, sha256: str) -> None:
    """Refuse a teacher whose files differ from the ones pinned at export."""
    if not Path(folder, subfolder or "").is_dir():
        raise ConfigError("the pinned teacher folder is gone", source=str(folder))
    now = teacher_digest(folder, subfolder)
    if now != sha256:
        raise ConfigError(f"the teacher in {folder} changed since this student was exported (pinned sha256 "
                          f"{sha256[:12]}..., now {now[:12]}...): it was re-trained or replaced, e.g. by re-running "
                          "the search. Export the student again from the new run, or point teacher.path at the "
                          "original teacher")


def default_recipe(data: str | None) -> Path:
    """The recipe ``train.yaml`` starts from: the digits one for the digits data, else DeciDiffusion 1.0's."""
    name = "train_digits.yaml" if data in (None, "digits") else "train_decidiffusion_v1.yaml"
    path = EXPERIMENTS / name
    if not path.is_file():
        raise ConfigError(f"the shipped recipe {name} is not here (an installed package has no experiments/): "
                          "pass --recipe", field="--recipe")
    return path


def export(arch: UNetArch, out: str | os.PathLike, teacher: str | os.PathLike | None = None,
           teacher_subfolder: str | None = None, data: str | None = None, recipe: str | os.PathLike | None = None,
           seed: int = 0, source: dict[str, Any] | None = None, allow_pickle: bool = False,
           pipeline: str | os.PathLike | None = None,
           pipeline_from: str | os.PathLike | None = None,
           new_modules: str = "fresh") -> tuple[Path, InheritanceReport | None]:
    """Build ``arch`` (fresh weights under ``seed``), inherit the teacher's weights where it keeps a block (the
    modules it lacks start per ``new_modules``, see :func:`~search_spaces.inherit.inherit_weights`), and
    write the model folder ``out`` atomically. With ``pipeline``, also a diffusers pipeline folder of the model
    with the VAE, text encoder and tokenizer of ``pipeline_from`` (default: the teacher's Stable Diffusion folder)
    and the recipe's scheduler (:mod:`nas.pipeline`). Returns the model folder and the inheritance report."""
    from .pipeline import find_parts, write_pipeline

    out = Path(out)
    check_new_modules(new_modules, field="--new-modules")
    if out.exists() and any(out.iterdir()):
        raise ConfigError("the output folder exists and is not empty", field="--out", source=str(out))
    if pipeline is not None:
        if Path(pipeline).exists() and any(Path(pipeline).iterdir()):
            raise ConfigError("the pipeline folder exists and is not empty", field="--pipeline", source=str(pipeline))
        if pipeline_from is None and teacher is None:
            raise ConfigError("a pipeline needs a VAE, text encoder and tokenizer: pass --pipeline-from (a Stable "
                              "Diffusion folder) or a --teacher inside one", field="--pipeline-from")
        base = Path(pipeline_from) if pipeline_from is not None else Path(teacher) / (teacher_subfolder or "")
        pipeline_from = find_parts(base)  # a folder of the right layout, before any weight is built
    recipe_path = Path(recipe) if recipe is not None else default_recipe(data)
    template, lines = read_file(recipe_path)
    if not isinstance(template, dict):
        raise ConfigError("a training recipe must be a mapping", source=str(recipe_path), line=1)

    torch.manual_seed(seed)
    student = FlexibleUNet2DConditionModel.from_arch(arch)
    report = None
    teacher_dir = None
    if teacher is not None:
        teacher_model = load_unet(teacher, subfolder=teacher_subfolder, allow_pickle=allow_pickle)
        report = inherit_weights(student, teacher_model, new=new_modules)
        teacher_dir = str(Path(teacher).resolve())

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        student.save_pretrained(tmp, safe_serialization=True)
        atomic_write(tmp / "arch.yaml", arch.to_yaml())
        info = {"source": source or {}, "teacher": teacher_dir, "teacher_subfolder": teacher_subfolder,
                "new_modules": new_modules if teacher is not None else None,
                "params": sum(p.numel() for p in student.parameters())}
        if report is not None:
            info.update(report.to_dict())
        atomic_write(tmp / "inheritance.json", dump_json(info))
        atomic_write(tmp / "train.yaml", _train_yaml(template, recipe_path, out, teacher_dir, teacher_subfolder,
                                                     data, pipeline_from))
        if pipeline is not None:  # before the model folder appears: a refused pipeline leaves neither behind
            write_pipeline(student.eval(), pipeline, pipeline_from, noise=_noise(template, recipe_path, lines),
                           sampling=_sampling(template), allow_pickle=allow_pickle)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out, report


def _noise(template: dict[str, Any], recipe_path: Path, lines: dict[str, int]) -> Any:
    """The recipe template's training noise schedule (what the pipeline's scheduler samples)."""
    from pydantic import ValidationError

    from nas.train.recipe import NoiseSpec

    try:
        return NoiseSpec.model_validate(template.get("noise") or {})
    except ValidationError as exc:
        err = exc.errors()[0]
        field = "noise." + ".".join(str(p) for p in err["loc"]) if err["loc"] else "noise"
        raise ConfigError(err["msg"].removeprefix("Value error, "), field=field).located(
            str(recipe_path), lines) from None


def _sampling(template: dict[str, Any]) -> dict[str, Any]:
    """The pipeline's default call arguments: the recipe's validation sampling."""
    v = template.get("validation") if isinstance(template.get("validation"), dict) else {}
    return {"num_inference_steps": v.get("steps", 20), "guidance_scale": v.get("guidance", 3.0),
            "guidance_rescale": v.get("guidance_rescale", 0.7)}


def _train_yaml(template: dict[str, Any], recipe_path: Path, out: Path, teacher: str | None,
                teacher_subfolder: str | None, data: str | None, pipeline_from: Path | None = None) -> str:
    """The recipe template with this folder as its model, the teacher (distillation on in every phase, as in
    BK-SDM), the data, and the pipeline parts if a pipeline was exported (training ends by writing one too);
    other paths of the template are made absolute, since the file moves."""
    recipe = dict(template)
    if pipeline_from is not None:
        recipe["pipeline_from"] = str(Path(pipeline_from).resolve())
    elif recipe.get("pipeline_from"):
        recipe["pipeline_from"] = _absolute(recipe["pipeline_from"], recipe_path.resolve().parent)
    recipe["name"] = out.name
    recipe["model"] = {"pretrained": "."}
    base = recipe_path.resolve().parent
    if teacher is not None:
        recipe["teacher"] = {"path": teacher, **({"subfolder": teacher_subfolder} if teacher_subfolder else {}),
                             "sha256": teacher_digest(teacher, teacher_subfolder)}
        recipe["phases"] = [{**p, "distill": True} if isinstance(p, dict) else p for p in recipe.get("phases", [])]
    else:
        recipe.pop("teacher", None)
        recipe["phases"] = [{k: v for k, v in p.items() if k != "distill"} if isinstance(p, dict) else p
                            for p in recipe.get("phases", [])]
    if data is not None:
        recipe["data"] = data
    else:
        recipe["data"] = _absolute(recipe.get("data"), base)
    recipe["phases"] = [{**p, "data": _absolute(p["data"], base)} if isinstance(p, dict) and p.get("data") else p
                        for p in recipe["phases"]]
    if isinstance(recipe.get("validation"), dict) and recipe["validation"].get("vae"):
        recipe["validation"] = {**recipe["validation"], "vae": _absolute(recipe["validation"]["vae"], base)}
    recipe["output_dir"] = f"../{out.name}_train"
    header = (f"# Train the exported {out.name} (this folder) with the recipe of {recipe_path.name}.\n"
              f"#   unet-nas train {out}/train.yaml\n"
              + ("# teacher.sha256 pins the teacher's files: training refuses a teacher that changed since export\n"
                 "# (e.g. re-trained by re-running the search).\n" if teacher is not None else ""))
    return header + dump_yaml(recipe)


def _absolute(value: Any, base: Path) -> Any:
    """A template path made absolute (``digits`` and non-strings pass through)."""
    if not isinstance(value, str) or value == "digits":
        return value
    p = Path(os.path.expanduser(value))
    return str(p if p.is_absolute() else (base / p).resolve())
