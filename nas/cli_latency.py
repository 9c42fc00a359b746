"""``unet-nas profile`` and ``unet-nas predict``: measure a device's latency profile, predict an arch's latency.

``profile`` is a command group whose callback measures when no subcommand is given, so that
``unet-nas profile --device cpu --space S --out P.yaml`` works and later subcommands (export, import, ...) can be
added beside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from nas.cli import SPACE_HELP, Typer, app, console, emit_json, load_arch, progress_bar, table, user_errors
from search_spaces.errors import ConfigError

profile_app = Typer(help="Measure a latency profile of a device (every block of a space + calibration "
                               "networks).", invoke_without_command=True)
app.add_typer(profile_app, name="profile")

Device = Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")]
Dtype = Annotated[str | None, typer.Option(help="fp32, fp16 or bf16 (default: fp32 on CPU, fp16 on CUDA).")]
Batch = Annotated[int, typer.Option(help="Batch size; 2 = classifier-free guidance.")]
Resolution = Annotated[int | None, typer.Option(help="Image resolution in pixels (latents are 1/8 of it); "
                                                     "default: the space's sample_size x 8.")]
TextLen = Annotated[int, typer.Option("--text-len", help="Text tokens.")]


def _settings(**kwargs: Any) -> Any:
    from proxies.latency.profile import Settings

    return Settings(**kwargs)


@profile_app.callback()
@user_errors
def profile(
    ctx: typer.Context,
    space: Annotated[str | None, typer.Option(help=f"The space whose every block is measured. {SPACE_HELP}")
                     ] = None,
    out: Annotated[Path | None, typer.Option(help="Profile YAML to write (resumed if it exists).")] = None,
    device: Device = "cpu",
    dtype: Dtype = None,
    batch: Batch = 2,
    resolution: Resolution = None,
    text_len: TextLen = 77,
    arch: Annotated[list[str] | None, typer.Option(help="Also profile these archs (name or file); repeatable.")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default 1 on CPU; torch's default on GPU).")] = None,
    calibration: Annotated[int, typer.Option(help="Whole networks sampled from the space to fit the "
                                                  "block-sum correction.")] = 12,
    seed: Annotated[int, typer.Option(help="Seed of the calibration sample.")] = 0,
    statistic: Annotated[str, typer.Option(help="min, p5, p10, p20, p25 or median of the repeats.")] = "min",
    warmup: Annotated[int, typer.Option(help="Untimed runs first.")] = 3,
    min_repeats: Annotated[int, typer.Option(help="Timed runs at least.")] = 10,
    max_repeats: Annotated[int, typer.Option(help="Timed runs at most (stops earlier once stable).")] = 50,
    channels_last: Annotated[bool, typer.Option("--channels-last", help="channels-last memory format.")] = False,
    compile_: Annotated[bool, typer.Option("--compile", help="torch.compile every block and network.")] = False,
    cuda_graph: Annotated[bool | None, typer.Option("--cuda-graph/--eager", help="On CUDA, time CUDA-graph replays "
                                                    "(no launch overhead; the default) or eager "
                                                    "launches.")] = None,
    restart: Annotated[bool, typer.Option("--restart", help="Discard an existing --out instead of resuming.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Summary as JSON on stdout.")] = False,
) -> None:
    """Measure every distinct block a space can produce, then whole networks, and fit the correction."""
    if ctx.invoked_subcommand is not None:
        return
    from proxies.latency.profile import Protocol
    from proxies.latency.profiler import run_profile
    from search_spaces.space import SearchSpace

    if out is None:
        raise ConfigError("missing: where to write the profile (--out profiles/NAME.yaml)", field="--out")
    if space is None and not arch:
        raise ConfigError("missing: give --space FILE (and/or --arch NAME)", field="--space")
    sp = SearchSpace.from_yaml(space) if space is not None else None
    extra = [load_arch(a) for a in arch or []]
    if resolution is None:
        base = sp.decode([0] * len(sp.decisions), check=False) if sp is not None else extra[0]
        resolution = base.sample_size * 8
    cuda = device.startswith("cuda")
    settings = _settings(device=device, dtype=dtype or ("fp16" if cuda else "fp32"), batch=batch,
                         resolution=resolution, text_len=text_len, threads=threads or (None if cuda else 1),
                         channels_last=channels_last, compile=compile_,
                         cuda_graph=cuda if cuda_graph is None else cuda_graph)
    try:
        protocol = Protocol(statistic=statistic, warmup=warmup, min_repeats=min_repeats, max_repeats=max_repeats)
    except ConfigError as exc:
        raise ConfigError(exc.message, field=f"--{exc.field.replace('_', '-')}") from None
    label = str(space) if space is not None else ", ".join(arch or [])
    with progress_bar(stderr=True, transient=as_json) as bar:
        tasks: dict[str, Any] = {}

        def progress(phase: str, done: int, total: int, label: str) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(f"{phase:8s}", total=total, label="")
            bar.update(tasks[phase], completed=done, total=total, label=label[:60])

        prof = run_profile(sp, settings, out, protocol=protocol, extra_archs=extra, calibration=calibration,
                           seed=seed, restart=restart, space_label=label, progress=progress)
    report_profile(prof, out, as_json)


def report_profile(prof: Any, out: Path, as_json: bool) -> None:
    """What a written profile holds (``profile`` and ``profile import``): JSON, or two lines for a person."""
    corr = prof.correction
    trust = prof.trust
    summary = {"out": str(out), "device_name": prof.device_name, "settings": prof.settings.__dict__,
               "blocks": len(prof.blocks), "calibration_networks": len(prof.calibration),
               "correction": None if corr is None else corr.__dict__,
               "trust": None if trust is None else trust.to_dict()}
    if trust is not None and not trust.trusted:
        warn_untrusted(out, trust)
    if as_json:
        emit_json(summary)
        return
    console.print(f"wrote {out}: {len(prof.blocks)} blocks, {len(prof.calibration)} networks on {prof.device_name}")
    if corr is not None:
        console.print(f"correction: whole = {corr.scale:.3f} x block sum {corr.offset_ms:+.3f} ms "
                      f"(fit error {corr.fit_mape_pct:.1f}% over {corr.n} networks)")
    if trust is not None and trust.trusted:
        console.print(f"measurements {trust.line()}")


def warn_untrusted(path: object, trust: Any) -> None:
    """One warning line on stderr for a profile whose measurements are not trustworthy (with the figures)."""
    from rich.console import Console

    Console(stderr=True, highlight=False, soft_wrap=True, markup=False).print(
        f"warning: latency profile {path} is {trust.line()}; its predictions may be off by about that much: "
        "measure it again on a quiet machine (--restart)")


@app.command("predict")
@user_errors
def predict(
    ref: Annotated[str, typer.Argument(help="Reference name or arch file.")],
    profile_path: Annotated[Path | None, typer.Option("--profile", help="Measured profile YAML, or the name of a "
                                                                     "shipped one (h100_sd15_fp16_b2_512).")] = None,
    predictor: Annotated[str, typer.Option(help="lut, roofline or learned.")] = "lut",
    spec: Annotated[str | None, typer.Option(help="Device spec for the roofline: a shipped name "
                                                  "(cloud_ai_100_standard, a100_sxm, ...) or a YAML file.")] = None,
    save_spec: Annotated[Path | None, typer.Option(help="Write the roofline spec calibrated on --profile "
                                                        "here.")] = None,
    dtype: Annotated[str | None, typer.Option(help="Query dtype (must match the profile's).")] = None,
    batch: Annotated[int | None, typer.Option(help="Query batch (must match the profile's).")] = None,
    resolution: Annotated[int | None, typer.Option(help="Query image px (must match the profile's).")] = None,
    text_len: Annotated[int | None, typer.Option("--text-len", help="Query text tokens.")] = None,
    measure: Annotated[bool, typer.Option("--measure", help="Also time the real model here, at the profile's "
                                                            "settings, and print the error.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
) -> None:
    """Predicted per-step latency of an arch and its per-stage breakdown (with --measure: against a real run)."""
    from proxies.latency.profile import LatencyProfile, find_profile

    arch = load_arch(ref)
    if predictor not in ("lut", "roofline", "learned"):
        raise ConfigError(f"must be lut, roofline or learned, got {predictor!r}", field="--predictor")
    prof = LatencyProfile.load(find_profile(profile_path)) if profile_path is not None else None
    query = {"dtype": dtype, "batch": batch, "resolution": resolution, "text_len": text_len}
    if prof is not None:
        prof.check_settings(query)
        settings = prof.settings
    else:
        if predictor != "roofline" or measure:
            what = f"the {predictor} predictor" if predictor != "roofline" else "--measure"
            raise ConfigError(f"{what} needs a measured profile (--profile FILE)", field="--profile")
        settings = _settings(device="cuda", dtype=dtype or "fp16", batch=batch or 2, resolution=resolution or 512,
                             text_len=text_len or 77, threads=None)
    model = _predictor(predictor, prof, spec, settings, save_spec)
    stages = model.breakdown(arch)
    result: dict[str, Any] = {
        "arch": arch.name or ref, "predictor": predictor, "predicted_ms": sum(stages.values()),
        "breakdown": stages, "settings": settings.query(),
        "profile": str(profile_path) if profile_path else None, "spec": spec,
    }
    if measure:
        from proxies.latency.timing import measure_network

        assert prof is not None
        timing = measure_network(arch, prof.settings, prof.protocol)
        result["measured_ms"] = timing.ms
        result["measured_spread_pct"] = timing.spread_pct
        result["error_pct"] = 100 * (result["predicted_ms"] - timing.ms) / timing.ms
    if as_json:
        emit_json(result)
        return
    s = settings
    out = table("stage", "ms", title=f"{result['arch']}: {result['predicted_ms']:.2f} ms predicted",
                caption=f"{predictor}; {s.dtype}, batch {s.batch}, {s.resolution} px, {s.text_len} tokens")
    for stage, ms in stages.items():
        out.add_row(stage, f"{ms:.3f}")
    console.print(out)
    if measure:
        console.print(f"measured {result['measured_ms']:.2f} ms (spread {timing.spread_pct:.1f}%): "
                      f"error {result['error_pct']:+.1f}%")


def _predictor(kind: str, prof: Any, spec: str | None, settings: Any, save_spec: Path | None) -> Any:
    from proxies.latency.learned import LearnedPredictor
    from proxies.latency.lut import LUTPredictor
    from proxies.latency.roofline import RooflinePredictor, load_spec

    if kind == "lut":
        return LUTPredictor(prof)
    if kind == "learned":
        return LearnedPredictor.from_profile(prof)
    if spec is None:
        raise ConfigError("the roofline predictor needs a device spec (--spec cloud_ai_100_standard, --spec "
                          "a100_sxm, ... or a spec YAML)", field="--spec")
    roof = RooflinePredictor(load_spec(spec), settings)
    if prof is not None:
        roof = roof.calibrate_from_profile(prof)
    if save_spec is not None:
        roof.spec.save(save_spec)
    return roof
