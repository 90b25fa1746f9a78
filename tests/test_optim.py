"""The optax chain against the PyTorch reference: transformers' schedules, HF Trainer's AdamW groups."""

import jax
import numpy as np
import optax
import pytest

from flaxclf.config import OptimConfig
from flaxclf.models.bert.families import decays as bert_decays
from flaxclf.runtime.sharding import path_str
from flaxclf.training.optim import decay_mask, lr_schedule, make_optimizer
from tests.helpers import ADAMW_OPS, f32_bound
from tests.torch_ref import needs_torch

pytestmark = pytest.mark.hf

# The schedule in float32 against transformers' in Python floats, each step on its own (n = 1): the longest chain
# is the cosine's (step - warmup, / decay length, * pi, cos, 1 +, * 0.5, * lr), 7 roundings at the peak rate's scale.
SCHEDULE_OPS = 7


def _torch_lrs(schedule: str, lr: float, warmup: int, total: int, n: int) -> list[float]:
    torch = needs_torch()
    from transformers import optimization as o

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = {"linear": lambda: o.get_linear_schedule_with_warmup(opt, warmup, total),
             "cosine": lambda: o.get_cosine_schedule_with_warmup(opt, warmup, total),
             "constant": lambda: o.get_constant_schedule_with_warmup(opt, warmup)}[schedule]()
    lrs = []
    for _ in range(n):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("total,ratio", [(10, 0.0), (10, 0.2), (37, 0.1), (1000, 0.06), (7, 1.0)])
def test_schedule_matches_transformers(schedule, total, ratio):
    cfg = OptimConfig(learning_rate=3e-5, schedule=schedule, warmup_ratio=ratio)
    # HF Trainer's warmup length: ceil(ratio * total); optax's count is the number of updates done so far.
    expected = _torch_lrs(schedule, cfg.learning_rate, int(np.ceil(ratio * total)), total, total + 2)
    got = [float(lr_schedule(cfg, total)(step)) for step in range(total + 2)]
    diff, bound = np.abs(np.subtract(got, expected)).max(), f32_bound(SCHEDULE_OPS, 1, cfg.learning_rate)
    print(f"{schedule} {total} {ratio}: max |diff| {diff:.2g}, bound {bound:.2g}")
    assert diff <= bound


def test_zero_total_steps_is_a_clear_error():
    with pytest.raises(ValueError, match="at least one optimizer step"):
        lr_schedule(OptimConfig(), 0)


def test_schedule_constants_name_what_a_compiled_step_holds_of_the_runs_length():
    """The step cache keys a train step on these: a constant rate without warmup holds nothing of max_steps, so a
    run resumed with other max_steps reads its step (test_compilation); a decay's slope holds the total."""
    from flaxclf.training.optim import schedule_constants

    constant = OptimConfig(schedule="constant", warmup_ratio=0.0)
    assert schedule_constants(constant, 6) == schedule_constants(constant, 600) == ()
    warm = OptimConfig(schedule="constant", warmup_ratio=0.5)
    assert schedule_constants(warm, 6) == (3,) and schedule_constants(warm, 8) == (4,)
    for kind in ("linear", "cosine"):
        decay = OptimConfig(schedule=kind, warmup_ratio=0.0)
        assert schedule_constants(decay, 6) == (0, 6) != schedule_constants(decay, 8)
        # the schedules differ where the constants do, and agree where they do not
        assert float(lr_schedule(decay, 6)(3)) != float(lr_schedule(decay, 8)(3))
    assert float(lr_schedule(constant, 6)(3)) == float(lr_schedule(constant, 600)(3))



TINY = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=16, num_labels=3)


def _flax_path(torch_name: str) -> tuple[list[str], bool]:
    """A torch BertForSequenceClassification param name -> (flax path, transposed?)."""
    parts = torch_name.split(".")
    if parts[:2] == ["bert", "pooler"]:
        parts = parts[1:]
    parent, leaf = parts[-2], parts[-1]
    if leaf == "weight":
        if "LayerNorm" in parts:
            return parts[:-1] + ["scale"], False
        if parent.endswith("embeddings"):
            return parts[:-1] + ["embedding"], False
        return parts[:-1] + ["kernel"], True
    return parts, False


@pytest.fixture(scope="module")
def torch_model():
    torch = needs_torch()
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**TINY))
    with torch.no_grad():  # nonzero biases and non-unit LayerNorm scales, so a wrong decay mask shows
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return model


def _to_flax(named: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for name, value in named.items():
        path, transposed = _flax_path(name)
        node = tree.setdefault("params", {})
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value.T if transposed else value
    return tree


def _flat(tree) -> dict[str, np.ndarray]:
    return {path_str(kp): np.asarray(v) for kp, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_decay_mask_matches_hf_trainer(torch_model):
    from transformers import Trainer

    names = [n for n, _ in torch_model.named_parameters()]
    hf_decay = set(Trainer.get_decay_parameter_names(None, torch_model))
    mask = _flat(decay_mask(_to_flax({n: np.zeros(1) for n in names}), bert_decays))
    ours = {n for n in names if mask["params/" + "/".join(_flax_path(n)[0])]}
    assert ours == hf_decay
    assert "bert.embeddings.word_embeddings.weight" in ours
    assert "classifier.bias" not in ours and "bert.embeddings.LayerNorm.weight" not in ours


def test_three_steps_match_torch_adamw(torch_model):
    import torch
    from transformers import Trainer
    from transformers.optimization import get_linear_schedule_with_warmup

    cfg = OptimConfig(learning_rate=1e-2, weight_decay=0.1, warmup_ratio=0.2, schedule="linear",
                      max_grad_norm=1.0)
    total = 10
    model = type(torch_model)(torch_model.config)
    model.load_state_dict(torch_model.state_dict())
    decay = set(Trainer.get_decay_parameter_names(None, model))
    named = dict(model.named_parameters())
    groups = [{"params": [p for n, p in named.items() if n in decay], "weight_decay": cfg.weight_decay},
              {"params": [p for n, p in named.items() if n not in decay], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.b1, cfg.b2), eps=cfg.eps)
    sched = get_linear_schedule_with_warmup(opt, int(np.ceil(cfg.warmup_ratio * total)), total)

    params = _to_flax({n: p.detach().numpy().copy() for n, p in named.items()})
    tx = make_optimizer(cfg, total, bert_decays)
    state = tx.init(params)
    rng = np.random.default_rng(0)
    norms = []
    # Different scales per step, one of them under max_grad_norm: Adam is nearly scale-invariant, so only
    # scales that clipping changes unevenly make a wrong clip visible in the params.
    for scale in (1.0, 0.005, 3.0):
        grads_np = {n: scale * rng.normal(size=p.shape).astype(np.float32) for n, p in named.items()}
        for n, p in named.items():
            p.grad = torch.tensor(grads_np[n])  # a copy: clip_grad_norm_ scales in place
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)))
        opt.step()
        sched.step()
        updates, state = tx.update(_to_flax(grads_np), state, params)
        params = optax.apply_updates(params, updates)
    assert min(norms) < cfg.max_grad_norm < max(norms)

    expected = _flat(_to_flax({n: p.detach().numpy() for n, p in named.items()}))
    got = _flat(params)
    assert got.keys() == expected.keys()
    steps = len(norms)
    worst = 0.0
    for k in expected:
        # Elementwise, at the largest magnitude the parameter had on the way (an update moves it by <= ~lr).
        scale = np.abs(expected[k]) + steps * cfg.learning_rate
        diff = np.abs(got[k].astype(np.float64) - expected[k])
        worst = max(worst, float((diff / scale).max()))
        assert np.all(diff <= f32_bound(steps * ADAMW_OPS, 1, scale)), k
    print(f"AdamW: worst |diff| / scale {worst:.2g}, bound {f32_bound(steps * ADAMW_OPS, 1):.2g} of the scale")
    start = _flat(_to_flax({n: p.detach().numpy() for n, p in torch_model.named_parameters()}))
    assert max(np.abs(got[k] - start[k]).max() for k in got) > 1e-3  # the steps moved the params


def test_no_clipping_keeps_the_state_structure():
    params = {"params": {"dense": {"kernel": np.ones((2, 2), np.float32), "bias": np.ones(2, np.float32)}}}
    with_clip = make_optimizer(OptimConfig(max_grad_norm=1.0), 10, bert_decays).init(params)
    without = make_optimizer(OptimConfig(max_grad_norm=None), 10, bert_decays).init(params)
    assert jax.tree.structure(with_clip) == jax.tree.structure(without)
