"""``unet-nas data``: build and inspect latent/text caches (see ``proxies.data``)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from nas.cli import AllowPickle, JsonFlag, Typer, app, console, emit_json, table, user_errors
from search_spaces.errors import ConfigError

data_app = Typer(help="Precompute and inspect cached VAE latents and text embeddings.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("precompute")
@user_errors
def data_precompute(
    source: Annotated[str, typer.Argument(help="Images with captions (metadata.jsonl or NAME.txt beside each), "
                                          "or webdataset tars (img2dataset's output): a folder of *.tar, a "
                                          ".tar, or a quoted glob.")],
    vae: Annotated[Path, typer.Option(help="Local AutoencoderKL folder (or an SD checkpoint with vae/).")],
    text_encoder: Annotated[Path, typer.Option("--text-encoder", help="Local CLIP text encoder + tokenizer folder "
                                               "(or an SD checkpoint with text_encoder/ and tokenizer/).")],
    out: Annotated[Path, typer.Option(help="Cache folder or sharded dataset folder to write.")],
    resolution: Annotated[int, typer.Option(min=8, help="Images are center-cropped and resized to this.")] = 512,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    val_fraction: Annotated[float, typer.Option(min=0.0, max=0.5, help="Cache format: held-out share.")] = 0.05,
    device: Annotated[str, typer.Option(help="cpu, cuda, or auto (each process its own GPU)")] = "cpu",
    fmt: Annotated[str, typer.Option("--format", help="cache: one in-memory cache (small data); shards: a sharded "
                                     "dataset, resumable, on many processes (accelerate launch / torchrun).")
                   ] = "cache",
    shard_records: Annotated[int, typer.Option("--shard-records", min=1, help="Shards: folder images per unit "
                                               "and records per shard (1024 at 512 px with CLIP-L embeddings "
                                               "is ~190 MB).")] = 1024,
    text: Annotated[str, typer.Option(help="Shards: store text 'embeddings', or 'tokens' (ids; the trainer runs "
                                      "the frozen text encoder).")] = "embeddings",
    val_units: Annotated[int, typer.Option("--val-units", min=0, help="Shards: the last N units (tars or image "
                                           "chunks) are the validation split.")] = 0,
    allow_pickle: AllowPickle = False,
) -> None:
    """Encode images and captions once: VAE posterior mean and std, and text embeddings (or token ids)."""
    if fmt not in ("cache", "shards"):
        raise ConfigError(f"must be cache or shards, not {fmt!r}", field="--format")
    if text not in ("embeddings", "tokens"):
        raise ConfigError(f"must be embeddings or tokens, not {text!r}", field="--text")
    if fmt == "shards":
        _precompute_shards(source, vae, text_encoder, out, resolution, batch_size, device, shard_records, text,
                           val_units, allow_pickle)
        return
    from proxies.data import precompute

    if not Path(source).is_dir():
        raise ConfigError("image folder not found" if not source.endswith(".tar") and "*" not in source else
                          "webdataset tars need --format shards", source=source)
    cache = precompute(source, vae, text_encoder, resolution=resolution, batch_size=batch_size,
                       val_fraction=val_fraction, device=device, allow_pickle=allow_pickle)
    cache.save(out)
    console.print(f"wrote {len(cache)} items to {out} (latents {list(cache.latent_shape)}, "
                  f"text {list(cache.text.shape[1:])})")


def _precompute_shards(source: str, vae: Path, text_encoder: Path, out: Path, resolution: int, batch_size: int,
                       device: str, shard_records: int, text: str, val_units: int, allow_pickle: bool) -> None:
    """One process, or one of many (``accelerate launch`` / ``torchrun`` set the ranks): each encodes its units
    with its own copy of the encoders; the main process writes the index once all are done."""
    from accelerate import PartialState
    from rich.progress import MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from proxies.shards.precompute import Settings, precompute_shards

    state = PartialState(cpu=device == "cpu")
    settings = Settings(str(source), str(vae), str(text_encoder), resolution, text, shard_records, val_units)
    progress = Progress(TextColumn("encoding"), MofNCompleteColumn(), TextColumn("images"),
                        TextColumn("{task.fields[rate]:.1f} images/s"), TimeElapsedColumn(), console=console,
                        disable=not console.is_terminal or not state.is_main_process)
    started = time.perf_counter()
    with progress:
        task = progress.add_task("encode", total=None, rate=0.0)

        def on_batch(n: int) -> None:
            done = progress.tasks[0].completed + n
            progress.update(task, completed=done, rate=done / (time.perf_counter() - started))

        report = precompute_shards(settings, out, batch_size=batch_size,
                                   device=str(state.device) if device == "auto" else device,
                                   allow_pickle=allow_pickle, rank=state.process_index, world=state.num_processes,
                                   barrier=state.wait_for_everyone, log=lambda m: console.print(m, highlight=False),
                                   on_batch=on_batch)
    if report is not None:
        console.print(f"wrote {report['records']} records in {report['shards']} shards to {out}; "
                      f"{report['unreadable']} unreadable images (named in {out / 'report.json'})")


@data_app.command("convert")
@user_errors
def data_convert(cache_dir: Annotated[str, typer.Argument(help="A cache folder, or digits.")],
                 out: Annotated[Path, typer.Option(help="Sharded dataset folder to write.")],
                 shard_mb: Annotated[int, typer.Option("--shard-mb", min=1, help="Shard size.")] = 128) -> None:
    """Write a cache (today's one-file format, or the built-in digits) as a sharded dataset."""
    from proxies.data import LatentCache, digits_cache
    from proxies.shards import convert_cache

    cache = digits_cache() if cache_dir == "digits" else LatentCache.load(cache_dir)
    index = convert_cache(cache, out, shard_bytes=shard_mb << 20)
    console.print(f"wrote {sum(s.count for s in index.shards)} records in {len(index.shards)} shards to {out}")


@data_app.command("verify")
@user_errors
def data_verify(dataset: Annotated[str, typer.Argument(help="A sharded dataset folder or URL.")],
                as_json: JsonFlag = False) -> None:
    """Check every shard of a sharded dataset against the sizes and SHA-256 of its index."""
    from proxies.shards import ShardedDataset

    ds = ShardedDataset(dataset, skip_bad=True)
    bad = list(ds.skipped)
    for info in ds.index.shards:  # remote datasets: hashed as they download into the cache
        try:
            ds.store.local(info)
        except ConfigError as exc:
            bad.append(f"{info.file}: {exc.message}")
    if as_json:
        emit_json({"shards": len(ds.index.shards) + len(ds.skipped), "bad": bad})
    for line in bad:
        console.print(f"bad shard {line}", highlight=False)
    if bad:
        raise typer.Exit(1)
    if not as_json:
        console.print(f"{len(ds.index.shards)} shards match the index")


@data_app.command("digits")
@user_errors
def data_digits(out: Annotated[Path, typer.Option(help="Cache folder to write.")],
                seed: Annotated[int, typer.Option(help="Shuffle seed of the train/val split.")] = 0) -> None:
    """Write the built-in digits dataset (scikit-learn's, offline) as a cache folder."""
    from proxies.data import digits_cache

    cache = digits_cache(seed=seed)
    cache.save(out)
    console.print(f"wrote {len(cache)} digits to {out}")


@data_app.command("shapes")
@user_errors
def data_shapes(out: Annotated[Path, typer.Option(help="Cache folder to write.")],
                seed: Annotated[int, typer.Option(help="Seed of the rendering jitter and the train/val split.")] = 0,
                per_combination: Annotated[int, typer.Option(min=1, help="Images per combination of the 96 "
                                                                        "attribute combinations.")] = 36,
                objects: Annotated[int, typer.Option(min=1, max=2, help="Shapes per image: 2 is the harder "
                                                     "variant (benchmark shapes2), as many images.")] = 1) -> None:
    """Write the built-in shapes dataset (rendered, offline; captions like "small red circle top left") as a cache
    folder, for experiments and training recipes (data: FOLDER)."""
    from proxies.shapes import shapes_cache

    cache = shapes_cache(per_combination=per_combination, seed=seed, objects=objects)
    cache.save(out)
    console.print(f"wrote {len(cache)} shapes to {out}")


@data_app.command("show")
@user_errors
def data_show(cache_dir: Annotated[str, typer.Argument(help="A cache folder, or a sharded dataset (folder or "
                                                       "URL).")], as_json: JsonFlag = False) -> None:
    """The manifest of a cache, or the index of a sharded dataset (without its shard list), after checking it."""
    from proxies.data import LatentCache
    from proxies.shards import ShardedDataset, is_sharded

    if is_sharded(cache_dir):
        index = ShardedDataset(cache_dir, verify="size").index.to_json()
        manifest = {k: v for k, v in index.items() if k not in ("shards", "uncond")}
        manifest["shards"] = len(index["shards"])
    else:
        manifest = LatentCache.load(cache_dir).manifest
    if as_json:
        emit_json(manifest)
        return
    out = table("field", "value", title=str(cache_dir))
    for key, value in manifest.items():
        out.add_row(key, json.dumps(value) if isinstance(value, dict | list) else str(value))
    console.print(out)
