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


def _small_encoders(root: Path) -> tuple[Path, Path]:
    """A small VAE and a small CLIP text encoder with a character-level tokenizer, saved as local folders (no
    download): the precompute pipeline's cost on this CPU without SD-sized weights."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(32, 64, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
                  latent_channels=4).save_pretrained(root / "vae")
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    tok.save_pretrained(root / "clip")
    CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                 num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
                  ).save_pretrained(root / "clip")
    return root / "vae", root / "clip"


def _precompute_rate(tmp: Path, repeats: int) -> dict[str, object]:
    """images/s of ``precompute_shards`` end to end (JPEG decode, crop and resize, VAE, text encoder, shard
    write and hash) on webdataset tars at 256 px, one process, one thread; and the online cost of a
    CLIP-L-sized text encoder (what a token-id dataset makes the trainer run)."""
    import io
    import tarfile

    import numpy as np
    import torch
    from PIL import Image
    from transformers import CLIPTextConfig, CLIPTextModel

    from proxies.shards.precompute import Settings, precompute_shards

    vae, clip = _small_encoders(tmp)
    tars = tmp / "tars"
    tars.mkdir()
    rng = np.random.default_rng(0)
    per_tar, n_tars = 16, 2
    for t in range(n_tars):
        with tarfile.open(tars / f"{t:05d}.tar", "w") as tar:
            for k in range(per_tar):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (320, 288, 3), dtype=np.uint8)).save(buf, format="JPEG")
                for ext, data in (("jpg", buf.getvalue()), ("txt", f"a photo number {t} {k}".encode())):
                    info = tarfile.TarInfo(f"{t:05d}{k:04d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    rates = []
    for r in range(repeats):
        out = tmp / f"pre{r}"
        precompute_shards(Settings(str(tars), str(vae), str(clip), 256, shard_records=64), out, batch_size=8,
                          log=lambda m: None)
        units = [json.loads(p.read_text()) for p in sorted(out.glob("unit-*.json"))]
        rates.append(sum(u["records"] for u in units) / sum(u["seconds"] for u in units))
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
        "pipeline": f"unet-nas data precompute --format shards on {n_tars} webdataset tars x {per_tar} JPEGs "
                    "(320 x 288), 256 px, batch 8, one process, one thread; timed per unit (encoder loading "
                    "excluded)",
        "vae": "AutoencoderKL 32-64-64-64 channels (a small VAE; SD's is 128-256-512-512)",
        "text_encoder": "CLIP text transformer 128 wide, 2 layers, 77 tokens",
        "images_per_s": round(max(rates), 2),
        "images_per_s_noise_floor": round(max(rates) / statistics.median(rates) - 1, 3),
        "online_text_encoder": "CLIP-L-sized text transformer (random weights), 77 tokens, batch 8",
        "online_text_encoder_params": sum(p.numel() for p in clip_l.parameters()),
        "online_text_encoder_samples_per_s": round(8 / min(text_times), 2),
        "online_text_encoder_noise_floor": round(statistics.median(text_times) / min(text_times) - 1, 3),
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
