"""The sharded train step on 8 fake CPU devices: same numbers on every mesh, the layout the rules say, gradient
accumulation, bf16 compute over fp32 params, and a one-step golden loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxclf import sharding, steps, weights
from flaxclf.backbone import BertSpec
from flaxclf.config import MeshConfig, OptimConfig
from flaxclf.model import BertClassifier
from flaxclf.optim import make_optimizer
from flaxclf.vocab import SINGLE

NUM_LABELS, LENGTH, SEED = 4, 16, 0
MESHES = [(8, 1, 1), (2, 2, 2), (1, 4, 2)]  # (data, fsdp, tensor)


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


def _tx(total_steps: int = 3):
    # A large rate so that three steps move every trained parameter well beyond the 1e-5 tolerance.
    return make_optimizer(OptimConfig(learning_rate=1e-3, warmup_ratio=0.0), total_steps)


def _batch(rng: np.random.RandomState, size: int, vocab: int) -> dict[str, np.ndarray]:
    """Random tokens with ragged padding, and a few weight-0 (filler) rows spread unevenly over the batch."""
    lengths = rng.randint(3, LENGTH + 1, size)
    mask = (np.arange(LENGTH)[None, :] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask, rng.randint(1000, vocab, (size, LENGTH)), 0).astype(np.int32)
    ids[:, 0] = 101  # [CLS]
    weight = np.ones(size, np.float32)
    weight[[1, 2, size - 1]] = 0.0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids),
            "labels": rng.randint(0, NUM_LABELS, size).astype(np.int32), "weight": weight}


def _batches(n: int, size: int, vocab: int = 30522) -> list[dict[str, np.ndarray]]:
    rng = np.random.RandomState(1234)
    return [_batch(rng, size, vocab) for _ in range(n)]


@pytest.fixture(scope="module")
def host_params(tiny_model_dir):
    """The tiny checkpoint with a fresh 4-way head, as host numpy arrays (the same for every mesh)."""
    return weights.load_params(_model(tiny_model_dir), tiny_model_dir, jax.random.PRNGKey(SEED))


def _train(model, host, mesh, batches, accum_steps: int = 1, tx=None):
    """Runs one step per batch; returns (losses, final state, initial state's sharding specs)."""
    tx = tx or _tx()
    shardings = steps.state_shardings(steps.abstract_state(model, tx, jnp.float32), mesh)
    state = steps.create_state(host, tx, shardings, SEED)
    created = _specs(state)
    assert {x.sharding.mesh for x in jax.tree.leaves(state)} == {mesh}
    train, _ = steps.compile_steps(model, tx, SINGLE, accum_steps, mesh, shardings)
    batch_s = sharding.batch_sharding(mesh)
    losses = []
    for b in batches:
        placed = {k: jax.make_array_from_process_local_data(batch_s, v) for k, v in b.items()}
        state, m = train(state, placed)
        losses.append(float(m["loss"]))
    assert {x.sharding.mesh for x in jax.tree.leaves(state)} == {mesh}
    return np.array(losses), state, created


def _specs(state) -> dict[str, tuple]:
    """path -> (actual spec, spec the rules give) for every leaf of the TrainState; every leaf on the whole mesh."""
    out = {}
    for kp, x in jax.tree_util.tree_leaves_with_path(state):
        path, mesh = sharding.path_str(kp), x.sharding.mesh
        assert mesh.devices.size == len(x.sharding.device_set), path
        out[path] = (x.sharding.spec, sharding.spec_for(path, x.shape, mesh))
    return out


def _max_diff(a, b) -> float:
    diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)),
                                                   initial=0.0)), a, b)
    return max(jax.tree.leaves(diffs))


def _assert_trees_close(actual, expected, atol: float) -> None:
    flat_a = dict(jax.tree_util.tree_leaves_with_path(jax.device_get(actual)))
    flat_e = jax.tree_util.tree_leaves_with_path(jax.device_get(expected))
    for kp, e in flat_e:
        np.testing.assert_allclose(flat_a[kp], e, rtol=0, atol=atol, err_msg=sharding.path_str(kp))


@pytest.fixture(scope="module")
def single_device_run(tiny_model_dir, host_params):
    """Three dropout-on steps on one device: the reference every mesh must reproduce."""
    losses, state, _ = _train(_model(tiny_model_dir), host_params, _mesh((1, 1, 1)), _batches(3, 16))
    return losses, jax.device_get(state.params)


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_sharded_steps_equal_single_device(shape, tiny_model_dir, host_params, single_device_run):
    ref_losses, ref_params = single_device_run
    losses, state, created = _train(_model(tiny_model_dir), host_params, _mesh(shape), _batches(3, 16))
    print(f"mesh {shape}: loss diff {np.abs(losses - ref_losses).max():.2e}, "
          f"param diff {_max_diff(jax.device_get(state.params), ref_params):.2e}")
    np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=1e-5)
    _assert_trees_close(state.params, ref_params, atol=1e-5)
    # The parameters really moved, so agreeing to 1e-5 is not agreeing on doing nothing.
    assert _max_diff(ref_params, host_params) > 1e-3
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
    losses, state, _ = _train(_model(tiny_model_dir, dropout=False), host_params, _mesh((1, 1, 1)), _batches(3, 32))
    return losses, jax.device_get((state.params, state.opt_state))


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 2, 2)], ids=lambda s: "x".join(map(str, s)))
def test_grad_accumulation_equals_full_batch(shape, tiny_model_dir, host_params, no_dropout_run):
    """4 micro-batches of 8 == one batch of 32, filler rows included (dropout off: masks of different shapes
    can't agree)."""
    ref_losses, (ref_params, ref_opt) = no_dropout_run
    losses, state, _ = _train(_model(tiny_model_dir, dropout=False), host_params, _mesh(shape), _batches(3, 32),
                              accum_steps=4)
    print(f"accum on {shape}: loss diff {np.abs(losses - ref_losses).max():.2e}, "
          f"param diff {_max_diff(jax.device_get(state.params), ref_params):.2e}")
    np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=1e-5)
    _assert_trees_close(state.params, ref_params, atol=1e-5)
    _assert_trees_close(state.opt_state, ref_opt, atol=1e-5)


def test_bf16_compute_keeps_fp32_state_and_tracks_fp32_loss(tiny_model_dir, host_params, no_dropout_run):
    fp32_losses, _ = no_dropout_run
    model = _model(tiny_model_dir, dropout=False, dtype=jnp.bfloat16)
    bf16_losses, state, _ = _train(model, host_params, _mesh((2, 2, 2)), _batches(3, 32))
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
# (weights.load_params, PRNGKey(0)) on the first batch of _batches(3, 16), seed 0, dropout on, one device.
GOLDEN_LOSS = 1.3831373453140259


def test_one_step_golden_loss(single_device_run):
    loss = single_device_run[0][0]
    assert abs(loss - GOLDEN_LOSS) < 1e-6, (
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
    from flaxclf.model import ClassifierConfig, init_params

    model = BertClassifier(ClassifierConfig(backbone=FAMILY_SPECS[family], num_labels=NUM_LABELS,
                                            problem_type=SINGLE))
    host = jax.device_get(init_params(model, jax.random.PRNGKey(SEED)))
    ref_losses, ref_state, _ = _train(model, host, _mesh((1, 1, 1)), _batches(3, 16))
    losses, state, _ = _train(model, host, _mesh((2, 2, 2)), _batches(3, 16))
    np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=1e-5)
    _assert_trees_close(state.params, ref_state.params, atol=1e-5)
    assert _max_diff(jax.device_get(ref_state.params), host) > 1e-3


@pytest.mark.parametrize("remat", [False, True])
def test_modernbert_sharded_step_equals_single_device(remat):
    """ModernBERT (2 global and 2 local layers, a window shorter than the rows, every dropout on, biases on) on a
    (2, 2, 2) mesh: three steps give the single-device losses and parameters; with remat too (layers 1 and 2 as
    a checkpointed scan over stacked parameters, its dropout keys split from the step's)."""
    from flaxclf.model import ClassifierConfig, init_params, make_classifier
    from flaxclf.modernbert import ModernBertSpec

    spec = ModernBertSpec(vocab_size=30522, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                          num_attention_heads=4, global_attn_every_n_layers=2, local_attention=8,
                          max_position_embeddings=64, pad_token_id=0, norm_bias=True, attention_bias=True,
                          mlp_bias=True, classifier_bias=True, embedding_dropout=0.1, attention_dropout=0.1,
                          mlp_dropout=0.1)
    model = make_classifier(ClassifierConfig(backbone=spec, num_labels=NUM_LABELS, problem_type=SINGLE,
                                             classifier_dropout=0.1), remat=remat)
    host = jax.device_get(init_params(model, jax.random.PRNGKey(SEED)))
    ref_losses, ref_state, _ = _train(model, host, _mesh((1, 1, 1)), _batches(3, 16))
    losses, state, specs = _train(model, host, _mesh((2, 2, 2)), _batches(3, 16))
    np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=1e-5)
    _assert_trees_close(state.params, ref_state.params, atol=1e-5)
    assert _max_diff(jax.device_get(ref_state.params), host) > 1e-3
    assert specs["params/params/model/layers/1/attn/Wqkv/kernel"][0] == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert specs["params/params/model/layers/1/mlp/Wo/kernel"][0] == jax.sharding.PartitionSpec("tensor", "fsdp")
