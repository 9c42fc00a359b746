"""Keep storage passwords out of everything UNet-NAS prints, logs or writes.

A storage URL (``postgresql://nas:PASSWORD@db/nas``) comes from ``--storage``, an environment variable or a file
(``storage: {env: VAR}`` / ``{file: path}``). Every URL is shown through :func:`redact` (``nas:***@db``).
As a second line of defence, the password of every URL the process has resolved is remembered
(:func:`remember`) and :func:`scrub` replaces it wherever it would still appear: in error messages, in a
trial's recorded ``error`` text, and, once :func:`install_log_filter` has run, in every log record of every
logger (a library that logs a connection string cannot leak it either).
"""

from __future__ import annotations

import logging
import re
from urllib.parse import quote, unquote

_SECRETS: set[str] = set()
_MASK = "***"
# scheme://user:password@host... : the password is whatever follows the first ':' of the user part up to the last
# '@' before the host (a password may itself hold '@' or ':')
_USERINFO = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^:/@]*:(?P<password>.*)@[^@]*$", re.S)


def redact(url: str) -> str:
    """A storage URL with its password hidden (``postgresql://nas:***@db:5432/nas``)."""
    try:
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
        shown = parsed.render_as_string(hide_password=True)
        return scrub(shown)
    except Exception:  # not a URL sqlalchemy understands: hide everything after the scheme
        return url.split("://", 1)[0] + "://***" if "://" in url else "***"


def password_of(url: str) -> str | None:
    """The password in a URL, if any (also for URLs SQLAlchemy cannot parse)."""
    try:
        from sqlalchemy.engine import make_url

        password = make_url(url).password
        if password:
            return str(password)
    except Exception:
        pass
    m = _USERINFO.match(url.split("?", 1)[0].strip())
    return unquote(m.group("password")) if m and m.group("password") else None


def remember(url: str | None) -> None:
    """Note the password of a URL this process uses, so that :func:`scrub` can hide it everywhere."""
    password = password_of(url) if url else None
    if password and len(password) >= 3:  # a one-letter "password" would mask every occurrence of that letter
        _SECRETS.update({password, quote(password, safe=""), quote(password)})


def scrub(text: object) -> str:
    """``text`` (an exception or anything else is taken as its ``str``) with every remembered password replaced
    by ``***``: callers pass exceptions too, and a password must not leak through one."""
    text = text if isinstance(text, str) else str(text)
    if not _SECRETS or not text:
        return text
    for secret in sorted(_SECRETS, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, _MASK)
    return text


class _ScrubFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if _SECRETS:
            try:
                message = record.getMessage()
            except Exception:  # a malformed record: leave it to logging's own error handling
                return True
            clean = scrub(message)
            if clean != message:
                record.msg, record.args = clean, None
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = scrub(record.exc_text)
        return True


_installed = False


def install_log_filter() -> None:
    """Scrub remembered passwords from every log record of this process, whichever logger or handler emits it.

    A filter on a logger only sees that logger's own records and handlers are added by libraries at any time,
    so the filter is applied where every record is created: the log record factory."""
    global _installed
    if _installed:
        return
    make_record = logging.getLogRecordFactory()
    scrubber = _ScrubFilter()

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        scrubber.filter(record)
        return record

    logging.setLogRecordFactory(factory)
    _installed = True
