"""The ``unet-nas`` command line (also ``python -m nas``).

Rich tables for people, ``--json`` for programs. Bad input (a broken arch, space or argument) prints one line
``error: <file>:<line>: <field>: <what is wrong>`` on stderr and exits with code 2, never a traceback.
"""

from __future__ import annotations

import functools
import json
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from nas.redaction import scrub
from proxies.cost import arch_costs, constraint_filter
from search_spaces import ConfigError, UNetArch, list_archs, load_arch, space_path
from search_spaces.space import SearchSpace

app = typer.Typer(
    name="unet-nas",
    help="Hardware-aware neural architecture search for text-to-image diffusion U-Nets.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
arch_app = typer.Typer(help="Describe architectures: reference names, arch YAML/JSON, diffusers or Deci configs.",
                       no_args_is_help=True)
space_app = typer.Typer(help="Inspect, count and sample search spaces.", no_args_is_help=True)
app.add_typer(arch_app, name="arch")
app.add_typer(space_app, name="space")

# wide enough for the per-stage table when output goes to a pipe or a file (rich would default to 80 columns);
# no markup: what is printed quotes names and values from user files, and '[/x]' there must stay text
console = Console(width=None if sys.stdout.isatty() else 140, markup=False)
F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str) -> typer.Exit:
    """Print one error line on stderr; the caller raises the returned Exit (code 2)."""
    # the message quotes user input (keys, values, paths): escaped, so that '[/x]' is text, not rich markup
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/] {escape(scrub(message))}",
                                                                markup=True)
    return typer.Exit(code=2)


def user_errors(func: F) -> F:
    """Turn the project's ConfigError into one line and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ConfigError as exc:
            raise fail(str(exc)) from None

    return wrapper  # type: ignore[return-value]


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


JsonFlag = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]
AllowPickle = Annotated[bool, typer.Option(
    "--allow-pickle", help="Also read pickle checkpoints (.bin/.pt/.ckpt), with torch.load(weights_only=True). "
                           "Off by default: a pickle can run code when it is loaded; prefer safetensors.")]


# ---- arch ------------------------------------------------------------------------------------------------------


@arch_app.command("list")
@user_errors
def arch_list(as_json: JsonFlag = False) -> None:
    """The shipped reference architectures with their parameter counts."""
    from search_spaces import get_arch

    rows = [{"name": n, "params": arch_costs(get_arch(n)).params, "arch": str(get_arch(n))} for n in list_archs()]
    if as_json:
        emit_json(rows)
        return
    table = Table("name", "params", "layout", title="reference architectures")
    for r in rows:
        table.add_row(r["name"], f"{r['params']:,}", r["arch"].split("(", 1)[1].rstrip(")"))
    console.print(table)


@arch_app.command("describe")
@user_errors
def arch_describe(
    ref: Annotated[str, typer.Argument(help="Reference name (sd15, bk_tiny, ...) or a file: arch YAML/JSON, "
                                            "diffusers UNet2DConditionModel config.json, "
                                            "Deci flexible_unet config.json")],
    batch: Annotated[int, typer.Option(min=1, help="Batch size (2 = classifier-free guidance).")] = 1,
    resolution: Annotated[int | None, typer.Option(min=1, help="Latent size; default: the arch's sample_size.")] = None,
    text_len: Annotated[int, typer.Option("--text-len", min=1, help="Text tokens.")] = 77,
    as_json: JsonFlag = False,
) -> None:
    """Params, MACs and a per-stage table of one architecture (closed form: no model is built)."""
    arch = load_arch(ref)
    cost = arch_costs(arch, batch=batch, resolution=resolution, text_len=text_len)
    stages = _stage_rows(arch, cost)
    if as_json:
        emit_json({
            "name": arch.name, "params": cost.params, "macs": cost.macs, "attention_macs": cost.attention_macs,
            "batch": batch, "resolution": cost.resolution, "text_len": text_len,
            "stages": stages, "arch": arch.to_dict(),
        })
        return
    title = f"{arch.name or ref}: {cost.params:,} params, {cost.macs / 1e9:,.1f} GMACs " \
            f"(batch {batch}, {cost.resolution}x{cost.resolution} latents, {text_len} tokens)"
    table = Table("stage", "channels", "size", "resnets", "attentions", "heads", "depth", "resample",
                  "params", "GMACs", title=title)
    for r in stages:
        table.add_row(r["stage"], str(r["channels"] or ""), r["resolution"], str(r["resnets"]), str(r["attentions"]),
                      str(r["heads"] or ""), str(r["transformer_layers"] or ""), r["resample"],
                      f"{r['params']:,}", f"{r['macs'] / 1e9:.2f}")
    console.print(table)
    console.print(f"attention matmuls (SDPA): {cost.attention_macs / 1e9:.1f} GMACs of the total "
                  "(fvcore's default count leaves these out)")


def _stage_rows(arch: UNetArch, cost: Any) -> list[dict[str, Any]]:
    sizes = arch.sizes(cost.resolution)
    rows = []
    named: list[tuple[str, Any, int]] = [(f"down[{i}]", s, s.channels) for i, s in enumerate(arch.down)]
    if arch.mid is not None:
        named.append(("mid", arch.mid, arch.down[-1].channels))
    named += [(f"up[{i}]", s, s.channels) for i, s in enumerate(arch.up)]
    level = 0
    for name, s, channels in named:
        stage_level = level
        if getattr(s, "downsample", False):
            level += 1
        if getattr(s, "upsample", False):
            level -= 1
        h, w = sizes[stage_level]
        resample = "down" if getattr(s, "downsample", False) else "up" if getattr(s, "upsample", False) else ""
        c = cost.stages[name]
        rows.append({"stage": name, "channels": channels, "resolution": f"{h}x{w}", "resnets": s.resnets,
                     "attentions": s.attentions, "heads": s.heads, "transformer_layers": s.transformer_layers,
                     "resample": resample, "params": c.params, "macs": c.macs})
    stem = cost.stages["stem"]
    rows.append({"stage": "stem", "channels": arch.stem_channels, "resolution": "", "resnets": 0, "attentions": 0,
                 "heads": None, "transformer_layers": None, "resample": "", "params": stem.params, "macs": stem.macs})
    return rows


# ---- space -----------------------------------------------------------------------------------------------------

SpaceFile = Annotated[Path, typer.Argument(help="A shipped space's name (digits, shapes, ...), a space YAML, or an "
                                                "experiment YAML with a space: section.")]


@space_app.command("show")
@user_errors
def space_show(file: SpaceFile, as_json: JsonFlag = False) -> None:
    """The decisions of a space and their choices."""
    space = SearchSpace.from_yaml(space_path(file))
    info = {"name": space.name, "teacher": space.teacher, "cardinality": space.cardinality(),
            "constraints": space.constraints, "globals": space.globals, "decisions": space.describe()}
    if as_json:
        emit_json(info)
        return
    table = Table("decision", "choices", title=f"space {space.name or file}: {info['cardinality']:,} archs")
    for row in info["decisions"]:
        table.add_row(row["decision"], ", ".join(str(c) for c in row["choices"]))
    console.print(table)
    if space.constraints:
        console.print(f"constraints: {space.constraints}")


@space_app.command("count")
@user_errors
def space_count(file: SpaceFile, as_json: JsonFlag = False) -> None:
    """The exact number of distinct architectures in a space (constraints not applied)."""
    space = SearchSpace.from_yaml(space_path(file))
    n = space.cardinality()
    if as_json:
        emit_json({"name": space.name, "cardinality": n})
    else:
        console.print(f"{space.name or file}: {n:,} architectures ({len(space.decisions)} decisions)")


@space_app.command("sample")
@user_errors
def space_sample(
    file: SpaceFile,
    n: Annotated[int, typer.Option("-n", "--num", min=1, help="How many archs.")] = 5,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    as_json: JsonFlag = False,
) -> None:
    """Random architectures from a space, honouring its cost constraints. ``--json`` prints a list of arch
    dicts; save one to a file and ``arch describe`` (or any later command) takes it."""
    space = SearchSpace.from_yaml(space_path(file))
    rng = random.Random(seed)
    accept = constraint_filter(space.constraints)
    archs = [space.sample(rng, accept=accept) for _ in range(n)]
    if as_json:
        emit_json([a.to_dict() for a in archs])
        return
    table = Table("#", "arch", "params", "GMACs", title=f"{n} samples from {space.name or file} (seed {seed})")
    for i, a in enumerate(archs):
        c = arch_costs(a)
        table.add_row(str(i), str(a).split("(", 1)[1].rstrip(")"), f"{c.params:,}", f"{c.macs / 1e9:.2f}")
    console.print(table)


def main() -> None:
    """Console-script entry point."""
    app()


# subcommand modules register themselves on `app` (imported last: they import from this module)
from nas import cli_data, cli_evaluate, cli_latency, cli_onnx, cli_search, cli_train  # noqa: E402,F401
