"""Run configs: every file in configs/ loads, overrides and base chains apply in order, and each mistake is one
clear line naming the key and what is allowed (levanter-style parametrization over the configs folder)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flaxclf.config import ConfigError, RunConfig, load_config, parse_override

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_configs_folder_is_not_empty():
    assert {p.name for p in CONFIGS} >= {"default.yaml", "tiny.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_and_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.train.global_batch_size % cfg.optim.grad_accum_steps == 0


def test_tiny_overrides_default_through_base():
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    assert cfg.model.name == "minilm-l6" and cfg.optim.warmup_ratio == 0.06  # from default.yaml
    assert cfg.data.max_length == 64 and cfg.train.max_steps == 12  # tiny.yaml's own
    assert cfg.checkpoint.async_save is True  # named in neither: flaxclf/config.py's default


# ---------------------------------------------------------------------------------------------- CLI errors
BAD_OVERRIDES = {
    "train.epochz=3": ["train.epochz", "'epochs'"],
    "model.pooling=avg": ["model.pooling", "'avg'", "'cls_pooler'", "'mean'"],
    "train.epochs=2.5": ["train.epochs", "2.5", "not an integer"],
}


@pytest.fixture(scope="module")
def cli_runs():
    """`python train.py --config configs/tiny.yaml <bad override>` for each bad override, run side by side
    (each start pays the jax/transformers import)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # as a user runs it
    procs = {o: subprocess.Popen([sys.executable, "train.py", "--config", "configs/tiny.yaml", o], cwd=ROOT, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for o in BAD_OVERRIDES}
    return {o: (p.wait(timeout=120), *p.communicate()) for o, p in procs.items()}


@pytest.mark.parametrize("override", BAD_OVERRIDES)
def test_bad_override_is_one_line_on_stderr_and_exit_2(override, cli_runs):
    code, out, err = cli_runs[override]
    assert code == 2, (code, err)
    assert len(err.splitlines()) == 1 and err.endswith("\n"), f"stderr is not one line:\n{err}"
    for word in BAD_OVERRIDES[override]:
        assert word in err, (word, err)
    assert "Traceback" not in err and out == ""


# ---------------------------------------------------------------------------------------------- load_config
def _error(*overrides: str, path=None) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path, list(overrides))
    message = str(e.value)
    assert "\n" not in message
    return message


def test_unknown_key_suggests_the_closest():
    assert _error("train.epochz=3") == "unknown config key 'train.epochz'; did you mean 'epochs'?"
    assert "did you mean 'optim'?" in _error("optm.learning_rate=1e-4")
    message = _error("train.zzz=1")  # nothing close: list what is there
    assert "known keys:" in message and "global_batch_size" in message


@pytest.mark.parametrize("override, expected", [
    ("train.epochs=three", "train.epochs: 'three' is not an integer"),
    ("train.epochs=true", "train.epochs: True is not an integer"),
    ("optim.learning_rate=fast", "optim.learning_rate: 'fast' is not a number"),
    ("model.remat=1", "model.remat: 1 is not a bool; use true or false"),
    ("data.buckets=32", "data.buckets: 32 is not a list; write it as [a, b, ...]"),
    ("data.buckets=[32, x]", "data.buckets[1]: 'x' is not an integer"),
    ("model.dtype=fp16", "model.dtype: 'fp16' is not allowed; use one of 'float32', 'bfloat16', 'float16'"),
    ("train=3", "train: expected a mapping of its fields, got 3"),
    ("train.epochs", "override 'train.epochs' is not of the form key=value (e.g. train.epochs=3)"),
])
def test_bad_value_names_key_and_what_is_allowed(override, expected):
    assert _error(override) == expected


def test_values_are_read_as_yaml_and_typed():
    cfg = load_config(None, ["optim.learning_rate=1", "train.max_steps=null", "data.buckets=[8, 16]",
                             "model.problem_type=regression", "optim.max_grad_norm=null", "model.remat=true"])
    assert cfg.optim.learning_rate == 1.0 and isinstance(cfg.optim.learning_rate, float)  # ints widen
    assert cfg.train.max_steps is None and cfg.optim.max_grad_norm is None
    assert cfg.data.buckets == [8, 16] and cfg.model.remat is True
    assert cfg.model.problem_type == "regression"
    # YAML 1.1 reads 3e-5 (no dot) as a string; learning rates are written that way all the time.
    cfg = load_config(None, ["optim.learning_rate=3e-5", "optim.max_grad_norm=1e0", "optim.eps=1E-6"])
    assert (cfg.optim.learning_rate, cfg.optim.max_grad_norm, cfg.optim.eps) == (3e-5, 1.0, 1e-6)
    assert parse_override("model.name=a=b") == {"model": {"name": "a=b"}}  # split at the first '='


def test_base_chain_applies_in_order(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "root.yaml").write_text("train: {epochs: 5, log_every: 7}\noptim: {learning_rate: 1e-3}\n")
    (tmp_path / "mid.yaml").write_text("base: root.yaml\ntrain: {epochs: 4}\n")
    # base: is relative to the file that names it
    (tmp_path / "sub" / "leaf.yaml").write_text("base: ../mid.yaml\ntrain: {epochs: 3}\ndata: {buckets: [8]}\n")
    cfg = load_config(tmp_path / "sub" / "leaf.yaml", ["train.log_every=9"])
    assert cfg.train.epochs == 3  # the leaf beats its bases
    assert cfg.optim.learning_rate == 1e-3  # from the root, two levels down
    assert cfg.train.log_every == 9  # the command line beats every file
    assert cfg.data.buckets == [8]  # lists are replaced, not merged
    assert cfg.train.global_batch_size == 32  # named nowhere: the dataclass default


def test_base_cycle_and_missing_files_are_config_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    assert "includes itself through 'base:'" in _error(path=tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: nowhere.yaml\n")
    assert _error(path=tmp_path / "c.yaml") == f"config file {tmp_path / 'nowhere.yaml'} does not exist"
    (tmp_path / "d.yaml").write_text("- a list\n")
    assert "must hold a mapping of sections" in _error(path=tmp_path / "d.yaml")
    (tmp_path / "e.yaml").write_text("train: {epochs: [\n")
    assert _error(path=tmp_path / "e.yaml").startswith(f"{tmp_path / 'e.yaml'} is not valid YAML at line 2, column 1: ")


@pytest.mark.parametrize("overrides, expected", [
    (["train.global_batch_size=30", "optim.grad_accum_steps=4"],
     "train.global_batch_size 30 does not divide into optim.grad_accum_steps 4 micro-batches"),
    (["optim.grad_accum_steps=0"], "optim.grad_accum_steps: 0 must be >= 1"),
    (["mesh.data=-1", "mesh.fsdp=-1"], "at most one -1"),
    (["mesh.tensor=0"], "must be >= 1"),
    (["data.task=null"], "data.task is null and no data.train_file is given"),
    (["optim.warmup_ratio=1.5"], "optim.warmup_ratio: 1.5 must be in [0, 1]"),
    (["optim.learning_rate=0"], "optim.learning_rate: 0.0 must be positive"),
    (["model.classifier_dropout=1.0"], "model.classifier_dropout: 1.0 must be in [0, 1) or null"),
    (["train.max_steps=0"], "train.max_steps: 0 must be positive or null"),
    (["data.max_length=1"], "data.max_length: 1 is too small"),
    (["train.host_memory_cap_gb=-1"], "train.host_memory_cap_gb: -1.0 must be >= 0"),
])
def test_cross_field_validation(overrides, expected):
    assert expected in _error(*overrides)


def test_accumulation_that_divides_is_accepted():
    cfg = load_config(None, ["train.global_batch_size=32", "optim.grad_accum_steps=4"])
    assert cfg.train.global_batch_size // cfg.optim.grad_accum_steps == 8


def test_default_yaml_spells_out_the_builtin_defaults():
    """`python train.py` with no --config and `--config configs/default.yaml` must run the same job."""
    assert load_config(Path(__file__).resolve().parents[1] / "configs/default.yaml") == RunConfig()
