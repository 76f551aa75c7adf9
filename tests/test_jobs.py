"""The Ray job entry points in jobs/: fail-fast validation, and real `ray job submit` runs.

The @pytest.mark.ray tests start a real single-node Ray head (`ray start --head --block`) with
token authentication on (RAY_AUTH_MODE=token, token from `ray get-auth-token --generate`, found
through RAY_AUTH_TOKEN_PATH), submit the jobs with the `ray job submit` CLI exactly as the
Makefile does, and stop only the processes that head started.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from rayhead import stop_head
from resource_cases import RESOURCE_CASES
from s3server import LocalS3, patched_environ, running_s3

from flagsim.app.checks import check_resources
from flagsim.config import load_config
from flagsim.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
JOBS = REPO / "jobs"
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")

# --- fail fast: bad configs never reach Ray ----------------------------------------------------


def _job_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["RAY_TMPDIR"] = str(tmp_path / "raytmp")  # where a Ray session would be created
    return env


def _run_job(script: str, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(JOBS / script), *args], cwd=REPO, env=_job_env(tmp_path),
        capture_output=True, text=True, timeout=120,
    )


BAD_CASES = {
    "unknown model": (["--set", "embed.models=[pixels,resnet9000]"], "unknown model 'resnet9000'"),
    "unknown model flag": (["--models", "pixels,nope"], "unknown model 'nope'"),
    "negative batch size": (
        ["--set", "embed.settings.pixels.batch_size=-4"], "embed.settings.pixels.batch_size"),
    "unknown key": (["--set", "embed.batchsize=4"], "embed.batchsize: unknown key"),
    **RESOURCE_CASES,
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_config_fails_in_one_line_before_ray(case: str, tmp_path: Path) -> None:
    args, expected = BAD_CASES[case]
    proc = _run_job("embed.py", [*args, "--run", str(tmp_path / "run")], tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("jobs/embed.py: error: ")
    assert expected in lines[0]
    assert not (tmp_path / "raytmp").exists(), "a Ray session was started"
    assert not (tmp_path / "run").exists(), "the run directory was created"


@pytest.mark.parametrize("script", ["embed.py", "build_index.py", "neighbours.py", "pipeline.py"])
def test_every_job_rejects_a_bad_config_file(script: str, tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("embed:\n  models: [pixels]\n  settings:\n    pixels: {batch_size: 0}\n")
    proc = _run_job(script, ["--config", str(cfg), "--run", str(tmp_path / "run")], tmp_path)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"jobs/{script}: error: {cfg}: embed.settings.pixels.batch_size")
    assert not (tmp_path / "raytmp").exists()


def test_the_search_job_takes_out_as_flagsim_search_does_and_searches(tmp_path: Path) -> None:
    """`jobs/search.py --run RUN --queries TABLE --out OUT`, the `flagsim search` spelling (its
    --out once meant the run and the results needed --search-out); a run's own embeddings as
    the queries find themselves first (the query is kept in this mode)."""
    import runs

    from flagsim.search.batch import read_results

    vectors = np.random.default_rng(6).normal(size=(30, 8)).astype(np.float32)
    runs.make_run(tmp_path / "run", "m", vectors, shard_size=16)
    out = tmp_path / "out"
    env = {**_job_env(tmp_path), "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray")}  # short socket paths
    try:
        proc = subprocess.run(
            [sys.executable, str(JOBS / "search.py"), "--run", str(tmp_path / "run"),
             "--queries", str(tmp_path / "run"), "--out", str(out), "--models", "m", "-k", "3"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    finally:
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = read_results(str(out), "m").to_pandas()
    assert len(df) == 30 * 3
    first = df[df["rank"] == 1]
    assert (first["neighbour_id"] == first["query_id"]).all()
    assert not (tmp_path / "run" / "results").exists()  # --out is the results, not the run


def test_job_help_says_what_models_default_to() -> None:
    # the jobs on an existing run said "the config's embed.models" but take the run's models
    from flagsim.app import jobs

    for make in (jobs.index_parser, jobs.neighbours_parser, jobs.search_parser):
        text = " ".join(make("job").format_help().split())
        assert "default: every model the run holds" in text and "config's embed.models" not in text
    for make in (jobs.embed_parser, jobs.pipeline_parser):
        assert "default: the config's embed.models" in " ".join(make("job").format_help().split())


def test_unwritable_output_fails_before_ray(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    proc = _run_job("embed.py", ["--set", "embed.models=[pixels]", "--run", str(blocker / "run")],
                    tmp_path)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert "is not writable" in line
    assert not (tmp_path / "raytmp").exists()


def test_missing_run_directory_fails_before_ray(tmp_path: Path) -> None:
    proc = _run_job("neighbours.py", ["--run", str(tmp_path / "never-embedded")], tmp_path)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line == f"jobs/neighbours.py: error: run directory not found: {tmp_path / 'never-embedded'}"
    assert not (tmp_path / "raytmp").exists()


def test_unreachable_object_store_output_fails_in_one_line(tmp_path: Path) -> None:
    with running_s3() as s3:
        env = {**_job_env(tmp_path), **s3.env}
        proc = subprocess.run(
            [sys.executable, str(JOBS / "embed.py"), "--set", "embed.models=[pixels]",
             "--run", "s3://no-such-bucket-flagsim/run"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
        )
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("jobs/embed.py: error: output s3://no-such-bucket-flagsim/run is not writable")
    assert not (tmp_path / "raytmp").exists()


def test_scrape_job_writes_images_and_table_to_an_object_store(tmp_path: Path) -> None:
    from flagserver import flag_server

    from flagsim.images import read_images_table

    with flag_server() as server, running_s3() as s3:
        bucket = s3.new_bucket()
        proc = subprocess.run(
            [sys.executable, str(JOBS / "scrape_flags.py"), "--out", f"s3://{bucket}/flags",
             "--url", server.page_url, "--allow-host", "127.0.0.1", "--retries", "0",
             "--timeout", "5"],
            cwd=REPO, env={**_job_env(tmp_path), **s3.env}, capture_output=True, text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        keys = set(s3.keys(bucket, "flags/"))
        with patched_environ(s3.env):
            table = read_images_table(f"s3://{bucket}/flags")
    assert table.num_rows >= 10
    for path in table.column("path").to_pylist():
        assert path.startswith(f"s3://{bucket}/flags/images/")
        assert path.removeprefix(f"s3://{bucket}/") in keys
    assert "flags/images.parquet" in keys
    assert not (tmp_path / "raytmp").exists()  # scraping needs no Ray


# --- the shipped configs -----------------------------------------------------------------------


def test_cluster_gpu_config_is_valid_and_sized(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cfg = load_config(REPO / "configs" / "cluster-gpu.yaml")
    six = {"vit", "clip", "blip2", "efficientnet", "dinov2", "vgg16"}
    assert set(cfg.embed.models) == six
    assert cfg.embed.strict and cfg.embed.device == "cuda" and cfg.embed.dtype == "float16"
    for m in six | {"efficientnet-lite0", "pixels"}:
        s = cfg.embed.for_model(m)
        assert s.num_gpus > 0 and s.batch_size and s.max_actors and s.max_actors >= s.num_actors
    need = sum(cfg.embed.for_model(m).num_gpus * cfg.embed.for_model(m).num_actors for m in six)
    # on a cluster (RAY_ADDRESS set) the static checks pass ...
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    check_resources(cfg, cfg.embed.models)
    monkeypatch.delenv("RAY_ADDRESS")
    # ... and a local Ray of a fixed size must hold every pool at once
    data = yaml.safe_load((REPO / "configs" / "cluster-gpu.yaml").read_text())
    data["ray"]["address"] = None
    local_yaml = tmp_path / "local-gpu.yaml"
    local_yaml.write_text(yaml.safe_dump(data))
    fits = load_config(local_yaml, [f"ray.num_gpus={int(np.ceil(need))}"])
    check_resources(fits, fits.embed.models)
    small = load_config(local_yaml, [f"ray.num_gpus={int(np.ceil(need)) - 1}"])
    with pytest.raises(ConfigError, match=f"need {need:g} GPUs at once"):
        check_resources(small, small.embed.models)


def test_runtime_env_is_a_valid_ray_runtime_env() -> None:
    from ray.runtime_env import RuntimeEnv

    data = yaml.safe_load((REPO / "configs" / "runtime_env.yaml").read_text())
    env = RuntimeEnv(**data)  # raises on unknown fields
    for pattern in (".venv/", "runs/", ".git/"):
        assert pattern in env["excludes"]
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1"


def test_ray_up_cluster_yaml_passes_ray_cluster_schema() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "deploy" / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(raw))  # what `ray up` checks before launching anything
    opts = " ".join(raw["docker"]["run_options"])
    for setting in ("HF_HOME=", "TORCH_HOME=", "HF_HUB_OFFLINE=1", "RAY_AUTH_MODE=token"):
        assert setting in opts
    assert "~/.ray/auth_token" in raw["file_mounts"]
    gpu_nodes = [t for n, t in raw["available_node_types"].items() if n != raw["head_node_type"]]
    assert gpu_nodes and all(t.get("min_workers", 0) >= 1 for t in gpu_nodes)


def test_kuberay_rayjob_manifest_runs_a_job_of_this_repo() -> None:
    from ray.runtime_env import RuntimeEnv

    doc = yaml.safe_load((REPO / "deploy" / "rayjob.yaml").read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    spec = doc["spec"]
    argv = spec["entrypoint"].split()
    assert argv[0] == "python"
    assert (REPO / argv[1].removeprefix("/app/")).is_file()
    assert (REPO / argv[argv.index("--config") + 1].removeprefix("/app/")).is_file()
    RuntimeEnv(**yaml.safe_load(spec["runtimeEnvYAML"]))
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        (container,) = pod["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["HF_HOME"].startswith("/mnt/shared") and env["HF_HUB_OFFLINE"] == "1"
        assert any(m["mountPath"] == "/mnt/shared" for m in container["volumeMounts"])
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1


# --- a real Ray head ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RayHead:
    dashboard: str  # http://127.0.0.1:PORT, the job API
    env: dict[str, str]  # environment of an authorised client
    root: Path
    gcs: str = ""  # 127.0.0.1:PORT, what a driver connects to

    def submit(self, *entrypoint: str, runtime_env: Path | None = None,
               timeout: float = 400) -> subprocess.CompletedProcess:
        """`ray job submit --working-dir . --runtime-env ... -- python ...`, waiting for the end."""
        cmd = [RAY, "job", "submit", "--address", self.dashboard, "--working-dir", ".",
               "--runtime-env", str(runtime_env or REPO / "configs" / "runtime_env.yaml"),
               "--", *entrypoint]
        return subprocess.run(cmd, cwd=REPO, env=self.env, capture_output=True, text=True,
                              timeout=timeout)


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
    # short root: Ray's unix socket paths must stay under ~107 characters
    root = Path(tempfile.mkdtemp(prefix="fsray-"))
    home = root / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_A")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the job's `python` is this venv's
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    gen = subprocess.run([RAY, "get-auth-token", "--generate"], env={**env, "HOME": str(home)},
                         capture_output=True, text=True, timeout=120)
    assert gen.returncode == 0, gen.stderr
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN_PATH"] = str(home / ".ray" / "auth_token")
    port, dash = _free_port(), _free_port()
    cmd = [
        RAY, "start", "--head", "--block", "--num-cpus", "2", "--num-gpus", "0",
        "--port", str(port), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
        "--dashboard-agent-listen-port", str(_free_port()),
        "--ray-client-server-port", str(_free_port()), "--metrics-export-port", str(_free_port()),
        "--object-store-memory", str(300 * 1024 * 1024),
        "--temp-dir", str(root / "ray"), "--disable-usage-stats",
    ]
    log = (root / "head.log").open("w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    head = RayHead(f"http://127.0.0.1:{dash}", env, root, f"127.0.0.1:{port}")
    try:
        # as `make submit-*` does: until the job API can take a submission (the head's job agent
        # registers seconds after the API answers; submitting before is "No available agent")
        ready = subprocess.run(
            [sys.executable, str(REPO / "scripts" / "wait_for_ray_jobs.py"), head.dashboard,
             "--timeout", "180"], env=env, capture_output=True, text=True, timeout=240)
        if ready.returncode != 0 or proc.poll() is not None:
            pytest.fail(f"Ray head not ready: {ready.stderr.strip()}\n"
                        f"{(root / 'head.log').read_text()[-2000:]}")
        yield head
    finally:
        stop_head(proc, root)
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def _job_log(proc: subprocess.CompletedProcess, lines: int = 80) -> str:
    """The end of a submitted job's log, without the working-dir upload chatter."""
    text = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "packaging.py" not in ln]
    return "\n".join(text[-lines:])


def _images_folder(dst: Path, n: int = 24) -> Path:
    from flagsim.images import bundled_flags_dir

    dst.mkdir(parents=True)
    for p in sorted((bundled_flags_dir() / "images").glob("*.png"))[:n]:
        shutil.copy(p, dst / p.name)
    return dst


def _overrides(images: str, shard_size: int = 10) -> list[str]:
    return ["--set", "embed.models=[pixels]", "--set", "images.source=folder",
            "--set", f"images.path={images}", "--set", f"embed.shard_size={shard_size}",
            "--set", "neighbours.k=3"]


@pytest.mark.ray
def test_job_api_requires_the_token(ray_head: RayHead) -> None:
    mode = requests.get(f"{ray_head.dashboard}/api/authentication_mode", timeout=10).json()
    assert mode.get("authentication_mode") == "token"
    anonymous = {k: v for k, v in ray_head.env.items() if not k.startswith("RAY_AUTH")}
    anonymous["RAY_AUTH_MODE"] = "disabled"
    anonymous["HOME"] = str(ray_head.root / "nobody")
    denied = subprocess.run([RAY, "job", "list", "--address", ray_head.dashboard], env=anonymous,
                            capture_output=True, text=True, timeout=60)
    assert denied.returncode != 0
    assert "Authentication required" in denied.stdout + denied.stderr


@pytest.mark.ray
def test_a_command_without_the_clusters_token_is_one_line_naming_it(ray_head: RayHead,
                                                                     tmp_path: Path) -> None:
    """Ray's C++ client logged `InvalidAuthToken` on every retry (20 lines over ~20 s), then
    flagsim said "cannot reach Ray" although the port answered."""
    env = {k: v for k, v in ray_head.env.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(ray_head.root / "nobody")
    env["RAY_ADDRESS"] = ray_head.gcs
    proc = subprocess.run([sys.executable, "-m", "flagsim", "-q", "embed", "--run",
                           str(tmp_path / "run"), "--models", "pixels"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines == [
        f"flagsim: error: Ray at {ray_head.gcs} refused the connection: authentication token "
        "missing or incorrect (set RAY_AUTH_MODE=token and the cluster's token, as for `ray job "
        "submit`)"], lines[-5:]


@pytest.mark.ray
def test_submitted_job_runs_the_working_dir_without_excluded_paths(ray_head: RayHead) -> None:
    probe = (
        "import json, os, flagsim, ray; ray.init(); "
        "print('PROBE', json.dumps({'cwd': sorted(os.listdir('.')), 'flagsim': flagsim.__file__, "
        "'cpus': ray.cluster_resources().get('CPU'), 'offline': os.environ.get('HF_HUB_OFFLINE')}))"
    )
    proc = ray_head.submit("python", "-c", probe, timeout=300)
    assert proc.returncode == 0, _job_log(proc)
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE "))
    seen = json.loads(line.removeprefix("PROBE "))
    assert {"jobs", "flagsim", "configs"} <= set(seen["cwd"])
    assert not {".venv", ".git", "runs"} & set(seen["cwd"])
    assert "working_dir_files" in seen["flagsim"]  # the uploaded copy, not the local checkout
    assert seen["cpus"] == 2.0
    assert seen["offline"] == "1"  # runtime_env env_vars reach the driver


@pytest.fixture(scope="module")
def cluster_run(ray_head: RayHead, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Embed, index and neighbours submitted as three jobs to the head, on 24 bundled flags."""
    base = tmp_path_factory.mktemp("cluster")
    images = _images_folder(base / "flags")
    run = base / "run"
    out = {"run": run, "images": images, "procs": {}}
    for script in ("embed.py", "build_index.py", "neighbours.py"):
        proc = ray_head.submit("python", f"jobs/{script}", *_overrides(str(images)),
                               "--run", str(run))
        out["procs"][script] = proc
        assert proc.returncode == 0, f"{script}: {_job_log(proc)}"
    return out


@pytest.mark.ray
def test_submitted_embed_job_writes_complete_shards(cluster_run: dict) -> None:
    from flagsim.rundir import RunDir
    from flagsim.shards import read_embeddings

    run = RunDir.at(cluster_run["run"])
    emb = read_embeddings(run, "pixels")  # validates shards against the manifest
    expected = sorted(p.stem for p in cluster_run["images"].glob("*.png"))
    assert sorted(emb.ids) == expected
    assert [loc.name for loc in run.model_dir("pixels").list(".parquet")] == [
        "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert emb.manifest.rows == 24 and emb.manifest.shards["part-00002.parquet"] == 4
    assert np.isfinite(emb.vectors).all() and (np.linalg.norm(emb.vectors, axis=1) > 0).all()
    assert "embed pixels: embedded, 24 images" in cluster_run["procs"]["embed.py"].stdout


@pytest.mark.ray
def test_submitted_index_and_neighbours_jobs_write_tables(cluster_run: dict) -> None:
    from flagsim.rundir import RunDir
    from flagsim.search.load import load_index
    from flagsim.search.neighbours import read_neighbours
    from flagsim.shards import read_embeddings

    run_dir = str(cluster_run["run"])
    idx = load_index(run_dir, "pixels", build=False)  # the job's index, fresh
    assert idx.count == 24 and idx.manifest.kind == "flat"
    # FAISS built it with the task's share (the head's 2 CPUs), not Ray's OMP_NUM_THREADS=1
    assert idx.manifest.build_threads == 2
    table = read_neighbours(run_dir, "pixels")
    assert table.num_rows == 24 * 3
    df = table.to_pandas()
    assert (df["query_id"] != df["neighbour_id"]).all()
    assert sorted(df.groupby("query_id")["rank"].apply(list).iloc[0]) == [1, 2, 3]
    # the top neighbour really is the most cosine-similar other image
    emb = read_embeddings(RunDir.at(cluster_run["run"]), "pixels")
    v = emb.vectors / np.linalg.norm(emb.vectors, axis=1, keepdims=True)
    sim = v @ v.T
    np.fill_diagonal(sim, -np.inf)
    best = {emb.ids[i]: emb.ids[int(np.argmax(sim[i]))] for i in range(len(emb.ids))}
    top = df[df["rank"] == 1].set_index("query_id")["neighbour_id"].to_dict()
    agree = sum(top[q] == best[q] for q in best)
    assert agree >= len(best) - 1  # ties may order either way


@pytest.mark.ray
def test_pipeline_job_on_object_store_matches_local_run(
    ray_head: RayHead, cluster_run: dict, tmp_path: Path
) -> None:
    """Images and run directory on S3: the workers that decode the images, the driver that writes
    shards, index, tables and report all reach the store through the runtime_env's env_vars."""
    from flagsim.rundir import RunDir
    from flagsim.search.neighbours import read_neighbours
    from flagsim.shards import read_embeddings
    with running_s3() as s3:
        bucket = s3.new_bucket()
        _upload_folder(s3, bucket, cluster_run["images"], "flags")
        renv = yaml.safe_load((REPO / "configs" / "runtime_env.yaml").read_text())
        renv["env_vars"] = {**renv.get("env_vars", {}), **s3.env}
        renv_file = tmp_path / "runtime_env.yaml"
        renv_file.write_text(yaml.safe_dump(renv))
        run_uri = f"s3://{bucket}/runs/flags"
        proc = ray_head.submit(
            "python", "jobs/pipeline.py", *_overrides(f"s3://{bucket}/flags"),
            "--run", run_uri, runtime_env=renv_file,
        )
        assert proc.returncode == 0, _job_log(proc)
        keys = s3.keys(bucket, "runs/flags/")
        with patched_environ(s3.env):
            remote = RunDir.at(run_uri)
            images = remote.images_table.read_parquet()
            s3_emb = read_embeddings(remote, "pixels")
            s3_nb = read_neighbours(run_uri, "pixels")
    assert all(p.startswith(f"s3://{bucket}/flags/") for p in images.column("path").to_pylist())
    for key in ("images.parquet", "_meta/embeddings/model=pixels/manifest.json",
                "index/model=pixels/index.faiss", "_meta/neighbours/model=pixels/manifest.json",
                "report.html", "report.png"):
        assert f"runs/flags/{key}" in keys
    local_emb = read_embeddings(RunDir.at(cluster_run["run"]), "pixels")
    assert s3_emb.ids == local_emb.ids
    np.testing.assert_array_equal(s3_emb.vectors, local_emb.vectors)
    local_nb = read_neighbours(str(cluster_run["run"]), "pixels")
    cols = ["query_id", "rank", "neighbour_id"]
    assert s3_nb.select(cols).equals(local_nb.select(cols))
    np.testing.assert_allclose(s3_nb.column("score").to_numpy(), local_nb.column("score").to_numpy(),
                               rtol=1e-6)


def _upload_folder(s3: LocalS3, bucket: str, folder: Path, prefix: str) -> None:
    client = s3.client()
    for p in sorted(folder.iterdir()):
        client.put_object(Bucket=bucket, Key=f"{prefix}/{p.name}", Body=p.read_bytes())

