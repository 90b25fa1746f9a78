"""The weighted losses against their references: PyTorch's CrossEntropyLoss (weight, label_smoothing) and
BCEWithLogitsLoss (pos_weight), values and gradients, with padded rows; gradient accumulation under class weights;
scikit-learn's balanced class weights; and the refusals of loss settings that can't apply."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxclf.config import ConfigError, LossConfig, MeshConfig, OptimConfig
from flaxclf.hf import weights
from flaxclf.models.bert import BertClassifier, BertSpec
from flaxclf.models.bert.families import decays as bert_decays
from flaxclf.options import MULTI, REGRESSION, SINGLE
from flaxclf.runtime import sharding
from flaxclf.training import losses, steps
from flaxclf.training.losses import LossSpec
from flaxclf.training.optim import make_optimizer
from tests.helpers import adamw_param_bound, f32_bound, random_batches
from tests.torch_ref import needs_torch

N_REAL, N_PAD, C = 12, 5, 3

# ---------------------------------------------------------------------------------------------- float32 bounds
# (tests/helpers.py derives f32_bound.) A weighted loss of a batch's logits: the log-sum-exp's sum over classes,
# the label smoothing's, the sum over rows and the division by the weights' sum are LOSS_DEPTH reductions in
# sequence, of at most every real row's every class (n = N_REAL * C). Each row's term is a log-sum-exp minus a
# logit, so its rounding is at the logits' magnitude, not the loss's. The gradient, softmax minus target times
# a weight over the weights' sum, rounds each probability at the logits' magnitude relative to it (exp of a
# rounded difference), at the gradient's magnitude.
LOSS_DEPTH = 4


def _loss_bound(logits: np.ndarray) -> float:
    return f32_bound(LOSS_DEPTH, N_REAL * C, float(np.abs(logits).max()))

# name -> (LossSpec, the torch loss's keyword arguments). ce_weight's weights are small enough that its batch's
# denominator sum_i cw[y_i] is below 1, so a clamp of the denominator to >= 1 would show.
CASES = {
    "ce_weight": (LossSpec(SINGLE, class_weights=(0.05, 0.01, 0.08)), dict(weight=(0.05, 0.01, 0.08))),
    "ce_smoothing": (LossSpec(SINGLE, label_smoothing=0.1), dict(label_smoothing=0.1)),
    "ce_weight_smoothing": (LossSpec(SINGLE, class_weights=(2.0, 0.5, 1.25), label_smoothing=0.2),
                            dict(weight=(2.0, 0.5, 1.25), label_smoothing=0.2)),
    "bce_pos_weight": (LossSpec(MULTI, pos_weight=(3.0, 0.5, 1.0)), dict(pos_weight=(3.0, 0.5, 1.0))),
}


def _case(problem_type: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(logits, labels, weight) of a batch whose padded rows (weight 0, large logits, random labels) sit between
    the real ones, and the index of the real rows."""
    rng = np.random.default_rng(seed)
    n = N_REAL + N_PAD
    logits = (3.0 * rng.normal(size=(n, C))).astype(np.float32)
    if problem_type == SINGLE:
        labels = rng.integers(0, C, n).astype(np.int32)
    else:
        labels = rng.integers(0, 2, (n, C)).astype(np.float32)
    real = np.sort(rng.choice(n, N_REAL, replace=False))
    pad = np.setdiff1d(np.arange(n), real)
    logits[pad] = 40.0 * rng.normal(size=(N_PAD, C))
    weight = np.zeros(n, np.float32)
    weight[real] = 1.0
    return logits, labels, weight, real


def _torch_loss_and_grad(spec: LossSpec, kwargs: dict, logits: np.ndarray, labels: np.ndarray
                         ) -> tuple[float, np.ndarray]:
    torch = needs_torch()
    x = torch.tensor(logits, requires_grad=True)
    args = {k: (torch.tensor(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()}
    if spec.problem_type == SINGLE:
        out = torch.nn.CrossEntropyLoss(**args)(x, torch.tensor(labels, dtype=torch.long))
    else:
        out = torch.nn.BCEWithLogitsLoss(**args)(x, torch.tensor(labels))
    out.backward()
    return out.item(), x.grad.numpy()


@pytest.mark.hf
@pytest.mark.parametrize("name", list(CASES))
def test_loss_and_gradient_equal_pytorch_with_padded_rows(name):
    spec, kwargs = CASES[name]
    logits, labels, weight, real = _case(spec.problem_type)
    want, want_grad = _torch_loss_and_grad(spec, kwargs, logits[real], labels[real])

    def f(x):
        return losses.loss(spec, x, jnp.asarray(labels), jnp.asarray(weight))

    got, grad = jax.value_and_grad(f)(jnp.asarray(logits))
    grad = np.asarray(grad)
    diff, bound = abs(float(got) - want), _loss_bound(logits[real])
    grad_diff = np.abs(grad[real] - want_grad).max()
    grad_bound = f32_bound(LOSS_DEPTH, N_REAL * C, np.abs(want_grad).max() * np.abs(logits[real]).max())
    print(f"{name}: loss {float(got)!r} vs torch {want!r}: diff {diff:.2g} (bound {bound:.2g}); gradient max diff "
          f"{grad_diff:.2g} (bound {grad_bound:.2g})")
    assert diff <= bound
    assert grad_diff <= grad_bound
    assert not np.any(grad[weight == 0]), "padded rows moved the gradient"
    # The weights change the loss (so the test is not passing on PyTorch's plain loss).
    plain, _ = _torch_loss_and_grad(spec, {}, logits[real], labels[real])
    assert abs(plain - want) > 1e-3
    if spec.class_weights is not None:
        # The weights' sum: each weight rounded to float32, then a sum of the rows' (all of them, padded at 0).
        den = float(losses.batch_denominator(spec, jnp.asarray(labels), jnp.asarray(weight)))
        assert abs(den - sum(spec.class_weights[y] for y in labels[real])) <= f32_bound(2, N_REAL + N_PAD, den)
        _, den_B = losses.example_terms(spec, jnp.asarray(logits), jnp.asarray(labels))
        assert abs(float((den_B * weight).sum()) - den) <= f32_bound(2, N_REAL + N_PAD, den)
        assert den < 1 or name != "ce_weight"


@pytest.mark.parametrize("name", list(CASES))
def test_micro_batches_with_the_whole_denominator_sum_to_the_batch_loss(name):
    spec, _ = CASES[name]
    logits, labels, weight, _ = _case(spec.problem_type, seed=1)
    x, y, w = jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(weight)
    whole = float(losses.loss(spec, x, y, w))
    den = losses.batch_denominator(spec, y, w)
    parts = sum(float(losses.loss(spec, x[i::3], y[i::3], w[i::3], den)) for i in range(3))
    print(f"{name}: |thirds - whole| {abs(parts - whole):.2g} (bound {_loss_bound(logits[weight > 0]):.2g})")
    assert abs(parts - whole) <= _loss_bound(logits[weight > 0])
    # Each third divided by its own denominator does not add up: the whole batch's is what makes it work.
    own = sum(float(losses.loss(spec, x[i::3], y[i::3], w[i::3])) for i in range(3)) / 3
    print(f"{name}: whole {whole:.6f}, thirds with its denominator {parts:.6f}, each with its own {own:.6f}")
    assert abs(own - whole) > 1e-3


def test_all_padding_batch_has_loss_zero_and_finite_gradient():
    spec = LossSpec(SINGLE, class_weights=(0.2, 0.1, 0.3))
    logits, labels, _, _ = _case(SINGLE)
    weight = jnp.zeros(len(labels))
    value, grad = jax.value_and_grad(lambda x: losses.loss(spec, x, jnp.asarray(labels), weight))(
        jnp.asarray(logits))
    assert float(value) == 0.0
    assert not np.any(np.asarray(grad))


def test_plain_problem_type_is_the_unweighted_spec():
    for problem_type in (SINGLE, MULTI):
        logits, labels, weight, _ = _case(problem_type)
        args = (jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(weight))
        assert float(losses.loss(problem_type, *args)) == float(losses.loss(LossSpec(problem_type), *args))


# The train step's set-up (test_steps', in small): the session's tiny BERT (2 layers, width 32, feed-forward 64)
# without dropout and a fresh 4-way head, AdamW at 1e-3, batches of random tokens with ragged padding and a few
# weight-0 rows.
NUM_LABELS, LENGTH, LEARNING_RATE = 4, 16, 1e-3
# float32 bounds of two runs of the same steps (test_steps derives them): the model's 2 layers of 6 matmuls in
# sequence, the pooler and the classifier to the logits (its widest contraction: the feed-forward's 64); the
# backward pass twice that and the weight gradients' sum over the batch's tokens; AdamW's 17 ops per update, which
# divides each element by its own gradient size sqrt(v) (so a gradient error d moves it by ~2 d / sqrt(v) of lr).
FORWARD_DEPTH, WIDTH = 2 * 6 + 2, 64
B2, EPS = OptimConfig.b2, OptimConfig.eps


def _param_bound(path: str, ref: np.ndarray, nus: list[dict[str, np.ndarray]], tokens: int) -> np.ndarray:
    """A parameter tensor after len(nus) AdamW steps, elementwise: helpers.adamw_param_bound."""
    return adamw_param_bound(path, ref, nus, 2 * FORWARD_DEPTH + 1, tokens, LEARNING_RATE, B2, EPS)


def _model(folder):
    config = weights.classifier_config(folder, num_labels=NUM_LABELS, problem_type=SINGLE)
    backbone = BertSpec(**{**config.backbone.__dict__, "hidden_dropout_prob": 0.0,
                           "attention_probs_dropout_prob": 0.0})
    return BertClassifier(config.replace(backbone=backbone, classifier_dropout=0.0))


def _batches(n: int, size: int, vocab: int = 30522) -> list[dict[str, np.ndarray]]:
    return random_batches(n, size, LENGTH, NUM_LABELS, vocab)


def _max_diff(a, b) -> float:
    diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)),
                                                   initial=0.0)), a, b)
    return max(jax.tree.leaves(diffs))


def _train_losses_params(model, host, spec, batches, accum_steps):
    mesh = sharding.make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    batch_s = sharding.batch_sharding(mesh)
    tx = make_optimizer(OptimConfig(learning_rate=LEARNING_RATE, warmup_ratio=0.0), 3, bert_decays)
    shardings = steps.state_shardings(steps.abstract_state(model, tx, jnp.float32), mesh, model)
    state = steps.create_state(host, tx, shardings, 0)
    train, _ = steps.compile_steps(model, tx, spec, accum_steps, mesh, shardings)
    out, nus = [], []
    for b in batches:
        state, m = train(state, {k: jax.make_array_from_process_local_data(batch_s, v) for k, v in b.items()})
        assert float(m["examples"]) == b["weight"].sum()
        out.append(float(m["loss"]))
        nu = jax.device_get(state.opt_state[1][0].nu)  # (clip, adamw = (scale_by_adam, ...))
        nus.append({sharding.path_str(kp): np.asarray(x, np.float64) for kp, x in
                    jax.tree_util.tree_leaves_with_path(nu)})
    return np.array(out), jax.device_get(state.params), nus


def test_accumulation_with_class_weights_equals_the_full_batch(tiny_model_dir):
    """Two micro-batches of 16 == one batch of 32 under skewed class weights (whose sum differs between the
    micro-batches, so dividing each by its own weight sum or count would not agree)."""
    spec = LossSpec(SINGLE, class_weights=(0.25, 3.0, 0.5, 1.5))
    model = _model(tiny_model_dir)
    host_params = weights.load_params(model, tiny_model_dir, jax.random.PRNGKey(0))
    batches = _batches(2, 32)
    ref_losses, ref_params, nus = _train_losses_params(model, host_params, spec, batches, 1)
    acc_losses, acc_params, _ = _train_losses_params(model, host_params, spec, batches, 2)
    _, plain_params, _ = _train_losses_params(model, host_params, SINGLE, batches, 1)
    loss_bound = f32_bound(FORWARD_DEPTH + LOSS_DEPTH, WIDTH, float(np.abs(ref_losses).max()))
    loss_diff = float(np.abs(acc_losses - ref_losses).max())
    worst, param_diff = 0.0, 0.0
    for (kp, ref), acc in zip(jax.tree_util.tree_leaves_with_path(ref_params), jax.tree.leaves(acc_params),
                              strict=True):
        bound = _param_bound(sharding.path_str(kp), np.asarray(ref, np.float64), nus, 32 * LENGTH)
        diff = np.abs(np.asarray(acc, np.float64) - ref)
        assert np.all(diff <= bound), (sharding.path_str(kp), float(diff.max()), float(bound.min()))
        worst, param_diff = max(worst, float((diff / bound).max())), max(param_diff, float(diff.max()))
    print(f"accum 2 vs 1: losses {acc_losses} vs {ref_losses}: diff {loss_diff:.2g} (bound {loss_bound:.2g}); "
          f"max param diff {param_diff:.2g} (worst diff/bound {worst:.2g}); "
          f"vs unweighted {_max_diff(ref_params, plain_params):.1e}")
    assert loss_diff <= loss_bound
    # Step 1's loss is the class-weighted mean PyTorch takes (divided by sum cw[y_i], not by the row count).
    b = {k: jnp.asarray(v) for k, v in batches[0].items()}
    logits = model.apply(host_params, b["input_ids"], b["attention_mask"], b["token_type_ids"])
    want = float(losses.loss(spec, logits, b["labels"], b["weight"]))
    print(f"step 1's loss vs the loss of the logits: diff {abs(ref_losses[0] - want):.2g}")
    assert abs(ref_losses[0] - want) <= loss_bound
    assert float(losses.batch_denominator(spec, b["labels"], b["weight"])) != float(b["weight"].sum())
    # The class weights steered the steps (the fresh head's loss is ~ln 4 with or without them), and they moved.
    assert _max_diff(ref_params, plain_params) > 1e-4
    assert _max_diff(ref_params, host_params) > 1e-3


NAMES = ("neg", "neutral", "pos")


def test_balanced_class_weights_equal_scikit_learn():
    from sklearn.utils.class_weight import compute_class_weight

    y = np.random.default_rng(0).permutation(np.repeat([0, 1, 2], [64, 27, 9]))
    spec = losses.resolve(LossConfig(class_weights="balanced"), SINGLE, NAMES, y)
    want = compute_class_weight("balanced", classes=np.arange(3), y=y)
    np.testing.assert_allclose(spec.class_weights, want, rtol=1e-12)
    assert spec.class_weights[2] == pytest.approx(100 / 27)  # 100 / (3 * 9)


def test_balanced_pos_weight_is_negatives_over_positives():
    y = np.zeros((40, 2), np.float32)
    y[:10, 0] = 1.0  # 10 positives, 30 negatives -> 3
    y[:32, 1] = 1.0  # 32 positives, 8 negatives -> 0.25
    spec = losses.resolve(LossConfig(pos_weight="balanced"), MULTI, ("a", "b"), y)
    assert spec.pos_weight == (3.0, 0.25)


def test_lists_mappings_and_numbers_resolve_in_label_order():
    y = np.array([0, 1, 2])
    assert losses.resolve(LossConfig(class_weights=[1.0, 2.0, 0.5]), SINGLE, NAMES, y).class_weights == (1, 2, .5)
    # A mapping names some labels; the others weigh 1 (scikit-learn's rule for a dict).
    assert losses.resolve(LossConfig(class_weights={"pos": 4.0}), SINGLE, NAMES, y).class_weights == (1, 1, 4)
    multi = np.eye(3, dtype=np.float32)
    assert losses.resolve(LossConfig(pos_weight=2.5), MULTI, NAMES, multi).pos_weight == (2.5, 2.5, 2.5)
    assert losses.resolve(LossConfig(pos_weight={"neg": 0.5}), MULTI, NAMES, multi).pos_weight == (0.5, 1, 1)
    assert losses.resolve(LossConfig(), SINGLE, NAMES, y) == LossSpec(SINGLE)
    assert losses.resolve(LossConfig(class_weights=None), SINGLE, NAMES, y) == LossSpec(SINGLE)
    # LossSpec is hashable: jax.jit takes it through functools.partial.
    assert hash(LossSpec(SINGLE, (1.0, 2.0, 0.5), None, 0.1)) == hash(LossSpec(SINGLE, (1.0, 2.0, 0.5), None, 0.1))


def test_describe_says_what_the_loss_uses():
    spec = losses.resolve(LossConfig(class_weights="balanced", label_smoothing=0.1), SINGLE, ("neg", "pos"),
                          np.array([0, 1, 1]))
    assert losses.describe(spec, ("neg", "pos")) == "loss: class weights neg 1.5000, pos 0.7500; label smoothing 0.1"
    assert losses.describe(LossSpec(MULTI, pos_weight=(3.0, 1.0)), ("a", "b")) == "loss: pos_weight a 3.0000, b 1.0000"
    assert losses.describe(LossSpec(SINGLE), ("neg", "pos")) is None


_SINGLE_Y = np.array([0, 0, 1])  # no example of "pos"
_MULTI_Y = np.array([[1, 0, 0], [1, 1, 0]], np.float32)  # no positive of "pos"
REFUSALS = {
    "class_weights_multi": (LossConfig(class_weights=[1.0, 1.0, 1.0]), MULTI, "loss.class_weights"),
    "class_weights_regression": (LossConfig(class_weights="balanced"), REGRESSION, "loss.class_weights"),
    "smoothing_multi": (LossConfig(label_smoothing=0.1), MULTI, "loss.label_smoothing"),
    "pos_weight_single": (LossConfig(pos_weight=2.0), SINGLE, "loss.pos_weight"),
    "pos_weight_regression": (LossConfig(pos_weight="balanced"), REGRESSION, "loss.pos_weight"),
    "negative": (LossConfig(class_weights=[1.0, -0.5, 1.0]), SINGLE, "loss.class_weights"),
    "nan": (LossConfig(class_weights=[1.0, float("nan"), 1.0]), SINGLE, "loss.class_weights"),
    "inf_mapping": (LossConfig(class_weights={"neg": float("inf")}), SINGLE, "loss.class_weights"),
    "all_zero": (LossConfig(class_weights=[0.0, 0.0, 0.0]), SINGLE, "loss.class_weights"),
    "wrong_length": (LossConfig(class_weights=[1.0, 2.0]), SINGLE, "loss.class_weights"),
    "unknown_name": (LossConfig(class_weights={"positive": 2.0}), SINGLE, "loss.class_weights"),
    "balanced_absent_class": (LossConfig(class_weights="balanced"), SINGLE, "loss.class_weights"),
    "pos_weight_negative": (LossConfig(pos_weight=-1.0), MULTI, "loss.pos_weight"),
    "pos_weight_wrong_length": (LossConfig(pos_weight=[1.0, 2.0, 3.0, 4.0]), MULTI, "loss.pos_weight"),
    "pos_weight_unknown_name": (LossConfig(pos_weight={"x": 2.0}), MULTI, "loss.pos_weight"),
    "pos_weight_balanced_absent": (LossConfig(pos_weight="balanced"), MULTI, "loss.pos_weight"),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_refusals_name_the_key_in_one_line(name):
    cfg, problem_type, key = REFUSALS[name]
    y = _MULTI_Y if problem_type == MULTI else _SINGLE_Y
    with pytest.raises(ConfigError) as e:
        losses.resolve(cfg, problem_type, NAMES, y)
    message = str(e.value)
    print(f"{name}: {message}")
    assert message.startswith(key) and "\n" not in message
