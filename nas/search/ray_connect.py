"""Joining a Ray cluster, or starting a private one, for the Ray backend: token authentication, and one clear
``ray.address:`` error (Ray's own reason, what to do) when it fails."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

from nas.experiment import Experiment
from search_spaces import ConfigError

# Environment variables _connect set for a private local Ray, unset again after it shuts down.
_DRIVER_ENV: list[str] = []
# Ray's configuration variable (case-sensitive, as Ray spells it) for the niceness of its worker processes.
WORKER_NICENESS = "RAY_worker_niceness"


def _connect(exp: Experiment, log: Callable[[str], Any]) -> None:
    """Join the cluster at ``ray.address``, or start a private local Ray bound to 127.0.0.1 with a token of its
    own. Any failure is one ``ray.address:`` error that says what to do, with Ray shut down again."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    said: list[str] = []
    try:
        if exp.ray.address is None:
            _private_token()
            _trial_priority()
            ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False,
                     configure_logging=False, log_to_driver=False)
        else:
            _probe(exp.ray.address)
            _reset_ray_auth_cache()  # a token given in the environment after Ray was imported must count
            with _native_stderr() as said:
                ray.init(address=exp.ray.address, configure_logging=False, log_to_driver=False)
    except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ValueError, AuthenticationError...
        _disconnect()
        raise ConfigError(_connect_advice(exp, exc, "\n".join(said) if exp.ray.address else ""),
                          field="ray.address") from None
    cpus, gpus = ray.cluster_resources().get("CPU", 0), ray.cluster_resources().get("GPU", 0)
    alive = [n for n in ray.nodes() if n.get("Alive")]
    dead = len(ray.nodes()) - len(alive)
    log(f"Ray cluster: {len(alive)} node(s), {cpus:g} CPUs, {gpus:g} GPUs" + (f" ({dead} dead node(s) not counted)"
                                                                              if dead else ""))
    if exp.ray.cpus_per_trial > cpus or exp.ray.gpus_per_trial > gpus:
        _disconnect()
        raise ConfigError(f"a trial needs {exp.ray.cpus_per_trial:g} CPU / {exp.ray.gpus_per_trial:g} GPU but the "
                          f"cluster has {cpus:g} / {gpus:g}", field="ray.cpus_per_trial"
                          if exp.ray.cpus_per_trial > cpus else "ray.gpus_per_trial")


@contextlib.contextmanager
def _native_stderr() -> Iterator[list[str]]:
    """Collect what Ray's C++ core writes to file descriptor 2 meanwhile (the yielded list is filled on exit) and
    pass it on when the block succeeds. Ray gives the reason of a refused connection (``InvalidAuthToken``) only
    there, as warnings, while the exception says just "Failed to connect"."""
    import sys
    import tempfile

    said: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        ok = False
        try:
            yield said
            ok = True
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode(errors="replace")
            said.extend(text.splitlines())
            if ok and text:
                sys.stderr.write(text)


def _probe(address: str, timeout: float = 10.0) -> None:
    """Fail in seconds when nothing listens at ``host:port``: Ray itself retries a dead GCS address for many
    minutes before it gives up. ``auto`` and ``ray://`` addresses are left to Ray."""
    import socket

    host, sep, port = address.rpartition(":")
    if not sep or address == "auto" or "://" in address or not port.isdigit():
        return
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise ConnectionError(f"nothing answers at {host}:{port} ({exc.strerror or type(exc).__name__})") from None


def _private_token() -> None:
    """Token authentication for the private Ray, with a fresh random token that lives only in the environment of
    this driver and the Ray processes it starts (never in a file).

    Ray 2.60's gRPC servers listen on all interfaces even with a 127.0.0.1 node address: the token is what keeps
    other users of the machine out. Ray's own default (``RAY_AUTH_MODE`` unset: token mode, a token generated into
    ``~/.ray/auth_token``) does not work once anything has set ``RAY_AUTH_MODE=token`` in this process after Ray
    read its configuration: the driver then still sees authentication off, generates no token, and the GCS it
    starts refuses to run ("Token authentication is enabled but Ray couldn't find an authentication token").
    Giving the token in ``RAY_AUTH_TOKEN`` sidesteps both. A user's own ``RAY_AUTH_TOKEN``/``RAY_AUTH_TOKEN_PATH``
    is used as it is, and an explicit ``RAY_AUTH_MODE=disabled`` is respected.
    """
    import secrets

    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        return
    for key, value in (("RAY_AUTH_MODE", "token"), ("RAY_AUTH_TOKEN", secrets.token_hex(32))):
        if key == "RAY_AUTH_TOKEN" and (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
            continue
        if key not in os.environ:
            os.environ[key] = value
            _DRIVER_ENV.append(key)  # taken back after ray.shutdown()
    _reset_ray_auth_cache()


def _trial_priority() -> None:
    """Run the private Ray's trials at normal CPU priority (``RAY_worker_niceness=0``) unless the user set it.

    Ray starts its worker processes at niceness 15 so that they cannot starve its own daemons. In a search the
    trials are the work: at niceness 15 any other busy process on the machine gets about 30 times their CPU share
    (measured: a 4-trial search of params and MACs on a 2-core machine ran 14 minutes beside two busy processes,
    its trials at 4% CPU). The private
    Ray's daemons are few and mostly idle, so normal priority costs them nothing that matters. A cluster the user
    starts keeps the niceness its nodes were started with (``RAY_worker_niceness=0 ray start ...``).
    """
    if WORKER_NICENESS not in os.environ:
        os.environ[WORKER_NICENESS] = "0"
        _DRIVER_ENV.append(WORKER_NICENESS)  # taken back after ray.shutdown()


def _reset_ray_auth_cache() -> None:
    """Make this process's Ray read the authentication settings again (it caches them at import): the public way
    would be to set the variables before importing Ray, which a library cannot ask of its callers."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    except (ImportError, AttributeError):  # Ray before 2.52 has no token authentication, and nothing cached
        return


def _disconnect() -> None:
    """Shut Ray down (it stops a private Ray's processes) and take back the variables ``_private_token`` set."""
    import ray

    ray.shutdown()
    if _DRIVER_ENV:
        while _DRIVER_ENV:
            os.environ.pop(_DRIVER_ENV.pop(), None)
        _reset_ray_auth_cache()


def _connect_advice(exp: Experiment, exc: BaseException, native: str = "") -> str:
    """One line: what failed, Ray's reason (the authentication error its C++ core logs only as a warning, found
    in ``native``), and what to do."""
    from nas.redaction import scrub

    text = " ".join(str(exc).split())
    reason = scrub(f"{type(exc).__name__}: {text}"[:300])
    if exp.ray.address is None:
        return (f"cannot start a private Ray on 127.0.0.1: {reason}; check that `ray start --head` works on this "
                "machine and that RAY_TMPDIR is short and writable, or set ray.address to join a running cluster")
    refused = next((line for line in native.splitlines() if "InvalidAuthToken" in line or "Unauthenticated" in line),
                   None)
    if refused is not None:  # "... Unauthenticated: RPC error: InvalidAuthToken: Authentication token is missing"
        start = refused.find("InvalidAuthToken")
        reason = scrub(refused[start:] if start >= 0 else refused.split("] ", 1)[-1])[:200]
    auth = refused is not None or any(k in text for k in ("uthentication", "InvalidAuthToken", "UNAUTHENTICATED",
                                                          "token"))
    if auth:
        what = ("the cluster refused this machine's token: give it the cluster's token (RAY_AUTH_MODE=token and "
                "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, as on the head node)")
    else:
        what = ("check that the head node runs (`ray status --address ...` on it) and that this machine can reach "
                "its port; if the cluster uses token authentication, set RAY_AUTH_MODE=token and its token")
    return f"cannot reach Ray at {exp.ray.address}: {reason}; {what}"
