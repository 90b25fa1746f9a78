"""Where a run's time goes, and the compilation that used to take much of it: the steps compiled ahead for only
the shapes the run uses, and JAX's persistent compilation cache, walked through the real `flaxclf train`."""

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from flaxclf import data
from flaxclf.config import load_config
from flaxclf.runtime import compilation, timing
from flaxclf.training import loop as train
from tests.helpers import ROOT, child_env, flaxclf, ok, same_weights, summary, train_args

pytestmark = pytest.mark.journey


def _cache_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.endswith((".lock", "-atime")))


@pytest.fixture(scope="module")
def cached_runs(tmp_path_factory, tiny_model_dir) -> dict:
    """The same command four times, each into a fresh run directory, sharing one compilation cache folder:
    the first fills it, the second reads it, the third after the step executables were deleted (JAX's own
    entries answer, and nothing is saved from them), the fourth after every entry was cut short."""
    root = tmp_path_factory.mktemp("compile")
    cache = root / "xla"
    args = ("train.max_steps=6", "train.eval_every=3", f"train.compilation_cache_dir={cache}")
    out = {"cache": cache, "stdout": {}}
    for name in ("first", "second"):
        out[name] = root / name
        out["stdout"][name] = ok(flaxclf(*train_args(tiny_model_dir, out[name], *args))).stdout
    (steps,) = cache.glob("*/steps")
    out["steps_saved"] = sorted(steps.iterdir())
    shutil.rmtree(steps)
    out["third"] = root / "third"
    out["stdout"]["third"] = ok(flaxclf(*train_args(tiny_model_dir, out["third"], *args))).stdout
    out["steps_after_third"] = sorted(steps.iterdir()) if steps.exists() else []
    out["files"] = _cache_files(cache)
    for f in out["files"]:  # a disk that filled up mid-write, or a kill: every entry truncated
        f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    out["fourth"] = root / "fourth"
    out["stdout"]["fourth"] = ok(flaxclf(*train_args(tiny_model_dir, out["fourth"], *args))).stdout
    out["steps_after_fourth"] = sorted(steps.iterdir())
    return out


def test_the_breakdown_adds_up_to_the_wall_time(cached_runs):
    t = summary(cached_runs["first"])["time"]
    assert list(t["phases_s"]) == list(timing.PHASES)
    assert sum(t["phases_s"].values()) == pytest.approx(t["wall_s"], abs=0.01)
    for phase in ("startup", "model", "compile", "train", "evaluate", "checkpoint", "export"):
        assert t["phases_s"][phase] > 0, phase
    assert t["phases_s"]["other"] < 0.05 * t["wall_s"]  # the phases cover the run
    # the steps compiled ahead: training itself compiles next to nothing
    assert t["phases_s"]["compile"] + t["phases_s"]["model"] > t["phases_s"]["train"] / 10
    assert t["compilation"]["compiles"] >= 4 and t["compilation"]["seconds"] > 0 and t["peak_rss_gb"] > 0.1
    assert "  time: " in cached_runs["stdout"]["first"] and "compilation " in cached_runs["stdout"]["first"]
    rises = t["peak_rss_rise_gb"]
    assert list(rises) == list(timing.PHASES) and min(rises.values()) >= 0
    assert sum(rises.values()) == pytest.approx(t["peak_rss_gb"], abs=0.01)  # the rises add up to the peak
    assert "peak memory " in cached_runs["stdout"]["first"] and "startup +" in cached_runs["stdout"]["first"]
    # The flaxclf command keeps freed memory, capped at one step's working set by default.
    cap = summary(cached_runs["first"])["host_memory"]
    assert cap["cap_gb"] > 0.2 and cap["trims"] >= 0
    # The line shows the cap to 2 places and the summary keeps 3: 0.6849 GB reads "0.68", while 0.685 would read
    # "0.69", so compare the numbers, not a string built from the rounded one.
    (shown,) = re.findall(r"given back above (\d+\.\d\d) GB resident", cached_runs["stdout"]["first"])
    assert float(shown) == pytest.approx(cap["cap_gb"], abs=0.0051)


def test_the_peak_memory_rise_is_charged_to_the_phase_that_allocated():
    clock = timing.Clock()
    resident = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    rise = 400 * 2**20  # above whatever peak this process reached before
    with clock.phase("train"):
        with clock.phase("evaluate"):
            block = np.ones(timing.peak_rss_bytes() - resident + rise, np.uint8)  # touched: resident
        del block
        with clock.phase("export"):
            pass
    rises = clock.breakdown()["peak_rss_rise_gb"]
    assert rises["evaluate"] == pytest.approx(rise / 1e9, rel=0.1)
    assert rises["train"] < 0.05 and rises["export"] < 0.05


def test_a_second_run_reads_every_executable_from_the_cache_and_trains_the_same(cached_runs):
    first, second = (summary(cached_runs[k])["time"]["compilation"] for k in ("first", "second"))
    assert first["cache_hits"] == 0 and first["compiles"] > 0 and first["load_s"] == 0
    assert second["compiles"] == first["compiles"]
    assert second["cache_hits"] == second["compiles"]  # nothing compiled afresh
    # The steps were not even traced: each one read whole from the cache is one trace fewer (a count, not the
    # seconds, which a busy machine stretches).
    assert second["load_s"] > 0 and len(cached_runs["steps_saved"]) >= 2
    assert second["traces"] == first["traces"] - len(cached_runs["steps_saved"])
    assert "read from the compilation cache" in cached_runs["stdout"]["second"]
    same_weights(cached_runs["first"] / "export", cached_runs["second"] / "export")
    assert summary(cached_runs["first"])["test"] == summary(cached_runs["second"])["test"]
    # one folder per jax version and machine, holding the executables
    (machine,) = [p.name for p in cached_runs["cache"].iterdir()]
    assert machine.startswith("jax") and len(cached_runs["files"]) >= first["compiles"]


def test_executables_read_from_jax_cache_are_not_saved_as_steps_and_change_nothing(cached_runs):
    # XLA:CPU re-serializes an executable it deserialized without some of its functions; a step saved from
    # one failed when run ("Function ... not found"). So only fresh compiles are saved.
    third = summary(cached_runs["third"])["time"]["compilation"]
    assert third["cache_hits"] == third["compiles"] and third["load_s"] == 0
    assert cached_runs["steps_after_third"] == []
    same_weights(cached_runs["first"] / "export", cached_runs["third"] / "export")


def test_truncated_cache_entries_are_compiled_again_and_change_nothing(cached_runs):
    fourth = summary(cached_runs["fourth"])["time"]["compilation"]
    assert fourth["cache_hits"] == 0 and fourth["compiles"] > 0
    same_weights(cached_runs["first"] / "export", cached_runs["fourth"] / "export")
    assert summary(cached_runs["first"])["test"] == summary(cached_runs["fourth"])["test"]
    assert len(cached_runs["steps_after_fourth"]) >= 2  # the fresh compiles were saved again, whole


def test_an_unwritable_cache_folder_turns_the_cache_off_and_the_run_goes_on(tmp_path, tiny_model_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    p = ok(flaxclf(*train_args(tiny_model_dir, tmp_path / "run", "train.max_steps=2",
                                 f"train.compilation_cache_dir={blocker / 'xla'}")))
    assert "compilation cache off: can't create" in p.stderr and "train.compilation_cache_dir" in p.stderr
    assert summary(tmp_path / "run")["time"]["compilation"]["cache_hits"] == 0


def test_a_resumed_run_with_another_max_steps_reads_its_steps_from_the_cache(tmp_path, tiny_model_dir):
    """A constant learning rate without warmup: the compiled train step does not depend on train.max_steps, so a run
    resumed with more steps reads every step executable whole from the cache and saves none anew. (A decaying
    schedule holds the total as a constant, and compiles again: test_optim's schedule_constants test.)"""
    cache, run_dir = tmp_path / "xla", tmp_path / "run"
    # One shape for every step (packed: data.packing_shapes=1), so that the resumed steps have no shape of their own.
    args = ("train.eval_every=2", "checkpoint.every_steps=2", "data.buckets=[32]", "data.packing_shapes=1",
            "optim.schedule=constant", "optim.warmup_ratio=0", f"train.compilation_cache_dir={cache}")
    ok(flaxclf(*train_args(tiny_model_dir, run_dir, "train.max_steps=2", *args)))
    (steps,) = cache.glob("*/steps")
    saved = sorted(steps.iterdir())
    again = ok(flaxclf(*train_args(tiny_model_dir, run_dir, "train.max_steps=4", *args)))
    assert "resumed from" in again.stdout and summary(run_dir)["steps"] == 4
    assert sorted(steps.iterdir()) == saved  # nothing compiled anew to save
    compiled = summary(run_dir)["time"]["compilation"]
    assert compiled["step_loads"] == len(saved) == 2  # the train step and the eval step, both read whole


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_a_second_predict_or_evaluate_compiles_nothing(tiny_run, tmp_path, command):
    """The second command on the same run reads every executable from the compilation cache (--verbose counts
    them); a cache folder of this test's own, so that the first one compiles."""
    env = child_env(FLAXCLF_CACHE=str(tmp_path / "cache"))
    args = (("predict", tiny_run, "-") if command == "predict" else ("evaluate", tiny_run, "--split", "test"))
    counts = []
    for _ in range(2):
        p = ok(flaxclf(*args, "--verbose", "--no-progress", stdin="a great film\nawful\n", env=env))
        (line,) = [x for x in p.stderr.splitlines() if x.startswith(f"flaxclf {command}: compilation: ")]
        counts.append(tuple(map(int, re.findall(r"(\d+) executables, (\d+) read from", line)[0])))
    (first, first_hits), (second, second_hits) = counts
    assert first > 0 and first_hits == 0
    assert second == first and second_hits == second


def test_cache_off_writes_no_cache(tmp_path, tiny_model_dir):
    cache = tmp_path / "xla"
    ok(flaxclf(*train_args(tiny_model_dir, tmp_path / "run", "train.max_steps=2", "train.compilation_cache=false",
                             f"train.compilation_cache_dir={cache}")))
    assert not cache.exists()


# ---------------------------------------------------------------------------------------------- only what runs


@pytest.mark.parametrize("steps", [1, 3, 7, 30])
@pytest.mark.parametrize("start", [0, 5])
def test_train_lengths_are_those_of_the_batches_that_run(steps, start):
    rng = np.random.default_rng(0)
    lengths = rng.choice([5, 12, 20, 30, 60], size=200, p=[0.5, 0.3, 0.15, 0.04, 0.01])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    split = data.TokenizedSplit(
        name="train", input_ids=np.ones(offsets[-1], np.int32), token_type_ids=np.zeros(offsets[-1], np.int32),
        offsets=offsets, labels=np.zeros(len(lengths), np.int32), rows=np.arange(len(lengths)),
        num_rows_total=len(lengths), max_length=64, process_index=0, process_count=1)
    batches = data.TrainBatches(split, 16, [8, 16, 32, 48], seed=3, sharding=None, prefetch=0)
    for _ in range(start):
        next(batches)
    planned = batches.lengths(steps)
    drawn = sorted({next(batches)["input_ids"].shape[1] for _ in range(steps)})
    assert planned == drawn


def test_setup_compiles_the_train_shapes_of_the_steps_left_and_none_for_a_finished_run(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    args = train_args(tiny_model_dir, run_dir, "train.max_steps=2", "data.buckets=[8,16,32]", "data.packing=off",
                      "train.compilation_cache=false")
    overrides = [str(a) for a in args[3:] if a != "--no-progress"]
    cfg = load_config(ROOT / "configs/tiny.yaml", overrides)
    job = train.setup(cfg)
    try:
        expected = sorted({(16, n) for n in job.batches.lengths(2)})
        assert job.train_step.shapes() == expected
        assert len(expected) < len(job.batches.bucket_lengths)  # two steps do not use every bucket
        evals = {(32, n) for s in ("validation", "test")
                 for n in data.eval_lengths(job.splits[s], 32, cfg.data.buckets, None)}
        assert job.eval_step.shapes() == sorted(evals)
    finally:
        job.ckpt.close()
        job.batches.close()
    train.run(cfg, show_progress=False)
    job = train.setup(cfg)  # the same command again: nothing left to train
    try:
        assert job.train_step.shapes() == [] and job.eval_step.shapes()
    finally:
        job.ckpt.close()
        job.batches.close()


def test_trim_keeps_the_most_recently_used_entries_that_fit(tmp_path):
    for i, name in enumerate(["old", "mid", "new"]):  # 100 bytes each, used at times 1000, 2000, 3000
        f = tmp_path / f"{name}-cache"
        f.write_bytes(b"x" * 100)
        os.utime(f, (1000 * (i + 1), 1000 * (i + 1)))
    (tmp_path / "old-atime").write_bytes(b"t")  # JAX's own eviction's bookkeeping goes with its entry
    (tmp_path / "notes.txt").write_text("not the cache's")
    compilation.trim_cache(tmp_path, 250)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mid-cache", "new-cache", "notes.txt"]


def test_machine_key_names_the_jax_version_and_platform():
    import jax

    key = compilation.machine_key()
    assert key.startswith(f"jax{jax.__version__}-cpu-") and key == compilation.machine_key()
    assert os.sep not in key
