"""ONNX commands: ``profile export`` / ``profile run-onnx`` / ``profile import`` (profiles of devices UNet-NAS cannot
time from Python) and ``onnx`` (one whole network for deployment).

The flow: export every block of a space and the calibration networks, time them with the target's toolchain (or
``run-onnx`` with ONNX Runtime), import the ``key,ms,repeats,spread`` CSV as a LUT profile. See
``proxies.latency.onnx_export`` for what is checked along the way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from nas.cli import SPACE_HELP, app, console, emit_json, load_arch, progress_bar, user_errors
from nas.cli_latency import Batch, Resolution, TextLen, profile_app
from search_spaces.errors import ConfigError

Exporter = Annotated[str, typer.Option(help="torchscript (default: fast, reliable on static shapes) or dynamo.")]
Opset = Annotated[int, typer.Option(help="ONNX opset (the dynamo exporter uses at least 18).")]
JsonOut = Annotated[bool, typer.Option("--json", help="Summary as JSON on stdout.")]


def _progress(quiet: bool) -> Any:
    return progress_bar(stderr=True, transient=quiet)


def _reporter(bar: Any) -> Any:
    tasks: dict[str, Any] = {}

    def progress(phase: str, done: int, total: int, label: str) -> None:
        if phase not in tasks:
            tasks[phase] = bar.add_task(f"{phase:8s}", total=total, label="")
        bar.update(tasks[phase], completed=done, total=total, label=label[:60])

    return progress


def _export_settings(dtype: str, batch: int, resolution: int, text_len: int) -> Any:
    from proxies.latency.profile import Settings

    try:
        return Settings(device="cpu", dtype=dtype, batch=batch, resolution=resolution, text_len=text_len,
                        threads=None)
    except ConfigError as exc:
        raise ConfigError(exc.message, field=f"--{exc.field.replace('_', '-')}") from None


@profile_app.command("export")
@user_errors
def profile_export(
    space: Annotated[str, typer.Option(help=f"The space whose every block is exported. {SPACE_HELP}")],
    out: Annotated[Path, typer.Option(help="Folder for the ONNX files and manifest.json.")],
    dtype: Annotated[str, typer.Option(help="fp16 (deployment default), fp32 or bf16.")] = "fp16",
    batch: Batch = 2,
    resolution: Resolution = None,
    text_len: TextLen = 77,
    arch: Annotated[list[str] | None, typer.Option(help="Also export these archs' blocks, and the archs as "
                                                        "calibration networks (name or file); repeatable.")] = None,
    calibration: Annotated[int, typer.Option(help="Whole networks sampled from the space (fit the correction).")] = 12,
    seed: Annotated[int, typer.Option(help="Seed of the calibration sample.")] = 0,
    exporter: Exporter = "torchscript",
    opset: Opset = 17,
    as_json: JsonOut = False,
) -> None:
    """Every distinct block of a space and the calibration networks as ONNX models with static shapes, each
    checked against PyTorch on ONNX Runtime (fp32), plus manifest.json."""
    from proxies.latency.onnx_export import export_space
    from search_spaces.space import SearchSpace

    sp = SearchSpace.from_yaml(space)
    extra = [load_arch(a) for a in arch or []]
    if resolution is None:
        resolution = sp.decode([0] * len(sp.decisions), check=False).sample_size * 8
    settings = _export_settings(dtype, batch, resolution, text_len)
    if calibration < 0:
        raise ConfigError(f"must be >= 0, got {calibration}", field="--calibration")
    with _progress(as_json) as bar:
        manifest = export_space(sp, settings, out, space_file=str(space), extra_archs=extra, calibration=calibration,
                                seed=seed, exporter=exporter, opset=opset, progress=_reporter(bar))
    worst = max((m.max_abs_diff or 0.0 for m in manifest.models), default=0.0)
    summary = {"out": str(out), "blocks": len(manifest.blocks), "networks": len(manifest.networks),
               "dtype": settings.dtype, "opset": manifest.opset, "exporter": manifest.exporter,
               "max_abs_diff_fp32_check": worst, "space_sha256": manifest.space_sha256}
    if as_json:
        emit_json(summary)
        return
    console.print(f"wrote {out}: {len(manifest.blocks)} blocks and {len(manifest.networks)} networks "
                  f"({settings.dtype}, opset {manifest.opset}); ONNX Runtime vs PyTorch (fp32): max abs diff "
                  f"{worst:.3g}")
    console.print(f"next: time them (unet-nas profile run-onnx {out} --provider cpu, or your toolchain) and "
                  f"import the CSV (unet-nas profile import {out} --timings timings.csv ...)")


@profile_app.command("run-onnx")
@user_errors
def profile_run_onnx(
    folder: Annotated[Path, typer.Argument(help="An export folder (with manifest.json).")],
    provider: Annotated[str, typer.Option(help="ONNX Runtime execution provider: cpu, cuda or tensorrt.")] = "cpu",
    out: Annotated[Path | None, typer.Option(help="CSV to write (default: FOLDER/timings.csv).")] = None,
    threads: Annotated[int | None, typer.Option(help="Intra-op threads (default 1 on cpu, the runtime's on GPUs).")
                       ] = None,
    warmup: Annotated[int, typer.Option(help="Untimed runs first.")] = 3,
    min_repeats: Annotated[int, typer.Option(help="Timed runs at least.")] = 10,
    max_repeats: Annotated[int, typer.Option(help="Timed runs at most (stops earlier once the statistic is "
                                                   "stable).")] = 50,
    statistic: Annotated[str, typer.Option(help="median (default), or min / pNN: robuster on a loaded machine.")
                         ] = "median",
    as_json: JsonOut = False,
) -> None:
    """Time every model of an export with ONNX Runtime (warm-up, median of repeats, spread) and write the
    key,ms,repeats,spread CSV that `profile import` reads (ms: the --statistic of the repeats)."""
    from proxies.latency.onnx_manifest import load_manifest
    from proxies.latency.onnx_runtime import time_manifest, write_timings
    from proxies.latency.profile import Protocol

    manifest = load_manifest(folder)
    if threads is not None and threads <= 0:
        raise ConfigError(f"must be positive, got {threads}", field="--threads")
    try:
        protocol = Protocol(statistic=statistic, warmup=warmup, min_repeats=min_repeats, max_repeats=max_repeats)
    except ConfigError as exc:
        raise ConfigError(exc.message, field=f"--{exc.field.replace('_', '-')}") from None
    out = out or folder / "timings.csv"
    with _progress(as_json) as bar:
        timings = time_manifest(manifest, provider, threads or (1 if provider == "cpu" else None), protocol,
                                progress=_reporter(bar))
    write_timings(out, timings)
    if as_json:
        emit_json({"out": str(out), "models": len(timings), "provider": provider})
        return
    console.print(f"wrote {out}: {len(timings)} models timed on ONNX Runtime ({provider})")


@profile_app.command("import")
@user_errors
def profile_import(
    folder: Annotated[Path, typer.Argument(help="The export folder the timings belong to.")],
    timings: Annotated[Path, typer.Option(help="CSV with columns key,ms,repeats,spread (ms: per inference).")],
    device_name: Annotated[str, typer.Option("--device-name", help="The device, e.g. 'Cloud AI 100 Standard, "
                                                                   "14 cores'.")],
    runtime: Annotated[str, typer.Option(help="The runtime and options, e.g. 'qaic-runner, SDK 1.18, fp16'.")],
    out: Annotated[Path, typer.Option(help="Profile YAML to write.")],
    space: Annotated[str | None, typer.Option(help="The space (a shipped name, a space or experiment YAML), if "
                                                   "not where the export recorded it.")] = None,
    statistic: Annotated[str, typer.Option(help="What the CSV's ms is: median (default), min or pNN of the runs.")
                         ] = "median",
    as_json: JsonOut = False,
) -> None:
    """Turn a toolchain's per-model timings into a LUT profile (same predictor, correction fitted on the
    calibration networks). Missing/unknown keys, bad times, a changed export or space: one error, no file."""
    from nas.cli_latency import report_profile
    from proxies.latency.onnx_import import import_profile

    report_profile(import_profile(folder, timings, device_name, runtime, out, space, statistic), out, as_json)


@app.command("onnx")
@user_errors
def onnx_export(
    ref: Annotated[str, typer.Argument(help="Reference name or arch file (- with --weights: the folder's arch).")],
    out: Annotated[Path, typer.Option(help="ONNX file to write.")],
    weights: Annotated[Path | None, typer.Option(help="A FlexibleUNet model folder (save_pretrained) whose weights "
                                                      "to export; default: random weights (enough for timing).")
                       ] = None,
    dtype: Annotated[str, typer.Option(help="fp16, fp32 or bf16.")] = "fp16",
    batch: Batch = 2,
    resolution: Annotated[int, typer.Option(help="Image resolution in pixels (latents are 1/8 of it).")] = 512,
    text_len: TextLen = 77,
    exporter: Exporter = "torchscript",
    opset: Opset = 17,
    as_json: JsonOut = False,
) -> None:
    """One whole U-Net as an ONNX model with static shapes (inputs sample, timestep, encoder_hidden_states),
    checked against PyTorch on ONNX Runtime CPU (fp32)."""
    from proxies.latency.onnx_export import export_network
    from search_spaces.flexible_unet import FlexibleUNet2DConditionModel

    model = None
    if weights is not None:
        if not (weights / "config.json").is_file():
            raise ConfigError("not a model folder (no config.json): give a folder written by save_pretrained",
                              field="--weights", source=str(weights))
        model = FlexibleUNet2DConditionModel.from_pretrained(weights).eval()
        arch = model.arch
        if ref != "-" and _unnamed(load_arch(ref)) != _unnamed(arch):
            raise ConfigError(f"the model in {weights} is another arch than {ref!r} (pass - as the arch to export "
                              "the folder's own)", field="--weights")
    elif ref == "-":
        raise ConfigError("- (the arch of --weights) needs --weights", field="ARCH")
    else:
        arch = load_arch(ref)
    settings = _export_settings(dtype, batch, resolution, text_len)
    entry = export_network(arch, settings, out, model=model, exporter=exporter, opset=opset)
    result = {"out": str(out), "arch": arch.name or ref, **entry, "dtype": settings.dtype,
              "opset": max(opset, 18) if exporter == "dynamo" else opset,
              "size_mb": round(os.path.getsize(out) / 2**20, 2)}
    if as_json:
        emit_json(result)
        return
    console.print(f"wrote {out} ({result['size_mb']} MB, {settings.dtype}, opset {result['opset']}): inputs "
                  + ", ".join(f"{i['name']} {i['shape']}" for i in entry["inputs"])
                  + f"; ONNX Runtime vs PyTorch (fp32): max abs diff {entry['max_abs_diff']:.3g}")


def _unnamed(arch: Any) -> dict[str, Any]:
    return {k: v for k, v in arch.to_dict().items() if k != "name"}
