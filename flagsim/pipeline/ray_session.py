"""Connect to a Ray cluster, or start an embedded local one, once per process."""

from __future__ import annotations

import atexit
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
import warnings
from urllib.parse import urlsplit

from flagsim.config import Config
from flagsim.errors import FlagsimError, Terminated, terminate_like_an_interrupt

log = logging.getLogger(__name__)

#: Lines that Ray's C++ core worker writes straight to this process's stderr and that need no
#: action: an actor whose constructor arguments are in the object store (every Ray Data actor pool)
#: and may restart (ray-project/ray#53727). They still reach the core worker's log file.
_NATIVE_NOISE = re.compile(rb"core_worker\.cc:\d+: Actor with class name: .*max_restarts > 0")
# what Ray's C++ client logs, line after line for ~20 s, when the cluster wants a token it lacks
_AUTH_REFUSED = re.compile(rb"InvalidAuthToken|[Aa]uthentication token is missing or incorrect")
_auth_refused = threading.Event()  # set by the stderr pump when it drops such a line


class RayConnectError(FlagsimError):
    """The configured Ray cluster cannot be reached."""


class _DropMessages(logging.Filter):
    """Drop records of one logger whose message starts with one of `prefixes`."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


#: Ray's notices on every embed that need no action: (logger, message prefixes).
_NOTICES = {
    # a new local Ray turns token authentication on by itself: nothing for the user to do
    "ray._private.authentication.authentication_token_setup": _DropMessages(
        "Token authentication is enabled for this Ray cluster"),
    # flagsim draws its own progress bar
    "ray.data._internal.progress": _DropMessages("Progress bars disabled", "Progress bars for operators"),
}


def _verbose() -> bool:
    """True at -vv (the root logger at DEBUG): Ray's own console output is left as it is."""
    return logging.getLogger().getEffectiveLevel() <= logging.DEBUG


def quiet_ray_console() -> None:
    """Keep Ray's routine notices off the console at the default verbosity (not at -vv)."""
    for name, drop in _NOTICES.items():
        logger = logging.getLogger(name)
        if _verbose():
            logger.removeFilter(drop)
        else:
            logger.addFilter(drop)  # idempotent for the same filter object


_stderr_pump: threading.Thread | None = None


def _pump(read_fd: int, out_fd: int) -> None:
    """Copy lines from `read_fd` to `out_fd`, dropping Ray's known-noise lines."""
    pending = b""
    while True:
        try:
            chunk = os.read(read_fd, 65536)
        except OSError:
            chunk = b""
        if not chunk:
            if pending:
                os.write(out_fd, pending)
            return
        pending += chunk
        *lines, pending = pending.split(b"\n")
        if any(_AUTH_REFUSED.search(line) for line in lines):
            _auth_refused.set()  # said once, in the connection error, instead of every retry
        kept = b"".join(line + b"\n" for line in lines
                        if not _NATIVE_NOISE.search(line) and not _AUTH_REFUSED.search(line))
        if kept:
            os.write(out_fd, kept)


def filter_native_stderr() -> None:
    """At the default verbosity, route file descriptor 2 (where Ray's C++ code logs) through a
    thread that drops `_NATIVE_NOISE` and forwards every other line; Python's own `sys.stderr`
    (and the log handlers writing to it) keeps the original stream, so the console, its colours
    and progress bars are unchanged. No-op at -vv, when stderr is not fd 2 (pytest's capture),
    or once installed."""
    global _stderr_pump
    if _stderr_pump is not None or _verbose():
        return
    try:
        if sys.stderr.fileno() != 2:
            return
    except (AttributeError, OSError, ValueError):
        return
    old = sys.stderr
    old.flush()
    console = os.dup(2)
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    new = os.fdopen(console, "w", buffering=1, encoding=old.encoding, errors=old.errors)
    loggers = [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values()
                                      if isinstance(v, logging.Logger))]
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is old:
                handler.setStream(new)
    sys.stderr = new
    _stderr_pump = threading.Thread(target=_pump, args=(read_fd, console), name="flagsim-stderr",
                                    daemon=True)
    _stderr_pump.start()
    atexit.register(_restore_stderr, console)


def _restore_stderr(console: int) -> None:
    """At exit: fd 2 back to the console, and the lines still in the pipe forwarded."""
    try:
        sys.stderr.flush()
        os.dup2(console, 2)  # closes our end of the pipe: the pump sees end of file
    except OSError:
        return
    if _stderr_pump is not None:
        _stderr_pump.join(timeout=2)


def ray_address(cfg: Config) -> str | None:
    """The cluster to connect to (RAY_ADDRESS, then ray.address), or None for an embedded Ray."""
    address = (os.environ.get("RAY_ADDRESS") or cfg.ray.address or "").strip()
    return None if address in ("", "local") else address


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of `host:port` or `ray://host:port`; None when there is none to probe (auto)."""
    if address == "auto":
        return None
    if address.lower().startswith(("http://", "https://")):
        raise RayConnectError(
            f"Ray address {address!r} is the job API's (for `ray job submit`), not the cluster's: "
            "use host:6379 (the head's GCS port), `auto` on a node, or ray://host:10001")
    parts = urlsplit(address if "://" in address else f"gcs://{address}")
    try:
        port = parts.port
    except ValueError:
        raise RayConnectError(f"invalid Ray address {address!r} (use host:port or ray://host:port)") from None
    if not parts.hostname or port is None:
        if parts.scheme == "ray" and parts.hostname:
            return parts.hostname, 10001  # the Ray client's default port
        raise RayConnectError(f"invalid Ray address {address!r} (use host:port or ray://host:port)")
    return parts.hostname, port


def probe(address: str, timeout_s: float) -> None:
    """Wait up to `timeout_s` for a TCP connection to the address's port; RayConnectError if none."""
    target = _host_port(address)
    if target is None:
        return
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection(target, timeout=max(0.1, min(left, 5.0))) as sock:
                _speaks_http2(address, sock, max(0.5, min(deadline - time.monotonic(), 5.0)))
            return
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            if time.monotonic() + 0.5 >= deadline:
                raise RayConnectError(
                    f"cannot reach Ray at {address}: {reason} (waited {timeout_s:g} s; "
                    "check ray.address / RAY_ADDRESS, or ray.connect_timeout_s)"
                ) from None
            time.sleep(0.5)


#: What an HTTP/2 client sends first (RFC 9113 §3.4): the preface and an empty SETTINGS frame.
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def _speaks_http2(address: str, sock: socket.socket, timeout_s: float) -> None:
    """RayConnectError when the port that accepted `sock` answers in something other than
    HTTP/2, as a Ray GCS or Ray client server (gRPC) always does: given another service's port
    (the dashboard's 8265, a web server), `ray.init` retried for minutes, printing Ray's C++
    warnings. A connection closed or silent before any byte is an OSError, retried until
    `ray.connect_timeout_s` (an SSH tunnel or port-forward whose far end is still starting).
    A raw socket, not a gRPC channel: no proxy variable is followed (Ray follows none either).
    Skipped with TLS (`RAY_USE_TLS`), whose handshake this plain one cannot make."""
    if os.environ.get("RAY_USE_TLS", "").lower() in ("1", "true", "yes"):
        return
    sock.settimeout(timeout_s)
    sock.sendall(HTTP2_PREFACE)
    head = b""
    try:
        while len(head) < 9:  # a server's first frame must be SETTINGS (type 4) on stream 0
            chunk = sock.recv(9 - len(head))
            if not chunk:
                break
            head += chunk
    except TimeoutError:
        if not head:
            raise TimeoutError("no answer") from None
    if not head:
        raise ConnectionResetError("closed the connection without a word")
    if len(head) < 9 or head[3] != 4:
        raise RayConnectError(
            f"{address} accepts connections but is not Ray (it does not speak gRPC; the "
            "dashboard's 8265 or another service?): use the head's GCS port (6379 by default), "
            "`auto` on a node, or ray://host:10001"
        )


def _connect_failure(address: str | None, exc: BaseException) -> str:
    """The one line for a `ray.init` that failed: a token the cluster wants named as such."""
    reason = (str(exc).splitlines() or [""])[0].strip() or type(exc).__name__
    token = os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
    if _auth_refused.is_set() or "auth" in str(exc).lower():
        fix = ("check RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH" if token
               else "set RAY_AUTH_MODE=token and the cluster's token, as for `ray job submit`")
        return f"Ray at {address} refused the connection: authentication token missing or " \
               f"incorrect ({fix})"
    hint = "" if token or address is None else (
        "; if the cluster uses token authentication, set RAY_AUTH_MODE=token")
    return f"cannot reach Ray at {address}: {reason}{hint}"


def ensure_ray(cfg: Config) -> dict[str, float]:
    """Initialise Ray if needed (RAY_ADDRESS, then cfg.ray.address, else local); return its resources.

    Without an address this always starts a new local Ray (`address="local"`), never joining a
    head that happens to run on the machine. With one, its port must answer within
    `ray.connect_timeout_s`, else a one-line RayConnectError.
    """
    import ray

    quiet_ray_console()
    if not ray.is_initialized():
        address = ray_address(cfg)
        kwargs: dict = {"log_to_driver": False, "configure_logging": False}
        if address is None:
            kwargs.update(address="local", include_dashboard=False)
            if cfg.ray.num_cpus is not None:
                kwargs["num_cpus"] = cfg.ray.num_cpus
            if cfg.ray.num_gpus is not None:
                kwargs["num_gpus"] = cfg.ray.num_gpus
            if cfg.ray.object_store_memory_gb is not None:
                kwargs["object_store_memory"] = int(cfg.ray.object_store_memory_gb * 1024**3)
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            sized = f"{cfg.ray.num_cpus} CPUs" if cfg.ray.num_cpus is not None else "all CPUs"
            log.info("starting an embedded local Ray (%s)", sized)
        else:
            local_only = [k for k in ("num_cpus", "num_gpus", "object_store_memory_gb")
                          if getattr(cfg.ray, k) is not None]
            if local_only:
                log.warning("ray.%s only size an embedded local Ray; ignored when connecting to %s",
                            "/".join(local_only), address)
            log.info("connecting to Ray at %s", address)
            probe(address, cfg.ray.connect_timeout_s)
            kwargs["address"] = address
        filter_native_stderr()
        _no_native_signal_dumps()
        # Ray's client warns (a Python warning, several lines) before it raises: the failure is
        # said in one line below, and what it warns about on success is logged
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            try:
                ray.init(**kwargs)
            except SystemExit as exc:  # SIGTERM while Ray starts: its handler exits 15, silently
                if exc.code != signal.SIGTERM:
                    raise
                terminate_like_an_interrupt()
                _shutdown_at_exit()
                raise Terminated() from None
            except (ConnectionError, TimeoutError) as exc:
                raise RayConnectError(_connect_failure(address, exc)) from None
            except ValueError as exc:  # connecting: an address Ray cannot use
                if address is None:
                    raise
                raise RayConnectError(_connect_failure(address, exc)) from None
        for w in said:
            if not issubclass(w.category, DeprecationWarning):
                log.warning("ray: %s", str(w.message).splitlines()[0] if str(w.message) else w.category)
        atexit.register(_shutdown_at_exit)
        terminate_like_an_interrupt()  # Ray's own handler prints stack dumps and exits
    res = ray.cluster_resources()
    return {"CPU": float(res.get("CPU", 0)), "GPU": float(res.get("GPU", 0))}


def _no_native_signal_dumps() -> None:
    """Keep Ray's native failure-signal handler out of this driver (workers keep theirs): it
    printed six lines of stack dump for a SIGTERM that arrived while `ray.init` ran, before
    flagsim's handler is put back. Ray reads the flag when the driver's core worker starts."""
    try:
        import ray._private.ray_constants as ray_constants
    except ImportError:  # another Ray layout: its dumps stay
        return
    ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True


def _shutdown_at_exit() -> None:
    """At exit, ahead of Ray's own exit hook (registered when `ray` was imported, so it runs
    later and then finds nothing to do): shut Ray down without the half second that hook
    sleeps for worker logs to reach the console, which flagsim's workers do not send
    (`log_to_driver=False`). An embedded Ray is stopped, a cluster is left running."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def quiet_ray_data(show_ray_progress: bool = False) -> None:
    """Keep Ray Data's console chatter (per-operator progress logs) out of the user's terminal.

    Its full logs still go to the Ray session's `ray-data.log`; `-vv` keeps the console output.
    """
    import ray.data

    quiet_ray_console()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = show_ray_progress
    if _verbose():
        return
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler) and "File" not in type(handler).__name__:
            handler.setLevel(logging.WARNING)
