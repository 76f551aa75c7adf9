"""Which Ray flagsim uses (its own local one, or the configured cluster), unreachable clusters, and
Ray's console noise, each in a fresh process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from rayhead import free_port, stop_head

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return {**env, **extra}


# --- a foreign head on the machine -------------------------------------------------------------


@dataclass
class Head:
    address: str  # 127.0.0.1:PORT (its GCS)
    tmpdir: Path  # RAY_TMPDIR under which `ray.init()` finds it

    def env(self, **extra: str) -> dict[str, str]:
        """A client of this machine that would find the head (no token: the head has none)."""
        return _env(RAY_TMPDIR=str(self.tmpdir), RAY_AUTH_MODE="disabled", **extra)

    @property
    def port(self) -> str:
        return self.address.rsplit(":", 1)[1]


@pytest.fixture(scope="module")
def foreign_head() -> Iterator[Head]:
    """A head started with `ray start --head` (1 CPU), found by a plain `ray.init()` in processes
    whose RAY_TMPDIR is its own: other Ray users on this machine never see it. Stopped by its pids."""
    root = Path(tempfile.mkdtemp(prefix="fsfh-"))  # short: Ray's socket paths must stay short
    env = _env(RAY_TMPDIR=str(root), RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    port = free_port()
    cmd = [RAY, "start", "--head", "--block", "--port", str(port), "--num-cpus", "1",
           "--num-gpus", "0", "--include-dashboard", "false", "--disable-usage-stats",
           "--ray-client-server-port", str(free_port()), "--metrics-export-port", str(free_port()),
           "--dashboard-agent-listen-port", str(free_port()),
           "--object-store-memory", str(100 * 1024 * 1024), "--temp-dir", str(root / "ray")]
    log = (root / "head.log").open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not (root / "ray" / "ray_current_cluster").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start failed: {(root / 'head.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield Head(f"127.0.0.1:{port}", root)
    finally:
        stop_head(proc, root)
        log.close()
        shutil.rmtree(root, ignore_errors=True)


ENSURE = """
import json, logging, os, sys, ray
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from flagsim.config import load_config
from flagsim.pipeline.ray_session import ensure_ray
out = {}
if os.environ.get("PREMISE"):  # what a bare ray.init() does here: it joins the foreign head
    ray.init(configure_logging=False, log_to_driver=False)
    out["bare"] = [ray.cluster_resources().get("CPU"), ray.get_runtime_context().gcs_address]
    ray.shutdown()
res = ensure_ray(load_config(None, ["ray.num_cpus=3"]))
out["ensure"] = [res["CPU"], ray.get_runtime_context().gcs_address]
print("OUT", json.dumps(out))
"""


def _ensure(env: dict[str, str]) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, "-c", ENSURE], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("OUT "))
    return json.loads(line.removeprefix("OUT ")), proc.stderr


@pytest.mark.ray
def test_embedded_ray_never_joins_a_head_running_on_the_machine(foreign_head: Head) -> None:
    out, err = _ensure(foreign_head.env(PREMISE="1"))
    cpus, gcs = out["bare"]
    assert cpus == 1.0 and gcs.endswith(f":{foreign_head.port}")  # premise: ray.init() joins it
    cpus, gcs = out["ensure"]
    assert cpus == 3.0 and not gcs.endswith(f":{foreign_head.port}")  # its own, of the size asked
    assert "starting an embedded local Ray (3 CPUs)" in err


@pytest.mark.ray
def test_ray_address_connects_to_the_cluster(foreign_head: Head) -> None:
    out, err = _ensure(foreign_head.env(RAY_ADDRESS=foreign_head.address))
    cpus, gcs = out["ensure"]
    assert cpus == 1.0 and gcs.endswith(f":{foreign_head.port}")
    assert f"connecting to Ray at {foreign_head.address}" in err
    assert "ray.num_cpus only size an embedded local Ray; ignored" in err


@pytest.mark.ray
def test_ray_address_connects_behind_a_proxy_variable(foreign_head: Head) -> None:
    """flagsim's check that the port speaks HTTP/2 ignores proxy variables, as Ray's own
    connection does (a gRPC channel with default options went through http_proxy and refused
    a real head as 'not Ray')."""
    dead = "http://127.0.0.1:9"
    out, _ = _ensure(foreign_head.env(RAY_ADDRESS=foreign_head.address, http_proxy=dead,
                                      https_proxy=dead))
    assert out["ensure"][1].endswith(f":{foreign_head.port}")


EXIT = """
import ray
import ray._private.worker as worker
from flagsim.config import load_config
from flagsim.pipeline.ray_session import ensure_ray
ensure_ray(load_config(None, ["ray.num_cpus=1"]))
real = ray.shutdown
def spy(*args, **kwargs):  # Ray's own exit hook holds the real function, not this name
    print("SHUTDOWN", worker.global_worker.mode == ray.SCRIPT_MODE, kwargs, flush=True)
    return real(*args, **kwargs)
ray.shutdown = spy
print("GCS", ray.get_runtime_context().gcs_address, flush=True)
"""


@pytest.mark.ray
def test_an_embedded_ray_is_shut_down_by_flagsims_exit_hook_before_rays() -> None:
    """At exit flagsim stops its embedded Ray itself; Ray's own hook, which would first sleep
    half a second for worker logs (flagsim sends none to the driver), then finds it stopped."""
    import socket

    proc = subprocess.run([sys.executable, "-c", EXIT], env=_env(RAY_USAGE_STATS_ENABLED="0"),
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert "SHUTDOWN True {}" in lines  # called at exit, while the driver was connected
    host, port = next(ln for ln in lines if ln.startswith("GCS ")).split()[1].rsplit(":", 1)
    with pytest.raises(OSError), socket.create_connection((host, int(port)), timeout=2):
        pass  # the embedded GCS is gone with the process


# --- an unreachable cluster --------------------------------------------------------------------


def _folder(tmp_path: Path, n: int = 3) -> Path:
    from flagsim.images import bundled_flags_dir

    d = tmp_path / "imgs"
    d.mkdir()
    for p in sorted((bundled_flags_dir() / "images").glob("*.png"))[:n]:
        shutil.copy(p, d / p.name)
    return d


def _embed(tmp_path: Path, *args: str, verbosity: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "flagsim", *verbosity, "embed", "--set", "embed.models=[pixels]",
           "--set", "images.source=folder", "--set", f"images.path={_folder(tmp_path)}",
           "--out", str(tmp_path / "run"), *args]
    env = {k: v for k, v in _env().items() if k != "RAY_AUTH_MODE"}
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("address", ["127.0.0.1:1", "ray://127.0.0.1:1"])
def test_unreachable_ray_address_is_one_line_after_the_timeout(tmp_path: Path, address: str) -> None:
    proc = _embed(tmp_path, "--set", f"ray.address={address}", "--set", "ray.connect_timeout_s=2",
                  verbosity=("-q",))
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"flagsim: error: cannot reach Ray at {address}: Connection refused")
    assert "waited 2 s" in line


def test_the_job_api_address_given_as_the_ray_address_is_one_line(tmp_path: Path) -> None:
    # what docs/cluster.md exports for `ray job submit`; ray.init raised a 30-line traceback
    proc = _embed(tmp_path, "--set", "ray.address=http://127.0.0.1:8265", verbosity=("-q",))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "flagsim: error: Ray address 'http://127.0.0.1:8265' is the job API's (for `ray job "
        "submit`), not the cluster's: use host:6379 (the head's GCS port), `auto` on a node, or "
        "ray://host:10001"]


def test_a_port_that_is_not_ray_is_one_line_at_once(tmp_path: Path) -> None:
    """A web server's port (as the dashboard's 8265 would be) given as the Ray address passed the
    TCP check and `ray.init` then retried for minutes, printing Ray's C++ warnings."""
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    address = f"127.0.0.1:{server.server_address[1]}"
    try:
        proc = _embed(tmp_path, "--set", f"ray.address={address}", "--set",
                      "ray.connect_timeout_s=60", verbosity=("-q",))
    finally:
        server.shutdown()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"flagsim: error: {address} accepts connections but is not Ray (it does not speak gRPC; the "
        "dashboard's 8265 or another service?): use the head's GCS port (6379 by default), "
        "`auto` on a node, or ray://host:10001"]


def test_a_port_that_closes_without_a_word_is_retried_until_the_timeout() -> None:
    """An SSH tunnel or port-forward accepts at once and closes while the head behind it starts:
    retried until ray.connect_timeout_s, then 'cannot reach' (not 'not Ray' at the first try)."""
    import socket
    import threading

    from flagsim.pipeline.ray_session import RayConnectError, probe

    server = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def close_each() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            accepted.append(1)
            conn.close()

    threading.Thread(target=close_each, daemon=True).start()
    address = f"127.0.0.1:{server.getsockname()[1]}"
    try:
        with pytest.raises(RayConnectError) as info:
            probe(address, 2.0)
    finally:
        server.close()
    said = str(info.value)  # "closed the connection without a word" or "Connection reset by peer"
    assert said.startswith(f"cannot reach Ray at {address}: ") and "(waited 2 s" in said, said
    assert len(accepted) >= 2  # tried again


def test_invalid_ray_address_is_one_line(tmp_path: Path) -> None:
    proc = _embed(tmp_path, "--set", "ray.address=ray://head:notaport", verbosity=("-q",))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "flagsim: error: invalid Ray address 'ray://head:notaport' (use host:port or ray://host:port)"]


# --- Ray's console noise -----------------------------------------------------------------------

NOISE = {
    "token notice": "Token authentication is enabled for this Ray cluster",
    "core worker line": "max_restarts > 0",
    "progress notice": "Progress bars disabled",
}


@pytest.mark.ray
def test_ray_notices_stay_off_the_console_at_default_verbosity(tmp_path: Path) -> None:
    proc = _embed(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "starting an embedded local Ray" in proc.stderr
    assert "embedded" in proc.stdout
    for what, text in NOISE.items():
        assert text not in proc.stderr, f"{what} reached the console:\n{proc.stderr[-3000:]}"
    assert "core_worker.cc" not in proc.stderr


@pytest.mark.ray
def test_ray_notices_are_kept_at_debug_verbosity(tmp_path: Path) -> None:
    """-vv leaves Ray's console output alone (and shows the test above checks something real)."""
    proc = _embed(tmp_path, verbosity=("-vv",))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert NOISE["progress notice"] in proc.stderr
    assert NOISE["core worker line"] in proc.stderr


def test_a_failed_connection_is_one_line_without_rays_client_warning(monkeypatch) -> None:
    """A port that answers but is not Ray's client server: Ray warns (several lines) and then
    raises; the user sees flagsim's one line only (Ray's own client is simulated: a real one
    retries for 30 s)."""
    import socket
    import warnings

    import ray

    from flagsim.config import load_config
    from flagsim.pipeline import ray_session
    from flagsim.pipeline.ray_session import RayConnectError, ensure_ray

    def client_times_out(**kwargs):
        warnings.warn("Ray Client connection timed out. Ensure that the Ray Client port on the "
                      "head node is reachable\nfrom your local machine.", UserWarning, stacklevel=1)
        raise ConnectionError("ray client connection timeout")

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)  # set by a local Ray an earlier test started
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", client_times_out)
    # past flagsim's own check that the port speaks HTTP/2 (a Ray client server that then fails)
    monkeypatch.setattr(ray_session, "_speaks_http2", lambda *args: None)
    with socket.create_server(("127.0.0.1", 0)) as server, warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning that got out would fail the test
        address = f"ray://127.0.0.1:{server.getsockname()[1]}"
        with pytest.raises(RayConnectError) as info:
            ensure_ray(load_config(None, [f"ray.address={address}"]))
    assert str(info.value) == (f"cannot reach Ray at {address}: ray client connection timeout; "
                               "if the cluster uses token authentication, set RAY_AUTH_MODE=token")


# a command body that starts its embedded Ray, says so, and waits to be stopped
WAITS_ON_RAY = """
import argparse, sys, time
from flagsim.app.entry import run_guarded
from flagsim.config import load_config
from flagsim.pipeline.ray_session import ensure_ray

def body(args):
    ensure_ray(load_config(None, ["ray.num_cpus=1"]))
    print("ready", flush=True)
    time.sleep(120)

sys.exit(run_guarded("flagsim", body, argparse.Namespace(), "rerun the same command to resume"))
"""


TERM_IN_RAY_INIT = """
import argparse, os, signal, sys
import ray
from flagsim.app.entry import run_guarded
from flagsim.config import load_config
from flagsim.pipeline.ray_session import ensure_ray

real_init = ray.init
def init_then_sigterm(**kwargs):  # Ray's handler is installed: the signal lands inside ray.init
    real_init(**kwargs)
    os.kill(os.getpid(), signal.SIGTERM)
    signal.pthread_sigmask(signal.SIG_BLOCK, [])  # a bytecode boundary for the handler to run
    print("not stopped", flush=True)
ray.init = init_then_sigterm

sys.exit(run_guarded("flagsim", lambda a: ensure_ray(load_config(None, ["ray.num_cpus=1"])),
                     argparse.Namespace(), "rerun the same command to resume"))
"""


@pytest.mark.ray
def test_sigterm_while_ray_starts_is_one_line_and_exit_143(tmp_path: Path) -> None:
    """A SIGTERM while `ray.init` ran met Ray's own handler (`sys.exit(15)`): the command exited
    15 with no message, and Ray's agents outlived it for minutes."""
    proc = subprocess.run([sys.executable, "-c", TERM_IN_RAY_INIT], env=_env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 143, proc.stderr
    assert "not stopped" not in proc.stdout
    assert proc.stderr.strip().splitlines() == ["flagsim: terminated; rerun the same command to resume"]


@pytest.mark.ray
def test_sigterm_stops_a_command_with_one_line_like_ctrl_c(tmp_path: Path) -> None:
    """Ray's native handler printed stack dumps (about 10 lines) and exited 15; a scheduler's
    SIGTERM now ends the command as Ctrl-C does, with its own exit status."""
    import signal

    proc = subprocess.Popen([sys.executable, "-c", WAITS_ON_RAY], env=_env(), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert err.strip().splitlines() == ["flagsim: terminated; rerun the same command to resume"]
