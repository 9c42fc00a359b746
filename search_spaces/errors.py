"""The one error type that bad input raises everywhere in UNet-NAS.

A user who feeds a broken arch, space or config must get one message that says which file, which field and,
where the YAML parser knows it, which line. Every loader raises :class:`ConfigError`; the CLI turns it into a
single line on stderr and exit code 2. Validation code only knows the field path; the file loader adds the
file name and line afterwards (:meth:`ConfigError.located`).
"""

from __future__ import annotations


class ConfigError(ValueError):
    """Invalid user input: an arch, space, profile, experiment or checkpoint that cannot be used.

    Args:
        message: what is wrong, in words a user can act on.
        field: dotted path of the offending field, e.g. ``down[2].heads``; empty for the whole document.
        source: file the input came from, if any.
        line: 1-based line of ``field`` in ``source``, if known.
    """

    def __init__(self, message: str, *, field: str = "", source: str | None = None, line: int | None = None):
        self.message = message
        self.field = field
        self.source = source
        self.line = line
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ""
        if self.source:
            where = self.source + (f":{self.line}" if self.line else "") + ": "
        field = f"{self.field}: " if self.field else ""
        return f"{where}{field}{self.message}"

    def located(self, source: str | None, lines: dict[str, int] | None = None, prefix: str = "") -> ConfigError:
        """A copy that also names the file and the line of the field (looked up in a path -> line map)."""
        field = join_path(prefix, self.field)
        line = self.line
        if lines and line is None:
            # the deepest ancestor of the field that the map knows gives the best line we can name
            probe = field
            while probe and probe not in lines:
                probe = _parent(probe)
            line = lines.get(probe) if probe else lines.get("")
        return ConfigError(self.message, field=field, source=source or self.source, line=line)


def join_path(prefix: str, field: str) -> str:
    """Join two field paths: ``join_path("space", "down[0].heads") == "space.down[0].heads"``."""
    if not prefix:
        return field
    if not field:
        return prefix
    return prefix + field if field.startswith("[") else f"{prefix}.{field}"


def _parent(path: str) -> str:
    cut = max(path.rfind("."), path.rfind("["))
    return path[:cut] if cut > 0 else ""
