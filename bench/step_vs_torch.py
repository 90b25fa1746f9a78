"""One training step and one inference batch of flaxclf next to PyTorch, in one process, interleaved.

flaxclf: the job's own jitted step (flaxclf.training.steps.compile_steps on a 1-device mesh: dropout, forward, backward,
global-norm clipping 1.0, masked AdamW; the state donated) and its jitted eval step. PyTorch reference:
transformers' BertForSequenceClassification, torch eager (its default attention, SDPA), the same weights (the
flaxclf params exported with flaxclf.hf.weights.to_pt_state), the same batch, AdamW (decay without biases and
LayerNorm), clip_grad_norm_(1.0), dropout on. Both use every core (XLA's pool; torch.get_num_threads()).

Timing: `--reps` rounds; each round times one call of every system in turn (so drifting load from other
processes hits all of them alike), after a warm-up call each. Figures are medians of examples/s over rounds,
and each ratio is the median of the per-round ratios against torch. Only the ratios mean anything on a shared
machine. The process runs with flaxclf.runtime.hostmem.keep_freed_memory(), as the `flaxclf` command and train.py do,
and so do torch's calls in it: without it each flaxclf step page-faulted its 1.5 GB of temporaries afresh.

    .venv/bin/python bench/step_vs_torch.py                      # train 32x128 and infer 64x128, fp32
    .venv/bin/python bench/step_vs_torch.py --what infer --reps 15
    .venv/bin/python bench/step_vs_torch.py --systems fast,hf,bf16,torch   # + HF's Flax module, bf16 opt-in
    .venv/bin/python bench/step_vs_torch.py --profile            # per-op time tables (XLA thunks, torch ops)

Systems: fast = flaxclf's default backbone (model.impl=fast, flaxclf.models.bert.encoder: FlaxBertModule's params and
math in another layout, [CLS]-only last layer, fp32); hf = model.impl=hf (transformers' FlaxBertModule, fp32);
bf16 = fast with model.dtype=bfloat16 (opt-in mixed precision: bf16 matmul inputs, fp32 accumulation and
everything else fp32, fp32 params); torch = the reference (fp32); torch_bf16 = the reference under
torch.autocast("cpu", torch.bfloat16), as HF Trainer's bf16=True runs it.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable

from flaxclf.runtime.hostmem import keep_freed_memory

# As the flaxclf command does, before any computation; torch shares the process and so the setting (it had
# ~70k page faults a step without it, and none with it).
keep_freed_memory()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from flaxclf.config import MeshConfig, OptimConfig  # noqa: E402
from flaxclf.hf.weights import from_pretrained, to_pt_state  # noqa: E402
from flaxclf.models.bert import BertClassifier  # noqa: E402
from flaxclf.models.bert.families import decays as bert_decays  # noqa: E402
from flaxclf.options import SINGLE  # noqa: E402
from flaxclf.runtime import sharding  # noqa: E402
from flaxclf.training import steps  # noqa: E402
from flaxclf.training.optim import make_optimizer  # noqa: E402

NUM_LABELS = 4


def make_batch(batch: int, length: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tokens, [CLS] first, ragged padding (lengths from length/4 to length), as a bucketed batch has."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(max(2, length // 4), length + 1, batch)
    lengths[0] = length
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask, rng.integers(1000, vocab, (batch, length)), 0).astype(np.int32)
    ids[:, 0] = 101
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids),
            "labels": rng.integers(0, NUM_LABELS, batch).astype(np.int32), "weight": np.ones(batch, np.float32)}


def torch_model(params: dict, hf_config: transformers.BertConfig, train: bool) -> torch.nn.Module:
    """BertForSequenceClassification holding exactly `params`."""
    model = transformers.BertForSequenceClassification(hf_config)
    missing, unexpected = model.load_state_dict({k: torch.tensor(v) for k, v in to_pt_state(params).items()},
                                                strict=False)
    assert not unexpected and all(m.endswith("position_ids") for m in missing), (missing, unexpected)
    return model.train(train)


def torch_train_fn(model: torch.nn.Module, b: dict, autocast: bool = False) -> Callable[[], None]:
    decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)]
    rest = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                            lr=5e-5, eps=1e-8)
    t = {k: torch.tensor(b[k]).long() for k in ("input_ids", "attention_mask", "token_type_ids", "labels")}

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):  # as HF Trainer's bf16=True on CPU
            loss = model(**t).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return step


def torch_infer_fn(model: torch.nn.Module, b: dict, autocast: bool = False) -> Callable[[], None]:
    t = {k: torch.tensor(b[k]).long() for k in ("input_ids", "attention_mask", "token_type_ids")}

    def infer():
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            model(**t).logits.float().numpy()
    return infer


def flax_fns(model: BertClassifier, params: dict, train_b: dict, infer_b: dict,
             total_steps: int = 10_000) -> tuple[Callable[[], None], Callable[[], None], dict]:
    """The job's jitted train and eval steps on one device, as closures that wait for their results."""
    mesh = sharding.make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    tx = make_optimizer(OptimConfig(learning_rate=5e-5, weight_decay=0.01, max_grad_norm=1.0), total_steps,
                        bert_decays)
    shardings = steps.state_shardings(steps.abstract_state(model, tx, jnp.float32), mesh, model)
    train, evaluate = steps.compile_steps(model, tx, SINGLE, 1, mesh, shardings)
    holder = {"state": steps.create_state(params, tx, shardings, seed=0)}

    def put(b):
        return jax.device_put({k: jnp.asarray(v) for k, v in b.items()}, sharding.batch_sharding(mesh))
    tb, ib = put(train_b), put(infer_b)
    eval_params = steps.place(params, shardings.params)

    def train_step():
        holder["state"], m = train(holder["state"], tb)
        jax.block_until_ready(m["loss"])

    def infer():
        np.asarray(evaluate(eval_params, ib))
    hlo = {"train": lambda: train.lower(holder["state"], tb).compile().as_text(),
           "infer": lambda: evaluate.lower(eval_params, ib).compile().as_text()}
    return train_step, infer, hlo


def build(systems: list[str], what: list[str], batch: int, length: int, infer_batch: int,
          model_name: str) -> tuple[dict[str, dict[str, Callable[[], None]]], dict[str, dict]]:
    """{what: {system: zero-argument call}} for the requested systems, and each flax system's HLO getters."""
    model, params = from_pretrained(model_name, num_labels=NUM_LABELS, problem_type=SINGLE)
    params = jax.device_get(params)
    train_b = make_batch(batch, length, model.config.backbone.vocab_size)
    infer_b = make_batch(infer_batch, length, model.config.backbone.vocab_size, seed=1)
    fns: dict[str, dict[str, Callable[[], None]]] = {w: {} for w in what}
    hlos: dict[str, dict] = {}
    for system in systems:
        if system in ("torch", "torch_bf16"):
            hf, autocast = model.config.to_hf_config(), system == "torch_bf16"
            if "train" in what:
                fns["train"][system] = torch_train_fn(torch_model(params, hf, train=True), train_b, autocast)
            if "infer" in what:
                fns["infer"][system] = torch_infer_fn(torch_model(params, hf, train=False), infer_b, autocast)
            continue
        impl, dtype = {"fast": ("fast", jnp.float32), "hf": ("hf", jnp.float32),
                       "bf16": ("fast", jnp.bfloat16)}[system]
        m = BertClassifier(model.config, dtype=dtype, impl=impl)
        tr, inf, hlos[system] = flax_fns(m, params, train_b, infer_b)
        if "train" in what:
            fns["train"][system] = tr
        if "infer" in what:
            fns["infer"][system] = inf
    return fns, hlos


def interleaved(fns: dict[str, Callable[[], None]], reps: int, warmup: int = 2,
                pause: float = 0.0) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Seconds per call of every function, one call of each per round, and the page faults (minor, the
    process's) during each call. `pause` seconds of sleep before each call let the previous system's worker
    threads (XLA's pool, torch's OpenMP team) stop spinning first: on 2 cores a spinning pool steals the next
    system's cores."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    faults: dict[str, list[int]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, f in fns.items():
            time.sleep(pause)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - start)
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return times, faults


def summarize(times: dict[str, list[float]], examples: int, faults: dict[str, list[int]] | None = None,
              reference: str = "torch") -> dict[str, dict]:
    """Median examples/s per system, the median per-round ratio to the reference, median page faults a call."""
    out = {}
    for name, ts in times.items():
        row = {"examples_per_s": round(examples / statistics.median(ts), 2), "median_ms": round(
            1e3 * statistics.median(ts), 1), "reps": len(ts)}
        if faults:
            row["page_faults"] = int(statistics.median(faults[name]))
        if reference in times and name != reference:
            paired = [r / t for r, t in zip(times[reference], ts, strict=True)]
            row[f"x_{reference}"] = round(statistics.median(paired), 3)
        out[name] = row
    return out


def _hlo_labels(hlo_text: str) -> dict[str, str]:
    """XLA op name -> "name shape" from the compiled module's text (e.g. ynn_fusion.14 -> f32[16,128,1152])."""
    labels = {}
    for line in hlo_text.splitlines():
        line = line.strip().removeprefix("ROOT ")
        if line.startswith("%") and " = " in line:
            name, rhs = line[1:].split(" = ", 1)
            labels[name] = rhs.split(" ", 1)[0].split("{")[0]
    return labels


def jax_op_table(fn: Callable[[], None], hlo_text: str = "", calls: int = 3,
                 top: int = 20) -> tuple[list[tuple[str, float, float]], dict[str, float]]:
    """From jax.profiler's trace of `calls` calls: the top XLA:CPU thunks (name + output shape, ms per call,
    share of all thunk time) and the time per kind of thunk (ynn_fusion = XNNPACK/YNNPACK dots, loop and
    input fusions = elementwise and reductions, ...)."""
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        for _ in range(calls):
            fn()
        jax.profiler.stop_trace()
        path = sorted(glob.glob(f"{d}/**/*.xplane.pb", recursive=True))[-1]
        data = jax.profiler.ProfileData.from_file(path)
    totals: collections.Counter = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if line.name == "python":
                continue
            for ev in line.events:
                if not ev.name.startswith(("ThreadpoolListener", "end: ", "ThunkExecutor", "SlinkyThreadPool")):
                    totals[ev.name] += ev.duration_ns
    labels = _hlo_labels(hlo_text)
    whole = sum(totals.values()) or 1
    kinds: collections.Counter = collections.Counter()
    for k, v in totals.items():
        kinds[k.rsplit(".", 1)[0]] += v / 1e6 / calls
    rows = [(f"{k} {labels.get(k, '')}", v / 1e6 / calls, v / whole) for k, v in totals.most_common(top)]
    return rows, dict(kinds.most_common(12))


def torch_op_table(fn: Callable[[], None], calls: int = 3, top: int = 20) -> str:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", default="train,infer", help="comma list of train, infer")
    p.add_argument("--systems", default="fast,hf,torch", help="comma list of fast, hf, bf16, torch, torch_bf16")
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--infer-batch", type=int, default=64)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--pause", type=float, default=1.0, help="seconds of sleep before each timed call")
    p.add_argument("--profile", action="store_true", help="print per-op time tables instead of timing")
    a = p.parse_args()
    what, systems = a.what.split(","), a.systems.split(",")
    machine = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "jax": jax.__version__,
               "torch": torch.__version__, "devices": str(jax.devices()[0].device_kind),
               "attn_implementation": transformers.BertConfig()._attn_implementation or "sdpa (default)"}
    print(json.dumps({"machine": machine, "args": vars(a)}))
    fns, hlos = build(systems, what, a.batch, a.length, a.infer_batch, a.model)
    for w in what:
        examples = a.batch if w == "train" else a.infer_batch
        if a.profile:
            for name, f in fns[w].items():
                f()
                print(f"\n== {w} {name}: top ops per call ==")
                if name.startswith("torch"):
                    print(torch_op_table(f))
                else:
                    rows, kinds = jax_op_table(f, hlos[name][w]())
                    print("by kind (ms per call):", json.dumps({k: round(v, 1) for k, v in kinds.items()}))
                    for op, ms, share in rows:
                        print(f"{ms:9.2f} ms {100 * share:5.1f}%  {op}")
            continue
        times, faults = interleaved(fns[w], a.reps, pause=a.pause)
        res = summarize(times, examples, faults)
        print(json.dumps({"what": w, "batch": examples, "length": a.length, "results": res}))


if __name__ == "__main__":
    main()
