"""Safe YAML and JSON reading with a field-path -> line map, so errors can point at a line.

Only ``yaml.SafeLoader`` is ever used: a YAML file cannot construct Python objects. The line map is built from
the same composed node tree the data comes from, keyed by the field paths that validation errors use
(``down[2].heads``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import ConfigError

T = TypeVar("T")


class _SafeLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-5`` as a float (YAML 1.2 and JSON do; PyYAML's YAML 1.1 wants ``1.0e-5``)."""


_SafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def parse_text(text: str, source: str = "<string>") -> tuple[Any, dict[str, int]]:
    """Parse YAML (a superset of JSON) into plain data and a map from field path to 1-based line."""
    try:
        node = yaml.compose(text, Loader=_SafeLoader)
        data = yaml.load(text, Loader=_SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"not valid YAML: {problem}", source=source, line=line) from None
    lines: dict[str, int] = {}
    if node is not None:
        _walk(node, "", lines)
    return data, lines


def _walk(node: yaml.Node, path: str, lines: dict[str, int]) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            name = str(key.value)
            child = f"{path}.{name}" if path else name
            lines[child] = key.start_mark.line + 1
            _walk(value, child, lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, f"{path}[{i}]", lines)


def read_file(path: str | os.PathLike) -> tuple[Any, dict[str, int]]:
    """Read a YAML or JSON file; a missing or unreadable file is a :class:`ConfigError`."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("file not found", source=str(p)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read file: {exc}", source=str(p)) from None
    return parse_text(text, str(p))


def load_validated(path: str | os.PathLike, build: Callable[[Any], T], prefix: str = "") -> T:
    """Read ``path`` and hand its data to ``build``; its errors come back naming the file and line."""
    data, lines = read_file(path)
    try:
        return build(data)
    except ConfigError as exc:
        raise exc.located(str(path), lines, prefix) from None


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """A file written as a whole: yields a temporary name in the same folder for the caller to write; on success
    it is flushed to disk and renamed over ``path``, on any error removed. A crash or a full disk leaves the old
    file or none, never a torn one."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, content: str | bytes) -> Path:
    """``content`` written through :func:`atomic_file`. Used for every file UNet-NAS writes."""
    with atomic_file(path) as tmp, open(tmp, "wb") as fh:
        fh.write(content.encode("utf-8") if isinstance(content, str) else content)
    return Path(path)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """A folder written as a whole: yields an empty temporary sibling (``.NAME.tmp-XXXX``) to fill; on success
    it replaces ``path`` by renames, on any error it is removed. A crash leaves the old folder or none, never a
    half-written one (a model folder whose config and weights disagree would load as the wrong network).

    An existing ``path`` is first renamed aside, then the new folder is renamed into place, then the old one is
    deleted: the moment between the two renames is the only one in which ``path`` is absent."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_tree(root: Path) -> None:
    """Flush every file of a folder to disk before it is renamed into place (as ``atomic_write`` does)."""
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())


def dump_yaml(data: Any) -> str:
    """YAML in the project's style: block style, keys in insertion order."""
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=120)


def dump_json(data: Any) -> str:
    return json.dumps(data, indent=2) + "\n"
