"""How well an imported ONNX Runtime profile predicts whole-network ONNX Runtime latency, against the noise floor.

The same protocol as ``benchmarks/latency_accuracy.py``, with ONNX Runtime in place of PyTorch eager:

1. Export every block of the space and ``--calibration`` whole networks (``export_space``, as
   ``unet-nas profile export``), time them with ONNX Runtime (``run-onnx``: one intra-op thread on the CPU, warm-up,
   median of repeats; networks interleaved), write the ``key,ms,repeats,spread`` CSV and import it as a LUT profile
   (``unet-nas profile import``): the path a user takes with their own toolchain.
2. Sample ``--archs`` held-out archs (none of the calibration ones), export each whole network the same way and
   time each in two separate passes (interleaved in groups, the second pass in another order).
3. The imported profile's LUT prediction (and a linear fit on MACs) against pass 1: MAPE, share within ±10% /
   ±15%, Kendall tau, Spearman; pass 2 vs pass 1 is the noise floor. Writes
   ``benchmarks/results/onnx_profile_<provider>[_SUFFIX].json``, the timings CSV, the imported profile and a scatter.
   ``min_statistic`` holds the same figures with every model summarised by the minimum of the same runs instead of
   the median (the PyTorch profile's default statistic; it resists load from other processes better).

CPU (tiny space, 128 px, batch 2, fp32, 1 thread; about 10 minutes on 2 shared cores):
    python benchmarks/onnx_profile.py
Elsewhere, without overwriting the committed result:
    python benchmarks/onnx_profile.py --out-suffix mybox
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import RESULTS, write_result
from latency_accuracy import held_out, metrics, scatter
from scipy.stats import kendalltau, spearmanr

from proxies.cost import arch_costs
from proxies.latency.lut import LUTPredictor
from proxies.latency.onnx_export import export_network, export_space, require_onnx
from proxies.latency.onnx_import import import_profile
from proxies.latency.onnx_manifest import Manifest, load_manifest, space_hash
from proxies.latency.onnx_runtime import time_files, time_manifest, write_timings
from proxies.latency.profile import Protocol, Settings, Timing
from proxies.latency.timing import cpu_name
from search_spaces.errors import ConfigError
from search_spaces.space import SearchSpace

ROOT = Path(__file__).parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default=str(ROOT / "search_spaces" / "spaces" / "tiny.yaml"))
    parser.add_argument("--provider", default="cpu", help="ONNX Runtime provider: cpu, cuda or tensorrt")
    parser.add_argument("--dtype", default=None, help="default: fp32 on cpu, fp16 otherwise")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=None, help="image px; default: space sample_size x 8")
    parser.add_argument("--text-len", type=int, default=77)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads; default 1 on cpu")
    parser.add_argument("--archs", type=int, default=40, help="held-out archs (>= 30 for the committed result)")
    parser.add_argument("--calibration", type=int, default=16, help="whole networks that fit the correction")
    parser.add_argument("--out-suffix", default="", help="appended to the result names (keeps the committed ones)")
    parser.add_argument("--work", default=None, help="folder for the ONNX files, kept and reused by a re-run "
                        "(default: a temporary one)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 8 archs, 6 calibration, 64 px, few repeats")
    args = parser.parse_args()

    started = time.perf_counter()
    _, ort = require_onnx()
    cpu = args.provider == "cpu"
    space = SearchSpace.from_yaml(args.space)
    space_label = os.path.relpath(args.space, ROOT)
    base = space.decode([0] * len(space.decisions), check=False)
    protocol = Protocol(statistic="median", warmup=3, min_repeats=10, max_repeats=50)
    if args.quick:
        args.archs, args.calibration = 8, 6
        args.resolution = args.resolution or 64
        protocol = Protocol(statistic="median", warmup=2, min_repeats=4, max_repeats=8)
    settings = Settings(device="cpu", dtype=args.dtype or ("fp32" if cpu else "fp16"), batch=args.batch,
                        resolution=args.resolution or base.sample_size * 8, text_len=args.text_len, threads=None)
    threads = args.threads or (1 if cpu else None)
    name = f"onnx_profile_{args.provider}" + ("_quick" if args.quick else "") + \
        (f"_{args.out_suffix}" if args.out_suffix else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="onnx_profile_"))

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    try:
        manifest = _reusable_export(work / "export", space, settings) if args.work else None
        if manifest is None:
            say(f"exporting {space_label} at {settings.resolution} px, batch {settings.batch}, {settings.dtype}")
            manifest = export_space(space, settings, work / "export", space_file=space_label,
                                    calibration=args.calibration)
        say(f"{len(manifest.blocks)} blocks, {len(manifest.networks)} networks exported; timing them on ONNX "
            f"Runtime ({args.provider}, {threads or 'default'} thread(s))")
        raw: dict[str, list[float]] = {}
        timings = time_manifest(manifest, args.provider, threads, protocol, samples_out=raw)
        csv_path = write_timings(RESULTS / f"{name}_timings.csv", timings)
        # the same runs summarised by their minimum, the PyTorch profile's default statistic
        min_csv = write_timings(work / "timings_min.csv", {k: _by_min(t, raw[k]) for k, t in timings.items()})
        runtime = f"onnxruntime {ort.__version__} {args.provider}, {threads or 'default'} intra-op thread(s)"
        device = f"{cpu_name()} ({threads} thread(s))" if cpu else args.provider
        profile = import_profile(work / "export", csv_path, device, runtime, RESULTS / f"{name}_profile.yaml",
                                 space_file=args.space)
        profile_min = import_profile(work / "export", min_csv, device, runtime, space_file=args.space,
                                     statistic="min")
        cal = [c.arch for c in profile.calibration]
        archs = held_out(space, args.archs, set(cal), seed=12345)
        say(f"imported; exporting {len(archs)} held-out networks")
        paths = []
        for i, arch in enumerate(archs):
            path = work / "held_out" / f"{i:03d}.onnx"
            if not (args.work and path.is_file()):
                export_network(arch, settings, path)
            paths.append(path)
        say("timing the held-out networks in two passes")
        raw1: list[list[float]] = []
        pass1 = np.array([t.ms for t in time_files(paths, args.provider, threads, protocol, fp16=not cpu,
                                                   samples_out=raw1)])
        order = list(range(len(archs)))
        random.Random(7).shuffle(order)
        raw2: list[list[float]] = []
        t2 = time_files([paths[i] for i in order], args.provider, threads, protocol, fp16=not cpu, samples_out=raw2)
        pass2 = np.empty(len(archs))
        pass2[order] = [t.ms for t in t2]
        pass1_min = np.array([min(r) for r in raw1])
        pass2_min = np.empty(len(archs))
        pass2_min[order] = [min(r) for r in raw2]
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)

    lut = LUTPredictor(profile)
    s = settings
    macs = np.array([arch_costs(a, s.batch, s.latent_size, s.text_len).macs for a in archs], float)
    cal_macs = np.array([arch_costs(a, s.batch, s.latent_size, s.text_len).macs for a in cal], float)
    slope, intercept = np.polyfit(cal_macs, [c.timing.ms for c in profile.calibration], 1)
    predicted = {"lut": np.array([lut.predict(a) for a in archs]), "macs_linear": slope * macs + intercept}
    results = {k: metrics(v, pass1) for k, v in predicted.items()}
    noise = metrics(pass2, pass1)
    lut_min = np.array([LUTPredictor(profile_min).predict(a) for a in archs])
    min_statistic = {"noise": metrics(pass2_min, pass1_min), "lut": metrics(lut_min, pass1_min),
                     "correction": profile_min.correction.__dict__ if profile_min.correction else None}
    macs_rank = {"kendall_tau": round(float(kendalltau(macs, pass1).statistic), 4),
                 "spearman": round(float(spearmanr(macs, pass1).statistic), 4)}
    m = results["lut"]
    targets = {"lut_within_15pct_ge_0.90": m["within_15pct"] >= 0.90,
               "lut_kendall_tau_ge_0.85": m["kendall_tau"] >= 0.85,
               "lut_no_worse_than_noise": (m["within_15pct"] >= noise["within_15pct"] - 0.05
                                           and m["kendall_tau"] >= noise["kendall_tau"] - 0.05)}
    plot = RESULTS / f"{name}.png"
    scatter(plot, pass1, {"pass 2 (noise)": pass2, "lut (imported ONNX Runtime profile)": predicted["lut"]},
            f"ONNX Runtime {args.provider}, {profile.device_name}: {len(archs)} held-out archs, {s.resolution} px, "
            f"batch {s.batch}, {s.dtype}")
    elapsed = time.perf_counter() - started
    worst = max((x.max_abs_diff or 0.0 for x in manifest.models), default=0.0)
    payload = {
        "device": profile.device_name, "runtime": runtime, "n_archs": len(archs), "space": space_label,
        "settings": {**s.query(), "threads": threads, "latent_size": s.latent_size},
        "protocol": protocol.__dict__, "export": {"exporter": manifest.exporter, "opset": manifest.opset,
                                                  "blocks": len(manifest.blocks), "networks": len(manifest.networks),
                                                  "max_abs_diff_fp32_check": worst},
        "calibration_networks": len(cal),
        "correction": profile.correction.__dict__ if profile.correction else None,
        "noise": noise, "predictors": results, "macs_rank": macs_rank, "targets": targets,
        "min_statistic": min_statistic,
        "plot": plot.name, "timings_csv": csv_path.name, "profile": f"{name}_profile.yaml",
        "measured_ms": {"pass1": pass1.round(4).tolist(), "pass2": pass2.round(4).tolist(),
                        "pass1_min": pass1_min.round(4).tolist(), "pass2_min": pass2_min.round(4).tolist()},
        "predicted_ms": {"lut": predicted["lut"].round(4).tolist(), "lut_min": lut_min.round(4).tolist()},
        "elapsed_s": round(elapsed, 1), "quick": args.quick,
    }
    path = write_result(name, payload)
    print(f"{'':12s} {'MAPE':>7s} {'±10%':>6s} {'±15%':>6s} {'tau':>6s} {'rho':>6s}")
    for k, v in [("noise", noise), *results.items()]:
        print(f"{k:12s} {100 * v['mape']:6.1f}% {v['within_10pct']:6.2f} {v['within_15pct']:6.2f} "
              f"{v['kendall_tau']:6.3f} {v['spearman']:6.3f}")
    for k, v in (("noise (min)", min_statistic["noise"]), ("lut (min)", min_statistic["lut"])):
        print(f"{k:12s} {100 * v['mape']:6.1f}% {v['within_10pct']:6.2f} {v['within_15pct']:6.2f} "
              f"{v['kendall_tau']:6.3f} {v['spearman']:6.3f}")
    print(f"MACs alone rank them with Kendall tau {macs_rank['kendall_tau']:.3f}")
    print(f"targets: {targets}")
    print(f"wrote {path} and {plot} in {elapsed:.0f} s")


def _by_min(timing: Timing, samples: list[float]) -> Timing:
    return Timing(ms=float(min(samples)), median_ms=timing.median_ms, spread_pct=timing.spread_pct,
                  repeats=timing.repeats)


def _reusable_export(folder: Path, space: SearchSpace, settings: Settings) -> Manifest | None:
    """A finished export in ``--work`` of this space at these settings (re-runs skip the export)."""
    try:
        manifest = load_manifest(folder)
    except ConfigError:
        return None
    same = manifest.settings.query() == settings.query() and manifest.space_sha256 == space_hash(space)
    return manifest if same else None


if __name__ == "__main__":
    main()
