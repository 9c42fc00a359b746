"""Latency profiles, the three predictors and the profile/predict CLI, on a tiny space with few repeats.

No test asserts a timing target (the machine is shared and noisy); targets live in benchmarks/latency_accuracy.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from nas.cli import app
from nas.cli_latency import report_profile
from proxies.cost import arch_costs
from proxies.latency.blocks import arch_block_keys, space_blocks
from proxies.latency.kernels import block_kernels, kernel_array
from proxies.latency.learned import LearnedPredictor
from proxies.latency.lut import LUTPredictor, block_sum, block_times, fit_correction, fit_profile_correction
from proxies.latency.profile import Correction, LatencyProfile, Protocol, Settings, Timing
from proxies.latency.profiler import run_profile
from proxies.latency.roofline import RooflinePredictor, list_specs, load_spec, spec_from_dict
from proxies.latency.trust import FIT_LIMIT_PCT, LoadLog, judge, noisy
from search_spaces import ConfigError, get_arch
from search_spaces.space import SearchSpace
from tests.conftest import MICRO_SPACE_YAML

SPACE_YAML = MICRO_SPACE_YAML
SETTINGS = Settings(device="cpu", dtype="fp32", batch=1, resolution=64, text_len=8, threads=1)
FAST = Protocol(warmup=1, min_repeats=2, max_repeats=3)
runner = CliRunner()


@pytest.fixture(scope="module")
def space_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("space") / "micro.yaml"
    path.write_text(SPACE_YAML)
    return path


@pytest.fixture(scope="module")
def space(space_file) -> SearchSpace:
    return SearchSpace.from_yaml(space_file)


@pytest.fixture(scope="module")
def profile(space, tmp_path_factory) -> LatencyProfile:
    out = tmp_path_factory.mktemp("profile") / "micro.yaml"
    return run_profile(space, SETTINGS, out, protocol=FAST, calibration=5, space_label="micro")


# ---- profile file ------------------------------------------------------------------------------------------


def test_profile_round_trip(profile):
    assert profile.complete and profile.correction is not None and profile.correction.n == 5
    again = LatencyProfile.load(profile.source)
    assert again.to_dict() == profile.to_dict()
    assert again.settings == SETTINGS and again.protocol == FAST
    env = again.environment
    assert env["torch"] and env["diffusers"] and env["attention_backend"] and env["date"]


@pytest.mark.parametrize(("edit", "field"), [
    (lambda d: d.update(colour="red"), "colour"),
    (lambda d: d["settings"].update(dtype="fp8"), "settings.dtype"),
    (lambda d: d["settings"].update(batch=0), "settings.batch"),
    (lambda d: d["protocol"].update(statistic="mean"), "protocol.statistic"),
    (lambda d: d.update(format="other/9"), "format"),
    (lambda d: next(iter(d["blocks"].values())).update(ms=-1.0), "blocks."),
    (lambda d: d["calibration"][0]["arch"]["down"][0].update(channels=7), "calibration[0].arch.down[0].channels"),
    (lambda d: d["correction"].update(scale=0), "correction.scale"),
])
def test_profile_validation_names_file_field_and_line(profile, tmp_path, edit, field):
    from search_spaces.yamlio import dump_yaml

    data = profile.to_dict()
    edit(data)
    bad = tmp_path / "bad.yaml"
    bad.write_text(dump_yaml(data))
    with pytest.raises(ConfigError) as info:
        LatencyProfile.load(bad)
    err = info.value
    assert err.source == str(bad) and err.field.startswith(field) and err.line is not None


def test_save_is_atomic(profile, tmp_path):
    out = profile.save(tmp_path / "sub" / "p.yaml")
    assert out.exists() and not list(out.parent.glob("*.tmp"))


# ---- blocks of a space -------------------------------------------------------------------------------------


def test_space_blocks_cover_every_sampled_arch(space):
    blocks = space_blocks(space, SETTINGS.latent_size)
    rng = random.Random(0)
    for _ in range(300):
        arch = space.sample(rng)
        for b, key in arch_block_keys(arch, SETTINGS.latent_size):
            assert key in blocks, (key, b.module)
    kinds = {k.split()[0] for k in blocks}
    assert kinds == {"resnet", "attention", "downsample", "upsample", "conv_in", "conv_out", "norm_out",
                     "time_embedding"}
    # both transformer depths of the space are there for every attention position
    assert {k.split()[3] for k in blocks if k.startswith("attention")} == {"layers1", "layers2"}


def test_kernel_flops_match_the_cost_model():
    for name in ("sd15", "decidiffusion_v1", "bk_tiny"):
        arch = get_arch(name)
        sizes = arch.sizes(64)
        flops = sum(kernel_array(block_kernels(arch, b, sizes, 77), 2)[:, 0].sum() for b in arch.blocks)
        assert flops == pytest.approx(2 * arch_costs(arch, 2, 64, 77).macs, rel=1e-9)


# ---- lookup table ------------------------------------------------------------------------------------------


def test_lut_is_block_sum_plus_correction(profile, space):
    lut = LUTPredictor(profile)
    corr = profile.correction
    for arch in [space.sample(random.Random(s)) for s in range(5)]:
        keys = [k for _, k in arch_block_keys(arch, SETTINGS.latent_size)]
        raw = sum(profile.blocks[k].ms for k in keys)
        assert block_sum(profile, arch) == pytest.approx(raw)
        assert lut.predict(arch) == pytest.approx(corr.scale * raw + corr.offset_ms)
        parts = lut.breakdown(arch)
        assert sum(parts.values()) == pytest.approx(lut.predict(arch))
        assert set(parts) == {*block_times(profile, arch), "overhead"}


def test_lut_refuses_blocks_it_never_measured(profile):
    with pytest.raises(ConfigError, match="was not measured"):
        LUTPredictor(profile).predict(get_arch("sd15"))


@pytest.mark.parametrize("change", [{"batch": 2}, {"dtype": "bf16"}, {"resolution": 128}, {"text_len": 77}])
def test_mismatched_settings_are_refused(profile, change):
    wanted = Settings(**{**SETTINGS.__dict__, **change})
    key = next(iter(change))
    with pytest.raises(ConfigError, match=f"measured at {key}") as info:
        LUTPredictor(profile, wanted)
    assert info.value.field == f"settings.{key}" and info.value.source == profile.source
    with pytest.raises(ConfigError):
        LearnedPredictor(wanted, profile)


def test_fit_correction_recovers_scale_and_offset():
    sums = np.array([3.0, 5.0, 8.0, 13.0, 21.0])
    corr = fit_correction(sums, 1.2 * sums + 0.5)
    assert corr.scale == pytest.approx(1.2) and corr.offset_ms == pytest.approx(0.5) and corr.fit_mape_pct < 1e-6
    assert fit_correction([2.0, 4.0], [3.0, 6.0]) == Correction(1.5, 0.0, 2, pytest.approx(0.0))


# ---- roofline ----------------------------------------------------------------------------------------------


def test_shipped_specs_load_with_sources():
    names = list_specs()
    for want in ("cloud_ai_100_standard", "cloud_ai_100_pro", "cloud_ai_100_ultra", "a10g", "l4", "a100_sxm",
                 "h100_sxm"):
        assert want in names
        spec = load_spec(want)
        assert spec.source and spec.peak("fp16") > 0 and spec.memory_bandwidth_gbs > 0


def test_cloud_ai_100_ranks_reference_archs():
    settings = Settings(device="cuda", dtype="fp16", batch=2, resolution=512, text_len=77, threads=None)
    roof = RooflinePredictor(load_spec("cloud_ai_100_standard"), settings)
    ms = {n: roof.predict(get_arch(n)) for n in ("sd15", "bk_base", "bk_small", "bk_tiny", "decidiffusion_v1")}
    assert ms["sd15"] > ms["decidiffusion_v1"] > ms["bk_base"] > ms["bk_small"] > ms["bk_tiny"] > 0
    parts = roof.breakdown(get_arch("sd15"))
    assert sum(parts.values()) == pytest.approx(ms["sd15"])
    assert sum(roof.bound(get_arch("sd15")).values()) == pytest.approx(1.0)
    # the cached per-block path and the per-kernel path that calibration uses agree
    spec = roof.spec
    for name, value in ms.items():
        terms = roof._terms(get_arch(name))
        total = roof._kernel_ms(terms, spec.compute_efficiency, spec.memory_efficiency, spec.kernel_overhead_us)
        assert float(total.sum()) == pytest.approx(value)
    with pytest.raises(ConfigError, match="no bf16 peak"):
        RooflinePredictor(load_spec("cloud_ai_100_standard"), Settings(dtype="bf16"))


@pytest.mark.parametrize(("edit", "field"), [
    ({"colour": 1}, "colour"), ({"source": None}, "source"), ({"compute_efficiency": 1.5}, "compute_efficiency"),
    ({"peak_tflops": {"fp8": 3}}, "peak_tflops.fp8"), ({"memory_bandwidth_gbs": -1}, "memory_bandwidth_gbs"),
])
def test_spec_validation(edit, field):
    data = {**load_spec("a100_sxm").to_dict(), **edit}
    if data.get("source") is None:
        data.pop("source")
    with pytest.raises(ConfigError) as info:
        spec_from_dict(data)
    assert info.value.field == field


def test_roofline_calibration_recovers_efficiencies(space):
    settings = SETTINGS
    true = spec_from_dict({**load_spec("a100_sxm").to_dict(), "peak_tflops": {"fp32": 1.0},
                           "compute_efficiency": 0.3, "memory_efficiency": 0.6, "kernel_overhead_us": 20.0,
                           "memory_bandwidth_gbs": 20.0})
    archs = [space.sample(random.Random(s)) for s in range(12)]
    measured = [RooflinePredictor(true, settings).predict(a) for a in archs]
    start = spec_from_dict({**true.to_dict(), "compute_efficiency": 0.9, "memory_efficiency": 0.9,
                            "kernel_overhead_us": 1.0})
    fitted = RooflinePredictor(start, settings).calibrate(archs, measured, label="synthetic")
    assert fitted.spec.calibrated_from["fit_mape_pct"] < 1.0
    for a, m in zip(archs, measured, strict=True):
        assert fitted.predict(a) == pytest.approx(m, rel=0.02)


# ---- learned -----------------------------------------------------------------------------------------------


def test_learned_fits_and_predicts(profile, space):
    archs = [space.sample(random.Random(s)) for s in range(10)]
    sums = [block_sum(profile, a) for a in archs]
    model = LearnedPredictor(SETTINGS, profile, space).fit(archs, [1.3 * s for s in sums])
    new = space.sample(random.Random(99))
    assert model.predict(new) == pytest.approx(1.3 * block_sum(profile, new), rel=0.01)
    assert sum(model.breakdown(new).values()) == pytest.approx(model.predict(new))
    # without blocks the baseline is linear in MACs, and the trees learn the residual on top
    macs = [arch_costs(a, 1, 8, 8).macs / 1e9 for a in archs]
    plain = LearnedPredictor(SETTINGS).fit(archs, [40 * g + 2 for g in macs])
    g = arch_costs(new, 1, 8, 8).macs / 1e9
    assert plain.predict(new) == pytest.approx(40 * g + 2, rel=0.05)
    from_profile = LearnedPredictor.from_profile(profile)
    assert from_profile.n_train == 5 and from_profile.predict(new) > 0
    with pytest.raises(ConfigError, match="at least 4"):
        LearnedPredictor(SETTINGS, profile).fit(archs[:3], sums[:3])


# ---- resuming ----------------------------------------------------------------------------------------------


def test_interrupted_profile_resumes(space, tmp_path):
    out = tmp_path / "p.yaml"
    seen: list[str] = []

    def interrupt_after_four(phase: str, done: int, total: int, label: str) -> None:
        if phase == "blocks" and label:
            seen.append(label)
            if len(seen) == 5:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_profile(space, SETTINGS, out, protocol=FAST, calibration=4, progress=interrupt_after_four)
    partial = LatencyProfile.load(out)
    assert not partial.complete and set(partial.blocks) == set(seen[:4])
    measured: list[str] = []
    done = run_profile(space, SETTINGS, out, protocol=FAST, calibration=4,
                       progress=lambda p, d, t, label: measured.append(label) if p == "blocks" and label else None)
    assert done.complete and len(done.calibration) == 4
    assert not set(measured) & set(seen[:4])  # nothing measured twice
    for key in seen[:4]:
        assert done.blocks[key] == partial.blocks[key]
    with pytest.raises(ConfigError, match="pass --restart") as info:
        run_profile(space, Settings(**{**SETTINGS.__dict__, "batch": 2}), out, protocol=FAST)
    assert info.value.field == "settings.batch"


# ---- CLI ---------------------------------------------------------------------------------------------------


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_cli_profile_and_predict(space_file, tmp_path):
    out = tmp_path / "prof.yaml"
    res = _run("profile", "--space", space_file, "--out", out, "--resolution", 64, "--batch", 1, "--text-len", 8,
               "--calibration", 4, "--warmup", 1, "--min-repeats", 2, "--max-repeats", 3, "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["calibration_networks"] == 4 and summary["blocks"] > 10
    arch_file = tmp_path / "arch.yaml"
    arch_file.write_text(LatencyProfile.load(out).calibration[0].arch.to_yaml())
    for predictor in ("lut", "learned"):
        res = _run("predict", arch_file, "--profile", out, "--predictor", predictor, "--json")
        assert res.exit_code == 0, res.output
        data = json.loads(res.stdout)
        assert data["predicted_ms"] > 0 and "measured_ms" not in data
        assert sum(data["breakdown"].values()) == pytest.approx(data["predicted_ms"])
    res = _run("predict", arch_file, "--profile", out, "--measure", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["measured_ms"] > 0 and "error_pct" in data
    res = _run("predict", "bk_tiny", "--predictor", "roofline", "--spec", "cloud_ai_100_pro", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["predicted_ms"] > 0
    saved = tmp_path / "calibrated.yaml"
    res = _run("predict", arch_file, "--profile", out, "--predictor", "roofline", "--spec", "a100_sxm")
    assert res.exit_code == 2 and "no fp32 peak" in res.stderr
    spec_file = tmp_path / "cpu.yaml"
    spec_file.write_text(json.dumps({"name": "this cpu", "source": "test", "peak_tflops": {"fp32": 0.05},
                                     "memory_bandwidth_gbs": 10}))
    res = _run("predict", arch_file, "--profile", out, "--predictor", "roofline", "--spec", spec_file,
               "--save-spec", saved, "--json")
    assert res.exit_code == 0, res.output
    assert load_spec(saved).calibrated_from["samples"] == 4


@pytest.mark.parametrize("args", [
    ("predict", "tiny", "--batch", 1),  # lut without a profile
    ("predict", "tiny", "--predictor", "roofline"),  # no spec
    ("predict", "tiny", "--predictor", "roofline", "--spec", "tpu_v9"),
    ("predict", "tiny", "--predictor", "magic"),
    ("profile", "--space", "search_spaces/spaces/tiny.yaml"),  # no --out
    ("profile", "--arch", "tiny", "--out", "x.yaml", "--dtype", "fp8"),
    ("profile", "--arch", "tiny", "--out", "x.yaml", "--statistic", "mean"),
])
def test_cli_user_errors_exit_2(args, tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).parents[1])
    res = _run(*args)
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith("error:") and "Traceback" not in res.output
    assert not Path("x.yaml").exists()


def test_cli_refuses_mismatched_profile(profile):
    res = _run("predict", "tiny", "--profile", profile.source, "--batch", 2)
    assert res.exit_code == 2 and "settings.batch" in res.stderr and profile.source in res.stderr
    bad = Path(profile.source).with_name("broken.yaml")
    bad.write_text("format: unet-nas-latency-profile/1\ndevice_name: x\nsettings: {dtype: fp8}\nprotocol: {}\n")
    res = _run("predict", "tiny", "--profile", bad)
    assert res.exit_code == 2 and f"{bad}:3: settings.dtype" in res.stderr


def test_shipped_gpu_profile_is_found_by_name_and_predicts_its_calibration_networks():
    """The measured H100 profile ships in the package; its LUT must reproduce the whole networks it was fitted on."""
    from proxies.latency.profile import find_profile, shipped_profiles

    assert "h100_sd15_fp16_b2_512" in shipped_profiles()
    profile = LatencyProfile.load(find_profile("h100_sd15_fp16_b2_512"))
    assert profile.settings.cuda_graph and profile.settings.dtype == "fp16" and profile.complete
    lut = LUTPredictor(profile)
    errors = [abs(lut.predict(c.arch) - c.timing.ms) / c.timing.ms for c in profile.calibration]
    assert max(errors) < 0.05


def test_unknown_profile_name_is_one_clear_error():
    from proxies.latency.profile import find_profile

    with pytest.raises(ConfigError, match="not a file, nor a shipped profile"):
        find_profile("no_such_profile")


def test_cuda_graph_needs_a_cuda_device():
    with pytest.raises(ConfigError, match="CUDA graphs"):
        Settings(device="cpu", cuda_graph=True)


# ---- trust: a profile notices measurements it should not be believed on ------------------------------------------


def _bad_calibration(out: Path) -> list[float]:
    """Feed the profile whole-network timings with a bad calibration: each one slowed by a different factor
    (1.5x to 4x, as when the networks were timed while other jobs came and went), so no line through the block
    sums fits them. Returns the written timings."""
    data = yaml.safe_load(out.read_text())
    factors = [1.5, 4.0, 1.8, 3.0, 2.2, 3.5]
    for item, factor in zip(data["calibration"], factors * 3, strict=False):
        item["timing"]["ms"] = item["timing"]["ms"] * factor
        item["timing"]["median_ms"] = item["timing"]["ms"]
    data.pop("trust", None)
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return [item["timing"]["ms"] for item in data["calibration"]]


def test_a_bad_fit_is_remeasured(space, profile, tmp_path):
    """Resuming a profile whose calibration does not fit its blocks: the networks are timed again (the fed-in
    timings are gone), the correction refitted, and the verdict and the re-measure recorded in the file."""
    out = tmp_path / "p.yaml"
    out.write_text(Path(profile.source).read_text())
    fed = _bad_calibration(out)
    corr = fit_profile_correction(LatencyProfile.load(out))
    assert corr.fit_mape_pct > FIT_LIMIT_PCT  # the fit the bad timings give, before any re-measure
    again = run_profile(space, SETTINGS, out, protocol=FAST, calibration=5)
    assert again.trust is not None and again.trust.remeasured_networks == 5
    # each network keeps its faster timing (other work only ever adds time): never the slower fed-in one, and
    # timings 1.5x-4x too slow do not all survive a fresh measurement
    now = [round(c.timing.ms, 6) for c in again.calibration]
    assert all(n <= f + 1e-6 for n, f in zip(now, fed, strict=True))
    assert any(n < f - 1e-6 for n, f in zip(now, fed, strict=True))
    saved = LatencyProfile.load(out)
    assert saved.trust.to_dict() == again.trust.to_dict()
    assert saved.trust.fit_mape_pct == pytest.approx(again.correction.fit_mape_pct, abs=0.01)
    # what re-measuring could not fix is a verdict with its figures, never silence
    assert saved.trust.trusted == (not saved.trust.reasons)
    if saved.correction.fit_mape_pct > FIT_LIMIT_PCT:
        assert not saved.trust.trusted and "calibration fit error" in saved.trust.reasons[0]


def test_a_bad_fit_that_is_not_remeasured_is_flagged(space, profile, tmp_path):
    """Without re-measuring, the same bad calibration is flagged: verdict, figure, file, and the CLI's warning."""
    out = tmp_path / "p.yaml"
    out.write_text(Path(profile.source).read_text())
    _bad_calibration(out)
    flagged = run_profile(space, SETTINGS, out, protocol=FAST, calibration=5, remeasure=False)
    trust = LatencyProfile.load(out).trust
    assert trust.to_dict() == flagged.trust.to_dict() and not trust.trusted and trust.remeasured_networks == 0
    assert trust.fit_mape_pct > FIT_LIMIT_PCT
    assert f"calibration fit error {trust.fit_mape_pct:.1f}%" in trust.line()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        report_profile(flagged, out, as_json=True)
    assert err.getvalue().count("\n") == 1 and "NOT trustworthy" in err.getvalue()
    assert f"{trust.fit_mape_pct:.1f}%" in err.getvalue()


def test_noisy_blocks_and_load_are_judged():
    """The spread and load rules on their own: a block repeated enough with a wide spread is noisy; load beyond
    the measuring threads on a machine is named with its figure."""
    base = LatencyProfile(settings=SETTINGS, protocol=FAST, device_name="cpu")
    base.blocks = {"a": Timing(1.0, 1.1, 40.0, 10), "b": Timing(1.0, 1.0, 40.0, 3), "c": Timing(1.0, 1.0, 2.0, 10)}
    assert noisy(base.blocks) == ["a"]  # b: three repeats say nothing about spread
    cpus = os.cpu_count() or 1
    quiet, busy = LoadLog([1.0]), LoadLog([1.0 + max(0.5, 0.25 * (cpus - 1)) + 1.0])
    assert not any("load" in r for r in judge(base, quiet).reasons)
    reasons = judge(base, busy).reasons
    assert any(r.startswith(f"load average up to {busy.samples[0]:.2f} on {cpus} CPUs") for r in reasons)
    assert any("1 of 3 blocks spread" in r for r in reasons)


def test_a_trust_section_is_validated(profile, tmp_path):
    data = yaml.safe_load(Path(profile.source).read_text())
    data["trust"] = {"verdict": "maybe"}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"trust\.verdict"):
        LatencyProfile.load(tmp_path / "p.yaml")


def test_the_fit_error_reason_rounds_the_figure_the_file_keeps():
    """A fit error whose 2-decimal rounding crosses a 1-decimal boundary (28.347 -> 28.35) reads the same in the
    reason and in every print of the saved figure."""
    from proxies.latency.lut import Correction

    base = LatencyProfile(settings=SETTINGS, protocol=FAST, device_name="cpu")
    base.correction = Correction(scale=1.66, offset_ms=0.94, n=5, fit_mape_pct=28.347)
    trust = judge(base, LoadLog([0.0]))
    saved = trust.to_dict()["fit_mape_pct"]
    assert saved == 28.35 and f"calibration fit error {saved:.1f}%" in trust.line()
