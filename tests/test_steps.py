"""The sharded train step on 8 fake CPU devices: same numbers on every mesh, the layout the rules say, gradient
accumulation, bf16 compute over fp32 params, and a one-step golden loss."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxclf.config import MeshConfig, OptimConfig
from flaxclf.hf import weights
from flaxclf.models.bert import BertClassifier, BertSpec
from flaxclf.models.bert.families import decays as bert_decays
from flaxclf.models.registry import ENCODERS
from flaxclf.options import SINGLE
from flaxclf.runtime import sharding
from flaxclf.training import steps
from flaxclf.training.optim import make_optimizer
from tests.helpers import adamw_param_bound, f32_bound, query_of, random_batches

NUM_LABELS, LENGTH, SEED = 4, 16, 0
MESHES = [(8, 1, 1), (2, 2, 2), (1, 4, 2)]  # (data, fsdp, tensor)
LEARNING_RATE, STEPS = 1e-3, 3

# ---------------------------------------------------------------------------------------------- float32 bounds
# Two runs of the same steps (another mesh, accumulation) agree to float32's bound (tests/helpers.py derives
# f32_bound), not to the last bit. Every model here is tiny: width 32, feed-forward <= 64, 2 or 4 layers.
# - A layer's output depends on six matmuls in sequence: the query projection, the scores, the weighted values,
#   the output projection, the feed-forward's two (the softmax's and LayerNorms' sums are in f32_bound's
#   constant). The head adds at most three: an embedding projection, the pooler or dense layer, the classifier.
#   The loss adds its mean over the batch. The longest contraction of the forward is the feed-forward's, WIDTH.
# - The backward pass retraces that chain and ends in the weight gradients' sums over the batch's tokens.
# - An AdamW update, lr * m / (sqrt(v) + eps) (+ decay), is 17 roundings of its own (helpers.ADAMW_OPS). It
#   divides each element by that element's own gradient size sqrt(v): a gradient error d (the tensor's bound, at
#   its largest gradient) moves the update by up to ~2 d / sqrt(v) of lr, never by more than 2 lr. So the bound of
#   a parameter is elementwise, from the reference run's second moments after each step.
LAYER_DEPTH, HEAD_DEPTH, WIDTH = 6, 3, 64
B2, EPS = OptimConfig.b2, OptimConfig.eps

ALL_RULES = [rule for encoder in ENCODERS.values() for rule in encoder.sharding_rules]  # every encoder's


def forward_depth(layers: int) -> int:
    return LAYER_DEPTH * layers + HEAD_DEPTH


def grad_depth(layers: int) -> int:
    return 2 * forward_depth(layers) + 1


def loss_bound(layers: int, losses) -> float:
    """The loss of the same parameters on two meshes (or accumulated): the forward and the batch mean."""
    return f32_bound(forward_depth(layers) + 1, WIDTH, _max_abs(losses))


def param_bound(layers: int, tokens: int, nus: list[dict[str, np.ndarray]]):
    """Parameters after len(nus) AdamW steps, elementwise: helpers.adamw_param_bound."""
    def bound(path: str, ref: np.ndarray) -> np.ndarray:
        return adamw_param_bound(path, ref, nus, grad_depth(layers), tokens, LEARNING_RATE, B2, EPS)
    return bound


def opt_state_bound(layers: int, tokens: int):
    """Adam's moments after STEPS steps, per tensor at its largest magnitude (mu at the gradients', nu at their
    squares', a key bias's at its query bias's): the gradient's error and the moments' 4 ops per step."""
    def bound(path: str, ref: np.ndarray, by_path: dict[str, np.ndarray]) -> float:
        return f32_bound(grad_depth(layers) + 4 * STEPS, tokens, max(_max_abs(ref), _max_abs(
            by_path.get(query_of(path), 0.0))))
    return bound


def _max_abs(x) -> float:
    return float(np.max(np.abs(np.asarray(x, np.float64)), initial=0.0))


def _mesh(shape: tuple[int, int, int]) -> jax.sharding.Mesh:
    if shape == (1, 1, 1):
        return sharding.make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    return sharding.make_mesh(MeshConfig(*shape))


def _model(folder, dropout: bool = True, dtype=jnp.float32) -> BertClassifier:
    config = weights.classifier_config(folder, num_labels=NUM_LABELS, problem_type=SINGLE)
    if not dropout:
        spec = config.backbone
        backbone = BertSpec(**{**spec.__dict__, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0})
        config = config.replace(backbone=backbone, classifier_dropout=0.0)
    return BertClassifier(config, dtype=dtype)


def _tx(total_steps: int = STEPS):
    # A large rate so that three steps move every trained parameter far beyond the float32 bounds.
    return make_optimizer(OptimConfig(learning_rate=LEARNING_RATE, warmup_ratio=0.0), total_steps, bert_decays)


def _batches(n: int, size: int, vocab: int = 30522) -> list[dict[str, np.ndarray]]:
    """Random tokens with ragged padding, and a few weight-0 (filler) rows spread unevenly over each batch."""
    return random_batches(n, size, LENGTH, NUM_LABELS, vocab)


@pytest.fixture(scope="module")
def host_params(tiny_model_dir):
    """The tiny checkpoint with a fresh 4-way head, as host numpy arrays (the same for every mesh)."""
    return weights.load_params(_model(tiny_model_dir), tiny_model_dir, jax.random.PRNGKey(SEED))


def _train(model, host, mesh, batches, accum_steps: int = 1, tx=None):
    """Runs one step per batch; returns (losses, final state, initial state's sharding specs, Adam's second
    moment after each step by path)."""
    tx = tx or _tx()
    shardings = steps.state_shardings(steps.abstract_state(model, tx, jnp.float32), mesh, model)
    state = steps.create_state(host, tx, shardings, SEED, model.config.lora)
    created = _specs(state)
    assert {x.sharding.mesh for x in jax.tree.leaves(state)} == {mesh}
    train, _ = steps.compile_steps(model, tx, SINGLE, accum_steps, mesh, shardings)
    batch_s = sharding.batch_sharding(mesh)
    losses, nus = [], []
    for b in batches:
        placed = {k: jax.make_array_from_process_local_data(batch_s, v) for k, v in b.items()}
        state, m = train(state, placed)
        losses.append(float(m["loss"]))
        nus.append(_second_moment(state.opt_state))
    assert {x.sharding.mesh for x in jax.tree.leaves(state)} == {mesh}
    return np.array(losses), state, created, nus


def _second_moment(opt_state) -> dict[str, np.ndarray]:
    """Adam's nu on the host, by the params' paths."""
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    (adam,) = [x for x in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(x)]
    return {sharding.path_str(kp): np.asarray(x, np.float64)
            for kp, x in jax.tree_util.tree_leaves_with_path(jax.device_get(adam.nu))}


def _specs(state) -> dict[str, tuple]:
    """path -> (actual spec, spec the rules give) for every leaf of the TrainState; every leaf on the whole mesh."""
    out = {}
    for kp, x in jax.tree_util.tree_leaves_with_path(state):
        path, mesh = sharding.path_str(kp), x.sharding.mesh
        assert mesh.devices.size == len(x.sharding.device_set), path
        out[path] = (x.sharding.spec, sharding.spec_for(path, x.shape, mesh, ALL_RULES))
    return out


def _max_diff(a, b) -> float:
    diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)),
                                                   initial=0.0)), a, b)
    return max(jax.tree.leaves(diffs))


def _assert_trees_close(actual, expected, bound) -> str:
    """Every leaf within bound(path, expected leaf, every expected leaf by path) (a number or elementwise); says
    the largest difference, the bounds' range and the worst difference / bound."""
    flat_a = dict(jax.tree_util.tree_leaves_with_path(jax.device_get(actual)))
    flat_e = jax.tree_util.tree_leaves_with_path(jax.device_get(expected))
    by_path = {sharding.path_str(kp): np.asarray(e, np.float64) for kp, e in flat_e}
    diffs, limits, worst = [], [], 0.0
    for kp, _ in flat_e:
        path = sharding.path_str(kp)
        limit = bound(path, by_path[path], by_path)
        diff = np.abs(np.asarray(flat_a[kp], np.float64) - by_path[path])
        assert np.all(diff <= limit), (path, _max_abs(diff), _max_abs(limit))
        diffs.append(_max_abs(diff))
        limits += [float(np.min(limit, initial=np.inf)), _max_abs(limit)]
        worst = max(worst, float(np.max(np.where(limit > 0, diff / np.maximum(limit, 1e-300), 0.0), initial=0.0)))
    return f"max diff {max(diffs):.2g}, bounds {min(limits):.2g}..{max(limits):.2g}, worst diff/bound {worst:.2g}"


def _assert_same_run(label: str, layers: int, tokens: int, ref_run, losses, params) -> None:
    """Two runs of the same steps (another mesh, accumulation): the same losses and parameters, to float32.
    ref_run: the reference's (losses, params, second moments after each step)."""
    ref_losses, ref_params, nus = ref_run
    loss_diff, loss_limit = float(np.abs(losses - ref_losses).max()), loss_bound(layers, ref_losses)
    bound = param_bound(layers, tokens, nus)
    print(f"\n{label}: loss diff {loss_diff:.2g} (bound {loss_limit:.2g}); params "
          f"{_assert_trees_close(params, ref_params, lambda path, ref, _: bound(path, ref))}")
    assert loss_diff <= loss_limit


@pytest.fixture(scope="module")
def single_device_run(tiny_model_dir, host_params):
    """Three dropout-on steps on one device: the reference every mesh must reproduce: (losses, params, Adam's
    second moment after each step)."""
    losses, state, _, nus = _train(_model(tiny_model_dir), host_params, _mesh((1, 1, 1)), _batches(3, 16))
    return losses, jax.device_get(state.params), nus


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_sharded_steps_equal_single_device(shape, tiny_model_dir, host_params, single_device_run):
    losses, state, created, _ = _train(_model(tiny_model_dir), host_params, _mesh(shape), _batches(3, 16))
    _assert_same_run(f"mesh {shape}", 2, 16 * LENGTH, single_device_run, losses, state.params)
    # The parameters really moved, so agreeing to float32 is not agreeing on doing nothing.
    assert _max_diff(single_device_run[1], host_params) > 1e-3
    # Every leaf of the state (params, Adam's mu/nu, count, step, rng) sits where the rules put it, both as
    # create_state builds it and as the step's out_shardings hand it back.
    for when, specs in (("created", created), ("after 3 steps", _specs(state))):
        wrong = {p: s for p, s in specs.items() if s[0] != s[1]}
        assert not wrong, f"{when}: leaves off their rule's sharding (actual, rule): {wrong}"
    if shape != (8, 1, 1):  # something is split over fsdp/tensor, in params and in both Adam moments
        sharded = [p for p, (s, _) in _specs(state).items() if s != jax.sharding.PartitionSpec()]
        for part in ("params/params/", "/mu/", "/nu/"):
            assert any(part in p and "query/kernel" in p for p in sharded), (part, sharded)


@pytest.fixture(scope="module")
def no_dropout_run(tiny_model_dir, host_params):
    """Three dropout-off fp32 steps on batches of 32 on one device: the reference for accumulation and bf16."""
    losses, state, _, nus = _train(_model(tiny_model_dir, dropout=False), host_params, _mesh((1, 1, 1)),
                                   _batches(3, 32))
    return (losses, jax.device_get(state.params), nus), jax.device_get(state.opt_state)


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 2, 2)], ids=lambda s: "x".join(map(str, s)))
def test_grad_accumulation_equals_full_batch(shape, tiny_model_dir, host_params, no_dropout_run):
    """4 micro-batches of 8 == one batch of 32, filler rows included (dropout off: masks of different shapes
    can't agree)."""
    ref_run, ref_opt = no_dropout_run
    losses, state, _, _ = _train(_model(tiny_model_dir, dropout=False), host_params, _mesh(shape), _batches(3, 32),
                                 accum_steps=4)
    _assert_same_run(f"accum on {shape}", 2, 32 * LENGTH, ref_run, losses, state.params)
    print(f"Adam's moments: {_assert_trees_close(state.opt_state, ref_opt, opt_state_bound(2, 32 * LENGTH))}")


def test_bf16_compute_keeps_fp32_state_and_tracks_fp32_loss(tiny_model_dir, host_params, no_dropout_run):
    fp32_losses = no_dropout_run[0][0]
    model = _model(tiny_model_dir, dropout=False, dtype=jnp.bfloat16)
    bf16_losses, state, _, _ = _train(model, host_params, _mesh((2, 2, 2)), _batches(3, 32))
    gap = np.abs(bf16_losses - fp32_losses).max()
    print(f"bf16 vs fp32 losses {bf16_losses} vs {fp32_losses}: max gap {gap:.2e}")
    floats = [x for x in jax.tree.leaves((state.params, state.opt_state)) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert {x.dtype for x in floats} == {jnp.dtype(jnp.float32)}, "params or Adam moments are not float32"
    # bf16 keeps 8 significant bits: each op rounds with a relative error up to 2^-8 ~ 4e-3. The fresh head
    # (std 0.02) keeps the logits near 0.05, so the loss is ln(4) plus a term of that size, and bf16 moves it by
    # ~4e-3 of that term, ~1e-4 at most (measured 1e-5 to 4e-5 on the tiny model). 5e-4 leaves room for that and
    # still fails when fp32 params get downcast or the loss itself is taken in bf16 (ln(4) alone rounds by up to
    # 4e-3 there). The lower bound shows bf16 was really used: meshes differ in fp32 by ~1e-7 only.
    assert 1e-6 < gap < 5e-4
    assert np.all(np.isfinite(bf16_losses))


# nanodo-style golden value: step 1's loss of the tiny model (tests/conftest.py) with a fresh 4-way head
# (weights.load_params, PRNGKey(0)) on the first batch of _batches(3, 16), seed 0, dropout on, one device. Recorded
# on one machine: another computes it to float32's bound, not to its last bits.
GOLDEN_LOSS = 1.3831373453140259


def test_one_step_golden_loss(single_device_run):
    loss = single_device_run[0][0]
    print(f"\ngolden loss: diff {abs(loss - GOLDEN_LOSS):.2g}, bound {loss_bound(2, GOLDEN_LOSS):.2g}")
    assert abs(loss - GOLDEN_LOSS) <= loss_bound(2, GOLDEN_LOSS), (
        f"step 1 loss is {loss!r}, recorded {GOLDEN_LOSS!r}. Update GOLDEN_LOSS only when the model's init "
        "(tests/conftest.py tiny_model_dir, weights.load_params' head init), the batch (_batches) or the "
        "loss/dropout math was changed on purpose; otherwise this is a regression in the step.")


_FAMILY_SHAPE = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=66, pad_token_id=0)
FAMILY_SPECS = {
    "roberta": BertSpec(**_FAMILY_SHAPE, model_type="roberta", type_vocab_size=1),
    "electra": BertSpec(**_FAMILY_SHAPE, model_type="electra", embedding_size=16),
    "distilbert": BertSpec(**_FAMILY_SHAPE, model_type="distilbert", type_vocab_size=0),
    "albert": BertSpec(**{**_FAMILY_SHAPE, "num_hidden_layers": 4}, model_type="albert", embedding_size=16,
                       num_hidden_groups=2, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1),
}


@pytest.mark.parametrize("family", list(FAMILY_SPECS))
def test_each_family_sharded_step_equals_single_device(family):
    """Three dropout-on steps of each family on a (2, 2, 2) mesh: the single-device losses and parameters."""
    from flaxclf.models.classifier import ClassifierConfig, init_params

    model = BertClassifier(ClassifierConfig(backbone=FAMILY_SPECS[family], num_labels=NUM_LABELS,
                                            problem_type=SINGLE))
    host = jax.device_get(init_params(model, jax.random.PRNGKey(SEED)))
    ref_losses, ref_state, _, nus = _train(model, host, _mesh((1, 1, 1)), _batches(3, 16))
    losses, state, _, _ = _train(model, host, _mesh((2, 2, 2)), _batches(3, 16))
    _assert_same_run(family, FAMILY_SPECS[family].num_hidden_layers, 16 * LENGTH,
                     (ref_losses, ref_state.params, nus), losses, state.params)
    assert _max_diff(jax.device_get(ref_state.params), host) > 1e-3


@pytest.mark.parametrize("remat", [False, True])
def test_modernbert_sharded_step_equals_single_device(remat):
    """ModernBERT (2 global and 2 local layers, a window shorter than the rows, every dropout on, biases on) on a
    (2, 2, 2) mesh: three steps give the single-device losses and parameters; with remat too (layers 1 and 2 as
    a checkpointed scan over stacked parameters, its dropout keys split from the step's)."""
    from flaxclf.models.classifier import ClassifierConfig, init_params, make_classifier
    from flaxclf.models.modernbert import ModernBertSpec

    spec = ModernBertSpec(vocab_size=30522, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                          num_attention_heads=4, global_attn_every_n_layers=2, local_attention=8,
                          max_position_embeddings=64, pad_token_id=0, norm_bias=True, attention_bias=True,
                          mlp_bias=True, classifier_bias=True, embedding_dropout=0.1, attention_dropout=0.1,
                          mlp_dropout=0.1)
    model = make_classifier(ClassifierConfig(backbone=spec, num_labels=NUM_LABELS, problem_type=SINGLE,
                                             classifier_dropout=0.1), remat=remat)
    host = jax.device_get(init_params(model, jax.random.PRNGKey(SEED)))
    ref_losses, ref_state, _, nus = _train(model, host, _mesh((1, 1, 1)), _batches(3, 16))
    losses, state, specs, _ = _train(model, host, _mesh((2, 2, 2)), _batches(3, 16))
    _assert_same_run(f"modernbert remat={remat}", spec.num_hidden_layers, 16 * LENGTH,
                     (ref_losses, ref_state.params, nus), losses, state.params)
    assert _max_diff(jax.device_get(ref_state.params), host) > 1e-3
    assert specs["params/params/model/layers/1/attn/Wqkv/kernel"][0] == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert specs["params/params/model/layers/1/mlp/Wo/kernel"][0] == jax.sharding.PartitionSpec("tensor", "fsdp")


@pytest.mark.parametrize("remat", [False, True])
def test_deberta_sharded_step_equals_single_device(remat):
    """DeBERTa-v2 (c2p and p2c with their own projections, 4 log buckets a side up to 8, absolute positions and
    token types, every dropout on: the relative table's and the pooler's too) on a (2, 2, 2) mesh: three steps
    give the single-device losses and parameters, with remat and without; the relative projections split on
    "tensor" as the query's does."""
    from flaxclf.models.classifier import ClassifierConfig, init_params, make_classifier
    from flaxclf.models.deberta import DebertaV2Spec

    spec = DebertaV2Spec(**{**_FAMILY_SHAPE, "max_position_embeddings": 64}, relative_attention=True,
                         pos_att_type=("c2p", "p2c"), position_buckets=4, max_relative_positions=8,
                         type_vocab_size=2, pooler_dropout=0.1)
    model = make_classifier(ClassifierConfig(backbone=spec, num_labels=NUM_LABELS, problem_type=SINGLE,
                                             classifier_dropout=0.1), remat=remat)
    host = jax.device_get(init_params(model, jax.random.PRNGKey(SEED)))
    ref_losses, ref_state, _, nus = _train(model, host, _mesh((1, 1, 1)), _batches(3, 16))
    losses, state, specs, _ = _train(model, host, _mesh((2, 2, 2)), _batches(3, 16))
    _assert_same_run(f"deberta remat={remat}", spec.num_hidden_layers, 16 * LENGTH,
                     (ref_losses, ref_state.params, nus), losses, state.params)
    assert _max_diff(jax.device_get(ref_state.params), host) > 1e-3
    layer = "params/params/deberta/encoder/layer/1/attention/self"
    assert specs[f"{layer}/pos_key_proj/kernel"][0] == jax.sharding.PartitionSpec("fsdp", "tensor")
