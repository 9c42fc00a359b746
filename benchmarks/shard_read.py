"""Read throughput of sharded datasets, the memory of a reader as the dataset grows 10x, precompute and online
text-encoder cost on this CPU.

For 256 px and 512 px records (VAE mean + std fp16, 4 x 32 x 32 / 4 x 64 x 64) with CLIP-L text as embeddings
(77 x 768 fp16) or as token ids (77 int32), it times the trainer's loader (``proxies.shards.stream_loader``:
order lookup, positioned reads, the per-sample draws of latent, timestep and noise) with 0, 1 and 2 worker
processes, batch 64, timed from the first batch (worker start-up excluded), against the anchors' consumption
rate (MosaicML's SD2 run read 1,100 samples/s at 256 px and 290 at 512 px on 8 A100s). Reads are "cold" (the
shards dropped from the page cache with ``posix_fadvise(DONTNEED)`` before each run) and "warm" (page cache).
Each figure is the best of ``--repeats`` interleaved runs; the spread (best / median - 1) is the noise floor.
Memory: the peak resident and anonymous memory of a process that streams the same number of samples from a
dataset and from one 10x larger.

    python benchmarks/shard_read.py [--records 1500] [--steps 12] [--repeats 3] [--out shard_read_cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import write_result

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))

from proxies.shards import Draws, ShardedDataset, stream_loader  # noqa: E402
from proxies.shards.writer import write_synthetic  # noqa: E402

CONFIGS = {  # name: (latent shape, text shape, text mode)
    "256px_embeddings": ((4, 32, 32), (77, 768), "embeddings"),
    "256px_tokens": ((4, 32, 32), (77,), "tokens"),
    "512px_embeddings": ((4, 64, 64), (77, 768), "embeddings"),
    "512px_tokens": ((4, 64, 64), (77,), "tokens"),
}
ANCHOR = {"256px": 1100, "512px": 290}  # samples/s on 8 A100s (MosaicML SD2 from scratch)
BATCH = 64


def _drop_cache(root: Path) -> None:
    for p in root.glob("*.npy"):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _run(root: Path, steps: int, workers: int, start: int) -> float:
    ds = ShardedDataset(root, verify="size")
    loader = stream_loader(ds, Draws(0, 0, 1000, 0.1), start, start + steps, BATCH, 0, 1, BATCH, workers=workers)
    batches = iter(loader)
    next(batches)  # timed from the first batch: worker start-up is paid once per phase, not per sample
    t = time.perf_counter()
    n = sum(len(b["id"]) for b in batches)
    return n / (time.perf_counter() - t)


def _memory(root: Path, steps: int) -> dict[str, float]:
    """Peak RSS and anonymous memory (MB) of a fresh process streaming ``steps`` batches."""
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
            "from proxies.shards import Draws, ShardedDataset, stream_loader\n"
            f"ds = ShardedDataset({str(root)!r}, verify='hash')\n"
            f"for b in stream_loader(ds, Draws(0, 0, 1000, 0.1), 0, {steps}, {BATCH}, 0, 1, {BATCH}): pass\n"
            "s = dict(l.split(':', 1) for l in open('/proc/self/status'))\n"
            "print(int(s['VmHWM'].split()[0]) / 1024, int(s['RssAnon'].split()[0]) / 1024)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout.split()
    return {"peak_rss_mb": round(float(out[0]), 1), "rss_anon_mb": round(float(out[1]), 1)}


def _precompute_rate(tmp: Path, repeats: int) -> dict[str, object]:
    """images/s of the VAE + text encoder on this CPU (one thread) with a small VAE at 256 px."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(32, 64, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, latent_channels=4).eval()
    pixels = torch.rand(8, 3, 256, 256) * 2 - 1
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        with torch.no_grad():
            vae.encode(pixels).latent_dist.mean.sum()
        times.append(time.perf_counter() - t)
    clip_l = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                          num_hidden_layers=12, max_position_embeddings=77, vocab_size=49408)).eval()
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, 49408, (8, 77)))
    text_times = []
    for _ in range(repeats):
        t = time.perf_counter()
        with torch.no_grad():
            clip_l(ids)[0].sum()
        text_times.append(time.perf_counter() - t)
    return {
        "vae": "AutoencoderKL 32-64-64-64 channels (a small VAE; SD's is 128-256-512-512), 256 px, batch 8",
        "vae_params": sum(p.numel() for p in vae.parameters()),
        "vae_images_per_s": round(8 / min(times), 2),
        "vae_noise_floor": round(statistics.median(times) / min(times) - 1, 3),
        "text_encoder": "CLIP-L-sized text transformer (random weights, 123M parameters), 77 tokens, batch 8",
        "text_encoder_params": sum(p.numel() for p in clip_l.parameters()),
        "online_text_encoder_samples_per_s": round(8 / min(text_times), 2),
        "text_noise_floor": round(statistics.median(text_times) / min(text_times) - 1, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=1500)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="shard_read_cpu")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    results: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for name, (latent, text, mode) in CONFIGS.items():
            root = tmp / name
            index = write_synthetic(root, args.records, latent, text, mode, shard_records=512)
            rec_bytes = index.spec.record_bytes
            rates: dict[str, list[float]] = {}
            for r in range(args.repeats):  # interleaved: cold and warm, 0/1/2 workers, every repeat
                for workers in (0, 1, 2):
                    _drop_cache(root)
                    rates.setdefault(f"cold_w{workers}", []).append(_run(root, args.steps, workers, r * args.steps))
                    rates.setdefault(f"warm_w{workers}", []).append(_run(root, args.steps, workers, r * args.steps))
            row: dict[str, object] = {"record_bytes": rec_bytes, "records": args.records,
                                      "samples_per_run": args.steps * BATCH}
            for key, values in rates.items():
                best = max(values)
                row[key] = {"samples_per_s": round(best, 1), "MB_per_s": round(best * rec_bytes / 1e6, 1),
                            "noise_floor": round(best / statistics.median(values) - 1, 3)}
            row["anchor_samples_per_s_8xA100"] = ANCHOR[name.split("_")[0]]
            results[name] = row
            print(name, json.dumps({k: v for k, v in row.items() if k.startswith(("cold", "warm"))}))
            if name == "256px_tokens":  # memory as the dataset grows 10x (tokens: small records, many of them)
                big = tmp / "big"
                write_synthetic(big, args.records * 10, latent, text, mode, shard_records=512)
                results["memory"] = {"config": name, "steps": args.steps, "batch": BATCH,
                                     "dataset_records": [args.records, args.records * 10],
                                     "dataset_mb": [round(sum(p.stat().st_size for p in d.glob('*.npy')) / 1e6, 1)
                                                    for d in (root, big)],
                                     "small": _memory(root, args.steps), "10x": _memory(big, args.steps)}
                print("memory", json.dumps(results["memory"]))
                import shutil

                shutil.rmtree(big)
            import shutil

            shutil.rmtree(root)
        results["precompute"] = _precompute_rate(tmp, args.repeats)
        print("precompute", json.dumps(results["precompute"]))
    load = os.getloadavg()
    path = write_result(args.out, {
        "batch": BATCH, "repeats": args.repeats, "torch_threads": 1, "load_average_1_5_15": [round(v, 2) for v in load],
        "note": "shared 2-core machine loaded by other jobs; cold = shards dropped from the page cache with "
                "posix_fadvise before the run (the disk is a virtual disk); warm = page cache",
        "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
