"""What the tests share: the `flaxclf` command run as a user runs it, the tiny run's arguments, reading what a
run leaves, a once-per-session build shared by every xdist worker, and the float32 parity bound."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# The tests' own cache, kept across runs on a machine (conftest.py says what lives there). An empty folder is a
# cold run.
TEST_CACHE = Path(os.environ.get("FLAXCLF_TEST_CACHE") or Path.home() / ".cache" / "flaxclf-tests")

# The commands the tests start see one CPU device, as a user's laptop does, and compile at XLA's backend
# optimization level 0, as the in-process tests do (conftest): their tiny shapes run in next to no time
# unoptimized, and most of a child's time is compiling. The numbers are XLA's HLO semantics either way.
CHILD_XLA_FLAGS = "--xla_backend_optimization_level=0"


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = CHILD_XLA_FLAGS
    env["JAX_PLATFORMS"] = "cpu"
    env.update(extra)
    return env


def command(*args) -> list[str]:
    return [sys.executable, "-m", "flaxclf.cli", *map(str, args)]


def flaxclf(*args, cwd: Path = ROOT, stdin: str | None = None, timeout: int = 600,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The real `flaxclf` command, in a child process."""
    return subprocess.run(command(*args), input=stdin, capture_output=True, text=True, cwd=cwd,
                          env=env or child_env(), timeout=timeout)


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def refused(p: subprocess.CompletedProcess, command: str, *fragments: str) -> str:
    """The one-line error of a refused command (exit code 2, no traceback); returns it."""
    assert p.returncode == 2, (p.stdout[-2000:], p.stderr[-3000:])
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"flaxclf {command}: error: "), p.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def train_args(model_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["train", "--config", ROOT / "configs/tiny.yaml", f"model.name={model_dir}", f"train.output_dir={run_dir}",
            "data.max_length=32", "data.buckets=[16,32]", "--no-progress", *extra]


# The session's shared tiny run (conftest's tiny_run): a learning rate far too high, so that its best validation
# step comes before its last one, and a checkpoint every other step.
TINY_RUN_ARGS = ("train.max_steps=6", "train.eval_every=1", "checkpoint.every_steps=2", "optim.learning_rate=0.3",
                 "optim.schedule=constant", "optim.warmup_ratio=0")


def kill_9_after(model_dir: Path, run_dir: Path, step: int, *extra: str) -> None:
    """Starts the training command and sends it SIGKILL once metrics.jsonl has logged `step`."""
    proc = subprocess.Popen(command(*train_args(model_dir, run_dir, *extra)), cwd=ROOT, env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        steps = [r["step"] for r in records(run_dir)] if (run_dir / "metrics.jsonl").is_file() else []
        if steps and max(steps) >= step:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "precondition: the run must still be going when it is killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "summary.json").exists()


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def tree_hash(folder: Path) -> str:
    """A hash of every path and byte under a folder: 'left as it was' means this did not change."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode() + b"\0")
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def weights(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(folder / "model.safetensors"))


def same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)


def shared(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """A folder built once per test session, whichever xdist worker asks first: the workers' base temp folders
    share a parent, and a file lock there makes the others wait for the first build, then reuse it. `build`
    fills the folder it is given; a build that raised is not reused (the next asker builds again)."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"
    root.mkdir(exist_ok=True)
    folder, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            if folder.exists():
                import shutil

                shutil.rmtree(folder)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


# ---------------------------------------------------------------------------------------------- float32 bounds
#
# A parity test compares two float32 computations of the same function (flaxclf against torch, a packed batch
# against an unpacked one, sharded against one device). Neither is exact: each rounds at every operation, in an
# order that depends on the library, the machine's vector width and the thread count. The bound is the standard
# forward error of a float32 computation:
#   - one rounding costs at most u = 2^-24 relative (the unit roundoff);
#   - a sum of n terms in any order is off by at most ~sqrt(n)·u relative to the sum of magnitudes for random
#     rounding (the worst case is n·u; the probabilistic bound of Higham & Mary, 2019, is sqrt(n)·u with a small
#     constant, and it is what float32 reproduces across machines);
#   - a network of `depth` such reductions in sequence (matmuls, softmax, LayerNorm, the backward pass's
#     transposes) compounds them additively to first order;
#   - 16 is the constant that covers the two sides' errors, the conditioning of softmax and LayerNorm on inputs
#     of unit scale, and the reassociation of the same sum by two libraries.
# So |a - b| <= 16 · depth · sqrt(n) · u · scale, where n is the longest reduction (the contraction width, or
# the number of elements summed into a loss) and scale the magnitude of what is compared (1 for a value of unit
# size; a gradient's largest magnitude for a gradient). Every bound in the suite is f32_bound(...) with its
# depth, n and scale named at the call, and the same in every environment; a bound below this is a test of one
# machine's rounding, which another machine fails.
F32_UNIT_ROUNDOFF = 2.0 ** -24


def f32_bound(depth: int, n: int, scale: float = 1.0) -> float:
    """The float32 parity bound for `depth` reductions in sequence of at most `n` terms, at magnitude `scale`."""
    return 16 * depth * math.sqrt(n) * F32_UNIT_ROUNDOFF * scale


# One AdamW update of one element in float32 (optax) against torch.optim.AdamW: the clip's multiply, mu (3 ops),
# nu (4), the two bias corrections (2), sqrt and + eps (2), the divide, the decay term (2), * lr and the step onto
# the parameter (2): 17 roundings, elementwise (n = 1; the clip's global norm changes every gradient by one
# factor, which Adam's m / sqrt(v) divides out). Each step's result is rounded at the parameter's magnitude.
ADAMW_OPS = 17


# A key bias and the query bias whose gradient sets its scale (BERT-like, DistilBERT, DeBERTa's content and c2p keys).
_KEY_BIASES = (("key", "query"), ("k_lin", "q_lin"), ("key_proj", "query_proj"), ("pos_key_proj", "query_proj"))


def query_of(path: str) -> str:
    """A key bias's exact gradient is 0 (softmax ignores a constant added to every score of a query): what two runs
    get is the rounding of terms at its query bias's gradient's scale, which cancel. Its bound is at that scale (or
    its own, if larger: DeBERTa's key_proj bias also reaches p2c's scores, k_j . Qr, which vary with j). `path`
    separates names with "/" or "."; other paths are their own."""
    for sep in "/.":
        for key, query in _KEY_BIASES:
            if path == f"{key}{sep}bias" or path.endswith(f"{sep}{key}{sep}bias"):
                return path[:-len(f"{key}{sep}bias")] + f"{query}{sep}bias"
    return path


def adamw_param_bound(path: str, ref: np.ndarray, nus: list[dict[str, np.ndarray]], grad_depth: int, tokens: int,
                      lr: float, b2: float, eps: float) -> np.ndarray:
    """A parameter tensor after len(nus) AdamW steps of two float32 runs, elementwise. Each step rounds p + update
    at |p|. AdamW divides each element by its own gradient size sqrt(v-hat): a gradient error d (the tensor's
    f32_bound at its largest gradient, or for a key bias its query bias's) moves the update by up to
    ~2 d / sqrt(v-hat) of lr, never more than 2 lr, plus the update's own roundings; an element no gradient
    reached (v = 0) moves by weight decay alone. `nus`: the reference run's second moment after each step, by
    path."""
    total = f32_bound(len(nus), 1, np.abs(np.asarray(ref, np.float64)))
    for t, nu in enumerate(nus, 1):
        g2 = [(nu[q] - (b2 * nus[t - 2][q] if t > 1 else 0.0)) / (1 - b2) for q in {path, query_of(path)} if q in nu]
        g_max = float(np.sqrt(max(np.max(g, initial=0.0) for g in g2)))
        size = np.sqrt(nu[path] / (1 - b2 ** t))
        moved = np.minimum(2.0, 2 * f32_bound(grad_depth, tokens, g_max) / (size + eps))
        total = total + lr * (np.where(size > 0, moved, 0.0) + f32_bound(ADAMW_OPS, 1))
    return total


def random_batches(n: int, size: int, length: int, num_labels: int, vocab: int = 30522,
                   seed: int = 1234) -> list[dict[str, np.ndarray]]:
    """Train batches of random tokens with ragged padding, and a few weight-0 (filler) rows spread unevenly over
    each batch (rows 1, 2 and the last)."""
    rng = np.random.RandomState(seed)
    out = []
    for _ in range(n):
        lengths = rng.randint(3, length + 1, size)
        mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
        ids = np.where(mask, rng.randint(1000, vocab, (size, length)), 0).astype(np.int32)
        ids[:, 0] = 101  # [CLS]
        weight = np.ones(size, np.float32)
        weight[[1, 2, size - 1]] = 0.0
        out.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids),
                    "labels": rng.randint(0, num_labels, size).astype(np.int32), "weight": weight})
    return out


def rt_texts() -> list[str]:
    """The Rotten Tomatoes snippets of the main job's data set (the vaderSentiment archive), as plain texts."""
    from flaxclf.assets import rt_snippets_file

    with open(rt_snippets_file(), encoding="latin-1") as f:
        return [line.rstrip("\n").split("\t")[-1] for line in f if line.strip()]


def train_sentencepiece(folder: Path, texts: list[str], vocab_size: int) -> Path:
    """A SentencePiece unigram model trained offline on `texts`, laid out as DeBERTa-v3's spm.model ([PAD] 0,
    [CLS] 1, [SEP] 2, [UNK] 3, [MASK] 4); single-threaded, so the same texts give the same model. Returns its
    path."""
    import sentencepiece

    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(folder / "spm"), vocab_size=vocab_size,
        model_type="unigram", pad_id=0, bos_id=1, eos_id=2, unk_id=3, pad_piece="[PAD]", bos_piece="[CLS]",
        eos_piece="[SEP]", unk_piece="[UNK]", user_defined_symbols=["[MASK]"], character_coverage=1.0,
        num_threads=1, minloglevel=2)
    (folder / "spm.vocab").unlink()
    return folder / "spm.model"
