"""``unet-nas data``: build and inspect latent/text caches (see ``proxies.data``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from nas.cli import AllowPickle, JsonFlag, app, console, emit_json, user_errors
from proxies.data import LatentCache, digits_cache, precompute

data_app = typer.Typer(help="Precompute and inspect cached VAE latents and text embeddings.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("precompute")
@user_errors
def data_precompute(
    folder: Annotated[Path, typer.Argument(help="Images with captions: metadata.jsonl or NAME.txt beside each.")],
    vae: Annotated[Path, typer.Option(help="Local AutoencoderKL folder (or an SD checkpoint with vae/).")],
    text_encoder: Annotated[Path, typer.Option("--text-encoder", help="Local CLIP text encoder + tokenizer folder "
                                               "(or an SD checkpoint with text_encoder/ and tokenizer/).")],
    out: Annotated[Path, typer.Option(help="Cache folder to write.")],
    resolution: Annotated[int, typer.Option(min=8, help="Images are center-cropped and resized to this.")] = 512,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    val_fraction: Annotated[float, typer.Option(min=0.0, max=0.5)] = 0.05,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    allow_pickle: AllowPickle = False,
) -> None:
    """Encode an image+caption folder once: VAE posterior mean and std, and text embeddings."""
    cache = precompute(folder, vae, text_encoder, resolution=resolution, batch_size=batch_size,
                       val_fraction=val_fraction, device=device, allow_pickle=allow_pickle)
    cache.save(out)
    console.print(f"wrote {len(cache)} items to {out} (latents {list(cache.latent_shape)}, "
                  f"text {list(cache.text.shape[1:])})")


@data_app.command("digits")
@user_errors
def data_digits(out: Annotated[Path, typer.Option(help="Cache folder to write.")],
                seed: Annotated[int, typer.Option(help="Shuffle seed of the train/val split.")] = 0) -> None:
    """Write the built-in digits dataset (scikit-learn's, offline) as a cache folder."""
    cache = digits_cache(seed=seed)
    cache.save(out)
    console.print(f"wrote {len(cache)} digits to {out}")


@data_app.command("show")
@user_errors
def data_show(cache_dir: Annotated[Path, typer.Argument(help="A cache folder.")], as_json: JsonFlag = False) -> None:
    """The manifest of a cache, after checking it against its files."""
    cache = LatentCache.load(cache_dir)
    if as_json:
        emit_json(cache.manifest)
        return
    table = Table("field", "value", title=str(cache_dir))
    for key, value in cache.manifest.items():
        table.add_row(key, str(value))
    console.print(table)
