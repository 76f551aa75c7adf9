"""Config validation: bad configs fail before any work with one line naming the problem."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from flagsim.config import load_config
from flagsim.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_shipped_configs_validate():
    cfg = load_config(REPO / "configs" / "default.yaml")
    assert "efficientnet-lite0-ms" in cfg.embed.models and "colour-layout" in cfg.embed.models
    assert cfg.embed.for_model("vit").batch_size == 8
    assert cfg.embed.for_model("clip").batch_size is None  # falls back to the registry default


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("embed:\n  models: [vit, nosuchmodel]\n", "unknown model 'nosuchmodel'"),
        ("embed:\n  defaults: {batch_size: -4}\n", "embed.defaults.batch_size"),
        ("embed:\n  settings: {vit: {batch_size: 0}}\n", "embed.settings.vit.batch_size"),
        ("embd:\n  models: [vit]\n", "embd: unknown key"),
        ("embed:\n  modles: [vit]\n", "embed.modles: unknown key"),
        ("neighbours: {k: 0}\n", "neighbours.k"),
        ("- a list\n", "top level must be a mapping"),
        ("embed: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_config_is_one_line_error(tmp_path, text, expected):
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text))
    msg = str(info.value)
    assert expected in msg
    assert "\n" not in msg


def test_unknown_model_lists_valid_names(tmp_path):
    with pytest.raises(ConfigError, match="valid models: .*efficientnet-lite0"):
        load_config(_write(tmp_path, "embed:\n  models: [vitt]\n"))


def test_overrides_are_parsed_as_yaml_and_validated():
    cfg = load_config(None, ["embed.models=[pixels]", "embed.shard_size=7"])
    assert cfg.embed.models == ("pixels",)
    assert cfg.embed.shard_size == 7
    with pytest.raises(ConfigError, match="embed.shard_size"):
        load_config(None, ["embed.shard_size=-1"])
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(None, ["embed.shard_size"])


@pytest.mark.parametrize(("written", "value"), [("no", "no"), ("yes", "yes"), ("'no'", "no"),
                                                ("off", "no"), ("auto", "auto")])
def test_use_gpu_written_unquoted_in_yaml(tmp_path, written, value):
    # YAML 1.1 reads the documented `use_gpu: no` as a boolean; the file and --set both work
    assert load_config(_write(tmp_path, f"index:\n  use_gpu: {written}\n")).index.use_gpu == value
    assert load_config(None, [f"index.use_gpu={written}"]).index.use_gpu == value
    with pytest.raises(ConfigError, match="index.use_gpu"):
        load_config(None, ["index.use_gpu=maybe"])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_config_from_dev_null_is_the_defaults():
    # any readable file counts (so do `--config <(...)` pipes): /dev/null is empty, the defaults
    assert load_config("/dev/null") == load_config(None)


def test_key_given_twice_in_yaml_is_an_error(tmp_path):
    # PyYAML keeps the last one silently; a config with two answers to one question is a mistake
    text = "embed:\n  shard_size: 10\n  models: [pixels]\n  shard_size: 20\n"
    with pytest.raises(ConfigError, match=r"line 4: key 'shard_size' given twice"):
        load_config(_write(tmp_path, text))
    # the same key in two different mappings is fine
    cfg = load_config(_write(tmp_path, "embed:\n  settings:\n    pixels: {batch_size: 2}\n"
                                       "    clip: {batch_size: 2}\n"))
    assert cfg.embed.for_model("pixels").batch_size == 2
    # YAML merge keys (`<<:`) still load, and may be overridden by the mapping's own keys
    cfg = load_config(_write(tmp_path, "embed:\n  defaults: &d {batch_size: 4, num_actors: 2}\n"
                                       "  settings:\n    pixels: {<<: *d, batch_size: 8}\n"))
    assert (cfg.embed.for_model("pixels").batch_size, cfg.embed.for_model("pixels").num_actors) \
        == (8, 2)
    # a list as a key is PyYAML's own one-line error, not a traceback
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "? [a, b]\n: 1\n"))
    with pytest.raises(ConfigError, match="not a valid YAML value"):
        load_config(None, ["embed={[1]: 2}"])


@pytest.mark.parametrize(("override", "expected"), [
    ("embed.shard_size=", "has no value; leave the --set out"),
    ("embed.shard_size=  ", "has no value"),
    ("=3", "no key before '='"),
    ("embed..shard_size=3", "has an empty part"),
])
def test_override_without_key_or_value_is_an_error(override, expected):
    # `--set key=` used to keep the default silently
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [override])


def test_override_to_null_sets_null():
    # an explicit null is a value: it resets an optional key and is refused where one is needed
    base = load_config(None, ["embed.settings.pixels.batch_size=3"])
    assert base.embed.for_model("pixels").batch_size == 3
    cfg = load_config(None, ["embed.settings.pixels.batch_size=3",
                             "embed.settings.pixels.batch_size=null"])
    assert cfg.embed.for_model("pixels").batch_size is None
    with pytest.raises(ConfigError, match="embed.shard_size"):
        load_config(None, ["embed.shard_size=null"])


def test_cli_bad_config_fails_fast_before_ray(tmp_path):
    cfg = _write(tmp_path, "embed:\n  models: [pixels]\n  defaults: {batch_size: -1}\n")
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "flagsim", "embed", "--config", str(cfg), "--run", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120,
    )
    elapsed = time.monotonic() - t0
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == [lines[0]] and lines[0].startswith("flagsim: error:")
    assert "batch_size" in lines[0]
    assert not (tmp_path / "run").exists()  # nothing was written
    assert elapsed < 60  # generous: the point is it never reaches Ray


def test_unwritable_run_dir(tmp_path):
    """A run directory that cannot be created (its parent is a file) fails before any work."""
    from flagsim.config import check_writable

    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="not writable"):
        check_writable(str(blocker / "run"))
    # the run directory itself a file: said so (it said "not writable")
    with pytest.raises(ConfigError, match="output directory .*a_file is a file, not a directory"):
        check_writable(str(blocker))
    check_writable(str(tmp_path / "new" / "run"))  # creatable: fine


@pytest.mark.parametrize(
    ("override", "key", "limit"),
    [
        ("embed.defaults.batch_size=8193", "embed.defaults.batch_size", 8192),
        ("embed.settings.pixels.batch_size=100000", "embed.settings.pixels.batch_size", 8192),
        ("embed.decode_batch_size=4097", "embed.decode_batch_size", 4096),
        ("neighbours.batch_size=65537", "neighbours.batch_size", 65536),
    ],
)
def test_batch_sizes_are_capped(override, key, limit):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    msg = str(info.value)
    assert msg == f"--set: {key}: Input should be less than or equal to {limit}"
    ok = load_config(None, [f"{override.split('=')[0]}={limit}"])  # the cap itself is allowed
    assert ok is not None


def test_config_file_not_utf8_is_one_line_error(tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes("# réglages\nembed:\n  models: [pixels]\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert str(info.value) == f"{p}: not UTF-8 text (byte 0xe9 at offset 3)"


def test_cli_config_file_not_utf8_prints_one_line(tmp_path):
    p = tmp_path / "utf16.yaml"
    p.write_bytes("embed:\n  models: [pixels]\n".encode("utf-16"))
    proc = subprocess.run(
        [sys.executable, "-m", "flagsim", "embed", "--config", str(p), "--run", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"flagsim: error: {p}: not UTF-8 text (byte 0xff at offset 0)"]
    assert not (tmp_path / "run").exists()
