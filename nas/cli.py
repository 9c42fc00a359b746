"""The ``unet-nas`` command line (also ``python -m nas``).

Rich tables for people, ``--json`` for programs. Bad input (a broken arch, space or argument) prints one line
``error: <file>:<line>: <field>: <what is wrong>`` on stderr and exits with code 2, never a traceback.

Start-up is kept instant: ``--help`` and argument errors import only typer and the project's light modules.
torch, diffusers, optuna, Ray and plotting libraries are imported inside the commands that use them
(``tests/test_cli.py`` checks that ``import nas.cli`` loads none of them; ``benchmarks/startup_time.py`` times it).
"""

from __future__ import annotations

import functools
import json
import random
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from nas.redaction import scrub
from search_spaces.errors import ConfigError

if TYPE_CHECKING:
    from search_spaces import UNetArch

def _no_flag_types(params: list[Any]) -> None:
    """A flag takes no value, so its help row shows no type (typer would print ``<bool>``)."""
    for p in params:
        if isinstance(p, TyperOption) and p.is_flag and p.metavar is None:
            p.metavar = ""


def _usage(params: list[Any]) -> list[str]:
    """Arguments in the usage line as ``NAME`` (required) and ``[NAME]`` (optional), as click and most Unix tools
    write them (typer would print ``{name}``)."""
    out = []
    for p in params:
        if isinstance(p, TyperArgument):
            name = (p.metavar or (p.name or "").upper()) + ("..." if p.nargs != 1 else "")
            out.append(name if p.required else f"[{name}]")
    return out


class _Tidy:
    """Flags shown without a type, arguments named in capitals (mixed into typer's command and group)."""

    params: list[Any]
    options_metavar: str | None

    def _tidy(self) -> None:
        _no_flag_types(self.params)
        for p in self.params:
            if isinstance(p, TyperArgument) and p.metavar is None and p.name:
                p.metavar = p.name.upper()

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            _no_flag_types([option])
        return option


class Command(_Tidy, TyperCommand):
    """Every unet-nas command."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tidy()

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return ([self.options_metavar] if self.options_metavar else []) + _usage(self.get_params(ctx))


class Group(_Tidy, TyperGroup):
    """Every unet-nas command group (its callback may take options: ``unet-nas profile --space ...``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tidy()


class Typer(typer.Typer):
    """typer.Typer whose groups and commands are the classes above, with click's plain help: rendering help
    through rich (panels, markdown) doubles the CPU time of ``unet-nas --help``."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("rich_markup_mode", None)
        super().__init__(cls=Group, **kwargs)

    def command(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("cls", Command)
        return super().command(*args, **kwargs)


app = Typer(
    name="unet-nas",
    help="Hardware-aware neural architecture search for text-to-image diffusion U-Nets.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
arch_app = Typer(help="Describe architectures: reference names, arch YAML/JSON, diffusers or Deci configs, model "
                      "folders.", no_args_is_help=True)
space_app = Typer(help="Inspect, count and sample search spaces.", no_args_is_help=True)
app.add_typer(arch_app, name="arch")
app.add_typer(space_app, name="space")

class _LazyConsole:
    """The shared rich Console, built on first use (importing rich's console costs start-up time that ``--help``
    and argument errors should not pay)."""

    _console: Any = None

    def _console_or_new(self) -> Any:
        self.width  # noqa: B018 - builds the console
        return _LazyConsole._console

    def __getattr__(self, name: str) -> Any:
        if _LazyConsole._console is None:
            from rich.console import Console

            # wide enough for the per-stage table when output goes to a pipe or a file (rich would default to 80
            # columns); no markup: what is printed quotes names and values from user files, and '[/x]' there must
            # stay text
            _LazyConsole._console = Console(width=None if sys.stdout.isatty() else 140, markup=False)
        return getattr(_LazyConsole._console, name)


console: Any = _LazyConsole()
F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str) -> typer.Exit:
    """Print one error line on stderr; the caller raises the returned Exit (code 2)."""
    from rich.console import Console
    from rich.markup import escape

    # the message quotes user input (keys, values, paths): escaped, so that '[/x]' is text, not rich markup
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/] {escape(scrub(message))}",
                                                                markup=True)
    return typer.Exit(code=2)


def progress_bar(field: str = "label", *, stderr: bool = False, transient: bool = False) -> Any:
    """A rich Progress: description, a short bar, done/total, elapsed time, then ``task.fields[field]``.

    The elapsed time comes before the free-text column and the bar has a fixed width, so that at 80 columns
    the text is shortened with an ellipsis instead of the time being cut."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Column

    # the text column is the flexible one (ratio=1 in an expanded table): it gets the width the fixed columns
    # leave, and ends in an ellipsis; without it rich squeezes every column, the elapsed time included
    return Progress(TextColumn("{task.description}"), BarColumn(bar_width=20), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn(f"{{task.fields[{field}]}}", table_column=Column(
                        no_wrap=True, overflow="ellipsis", ratio=1)),
                    console=Console(stderr=True) if stderr else console._console_or_new(), transient=transient,
                    expand=True)


def load_arch(ref: str) -> UNetArch:
    """:func:`search_spaces.load_arch` (every form of arch the project writes), imported when a command runs."""
    from search_spaces.registry import load_arch as load

    return load(ref)


def table(*columns: str, **kwargs: Any) -> Any:
    """A rich Table (imported when a command prints one)."""
    from rich.table import Table

    return Table(*columns, **kwargs)


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
ARCH_HELP = ("A reference name (sd15, bk_tiny, ...), an arch YAML/JSON, a config.json (FlexibleUNet, diffusers "
             "UNet2DConditionModel or DeciDiffusion flexible_unet), or a model folder (an exported or trained "
             "model, or a pipeline folder with unet/).")
SPACE_HELP = "A shipped space name (digits, tiny, sd15), a space YAML, or an experiment YAML (its space)."
AllowPickle = Annotated[bool, typer.Option(
    "--allow-pickle", help="Also read pickle checkpoints (.bin/.pt/.ckpt), with torch.load(weights_only=True). "
                           "Off by default: a pickle can run code when it is loaded; prefer safetensors.")]


# ---- arch ------------------------------------------------------------------------------------------------------


@arch_app.command("list")
@user_errors
def arch_list(as_json: JsonFlag = False) -> None:
    """The shipped reference architectures with their parameter counts."""
    from proxies.cost import arch_costs
    from search_spaces import get_arch, list_archs

    rows = [{"name": n, "params": arch_costs(get_arch(n)).params, "arch": str(get_arch(n))} for n in list_archs()]
    if as_json:
        emit_json(rows)
        return
    out = table("name", "params", "layout", title="reference architectures")
    for r in rows:
        out.add_row(r["name"], f"{r['params']:,}", r["arch"].split("(", 1)[1].rstrip(")"))
    console.print(out)


@arch_app.command("describe")
@user_errors
def arch_describe(
    ref: Annotated[str, typer.Argument(metavar="ARCH", help=ARCH_HELP)],
    batch: Annotated[int, typer.Option(min=1, help="Batch size (2 = classifier-free guidance).")] = 1,
    resolution: Annotated[int | None, typer.Option(min=1, help="Latent size; default: the arch's sample_size.")] = None,
    text_len: Annotated[int, typer.Option("--text-len", min=1, help="Text tokens.")] = 77,
    as_json: JsonFlag = False,
) -> None:
    """Params, MACs and a per-stage table of one architecture (closed form: no model is built)."""
    from proxies.cost import arch_costs

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
    out = table("stage", "channels", "size", "resnets", "attentions", "heads", "depth", "resample",
                "params", "GMACs", title=title)
    for r in stages:
        out.add_row(r["stage"], str(r["channels"] or ""), r["resolution"], str(r["resnets"]), str(r["attentions"]),
                    str(r["heads"] or ""), str(r["transformer_layers"] or ""), r["resample"],
                    f"{r['params']:,}", f"{r['macs'] / 1e9:.2f}")
    console.print(out)
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

SpaceFile = Annotated[str, typer.Argument(metavar="SPACE", help=SPACE_HELP)]


@space_app.command("show")
@user_errors
def space_show(file: SpaceFile, as_json: JsonFlag = False) -> None:
    """The decisions of a space and their choices."""
    from search_spaces.space import SearchSpace

    space = SearchSpace.from_yaml(file)
    info = {"name": space.name, "teacher": space.teacher, "cardinality": space.cardinality(),
            "constraints": space.constraints, "globals": space.globals, "decisions": space.describe()}
    if as_json:
        emit_json(info)
        return
    out = table("decision", "choices", title=f"space {space.name or file}: {info['cardinality']:,} archs")
    for row in info["decisions"]:
        out.add_row(row["decision"], ", ".join(str(c) for c in row["choices"]))
    console.print(out)
    if space.constraints:
        console.print(f"constraints: {space.constraints}")


@space_app.command("count")
@user_errors
def space_count(file: SpaceFile, as_json: JsonFlag = False) -> None:
    """The exact number of distinct architectures in a space (constraints not applied)."""
    from search_spaces.space import SearchSpace

    space = SearchSpace.from_yaml(file)
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
    """Random architectures from a space, honouring its cost constraints. With --json, a list of arch dicts:
    save one to a file and arch describe (or any later command) takes it."""
    from proxies.cost import arch_costs, constraint_filter
    from search_spaces.space import SearchSpace

    space = SearchSpace.from_yaml(file)
    rng = random.Random(seed)
    accept = constraint_filter(space.constraints)
    archs = [space.sample(rng, accept=accept) for _ in range(n)]
    if as_json:
        emit_json([a.to_dict() for a in archs])
        return
    out = table("#", "arch", "params", "GMACs", title=f"{n} samples from {space.name or file} (seed {seed})")
    for i, a in enumerate(archs):
        c = arch_costs(a)
        out.add_row(str(i), str(a).split("(", 1)[1].rstrip(")"), f"{c.params:,}", f"{c.macs / 1e9:.2f}")
    console.print(out)


class _Unactionable:
    """A logging filter dropping dependency warnings a user of unet-nas cannot act on."""

    # transformers, when diffusers' pipelines import it without torchvision: the image processors of CLIP and
    # SigLIP fall back to their PIL versions. UNet-NAS never uses those processors (it reads cached embeddings
    # or runs the text encoder only), so installing torchvision, as the warning suggests, would change nothing.
    PATTERNS = ("requires torchvision (not installed)",)

    def filter(self, record: Any) -> bool:
        message = record.getMessage()
        return not any(p in message for p in self.PATTERNS)


def quiet_dependency_warnings() -> None:
    """Install :class:`_Unactionable` on the loggers that emit those warnings (before they are imported)."""
    import logging

    logger = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _Unactionable) for f in logger.filters):
        logger.addFilter(_Unactionable())


def main() -> None:
    """Console-script entry point."""
    quiet_dependency_warnings()
    app()


# subcommand modules register themselves on `app` (imported last: they import from this module)
from nas import cli_data, cli_evaluate, cli_latency, cli_onnx, cli_search, cli_train  # noqa: E402,F401
