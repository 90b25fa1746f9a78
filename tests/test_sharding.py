"""Mesh creation and param-path sharding rules on 8 fake CPU devices."""

import functools

import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import PartitionSpec as P

from flaxclf.config import MeshConfig
from flaxclf.models.bert import BertClassifier, BertSpec
from flaxclf.models.bert.families import SHARDING_RULES as RULES
from flaxclf.models.classifier import ClassifierConfig
from flaxclf.runtime.sharding import (
    batch_sharding,
    make_mesh,
    param_specs,
    path_str,
    replicated,
    tree_shardings,
)

SMALL = BertSpec(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, max_position_embeddings=64)


def _init(model, rng):
    ids = jnp.ones((2, 8), jnp.int32)
    return model.init(rng, ids, jnp.ones_like(ids), jnp.zeros_like(ids))


@pytest.fixture(scope="module")
def model():
    return BertClassifier(ClassifierConfig(backbone=SMALL, num_labels=3))


@pytest.fixture(scope="module")
def abstract_params(model):
    return jax.eval_shape(functools.partial(_init, model), jax.random.key(0))


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))


def _flat(tree) -> dict[str, P]:
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: isinstance(x, P))
    return {path_str(kp): v for kp, v in leaves}


# The layout NOTES.md measured to give the single-device loss and grad norm.
EXPECTED = {
    "params/bert/embeddings/word_embeddings/embedding": P(None, "fsdp"),
    "params/bert/encoder/layer/0/attention/self/query/kernel": P("fsdp", "tensor"),
    "params/bert/encoder/layer/1/attention/self/key/kernel": P("fsdp", "tensor"),
    "params/bert/encoder/layer/0/attention/self/value/kernel": P("fsdp", "tensor"),
    "params/bert/encoder/layer/0/attention/self/value/bias": P("tensor"),
    "params/bert/encoder/layer/1/intermediate/dense/kernel": P("fsdp", "tensor"),
    "params/bert/encoder/layer/1/intermediate/dense/bias": P("tensor"),
    "params/bert/encoder/layer/0/attention/output/dense/kernel": P("tensor", "fsdp"),
    "params/bert/encoder/layer/1/output/dense/kernel": P("tensor", "fsdp"),
}


def test_rules_give_the_measured_layout(abstract_params, mesh):
    specs = _flat(param_specs(abstract_params, mesh, RULES))
    for path, spec in EXPECTED.items():
        assert specs[path] == spec, path
    assert specs["params/bert/encoder/layer/0/output/dense/bias"] == P()
    assert specs["params/bert/encoder/layer/0/output/LayerNorm/scale"] == P()
    assert specs["params/bert/embeddings/position_embeddings/embedding"] == P(None, "fsdp")
    assert specs["params/pooler/dense/kernel"] == P("fsdp")
    assert specs["params/classifier/kernel"] == P()
    # Per layer: q/k/v kernels and biases, intermediate kernel and bias, two output kernels; plus the word and
    # position embeddings and the pooler's kernel.
    assert sum(s != P() for s in specs.values()) == 10 * SMALL.num_hidden_layers + 3


def test_axis_that_does_not_divide_is_dropped(mesh):
    sds = jax.ShapeDtypeStruct
    tree = {"params": {"bert": {
        "embeddings": {"word_embeddings": {"embedding": sds((30522, 31), jnp.float32)}},
        "encoder": {"layer": {"0": {"attention": {"self": {"query": {"kernel": sds((31, 32), jnp.float32),
                                                                     "bias": sds((33,), jnp.float32)}}}}}},
    }}}
    specs = _flat(param_specs(tree, mesh, RULES))
    assert specs["params/bert/embeddings/word_embeddings/embedding"] == P()
    assert specs["params/bert/encoder/layer/0/attention/self/query/kernel"] == P(None, "tensor")
    assert specs["params/bert/encoder/layer/0/attention/self/query/bias"] == P()


def test_multi_axis_entry_keeps_the_axes_that_divide(mesh):
    tree = {"x": jax.ShapeDtypeStruct((6, 4), jnp.float32)}
    rules = [(r"^x$", P(("data", "fsdp", "tensor"), ("fsdp", "tensor")))]
    # 6 splits over data (2) but not also over fsdp (4 total); tensor then fails too.
    assert param_specs(tree, mesh, rules)["x"] == P("data", ("fsdp", "tensor"))


def test_optimizer_state_gets_the_param_specs(abstract_params, mesh):
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=0.01))
    opt_state = jax.eval_shape(tx.init, abstract_params)
    param_flat = _flat(param_specs(abstract_params, mesh, RULES))
    opt_flat = _flat(param_specs(opt_state, mesh, RULES))
    for moment in ("mu", "nu"):
        moved = {p.split(f"/{moment}/", 1)[1]: s for p, s in opt_flat.items() if f"/{moment}/" in p}
        assert moved == param_flat
    assert opt_flat["1/0/count"] == P()


def test_jit_out_shardings_place_leaves_as_specified(model, abstract_params, mesh):
    shardings = tree_shardings(abstract_params, mesh, RULES)
    params = jax.jit(functools.partial(_init, model), out_shardings=shardings)(jax.random.key(0))
    q = params["params"]["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"]
    assert q.sharding.spec == P("fsdp", "tensor")
    assert {s.data.shape for s in q.addressable_shards} == {(16, 16)}
    emb = params["params"]["bert"]["embeddings"]["word_embeddings"]["embedding"]
    assert {s.data.shape for s in emb.addressable_shards} == {(30522, 16)}
    for kp, leaf in jax.tree_util.tree_leaves_with_path(params):
        assert leaf.sharding.is_equivalent_to(_sharding_at(shardings, kp), leaf.ndim), path_str(kp)


def _sharding_at(tree, key_path):
    for k in key_path:
        tree = tree[k.key]
    return tree


def test_make_mesh_resolves_minus_one():
    mesh = make_mesh(MeshConfig(data=-1, fsdp=2, tensor=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1)).shape["fsdp"] == 8
    assert make_mesh(MeshConfig()).shape["data"] == 8


def test_make_mesh_on_a_subset_of_devices():
    devices = jax.devices()[4:]
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=-1), devices=devices)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 2}
    assert set(mesh.devices.flat) == set(devices)


@pytest.mark.parametrize("cfg", [MeshConfig(data=3, fsdp=1, tensor=1), MeshConfig(data=-1, fsdp=3, tensor=1),
                                 MeshConfig(data=2, fsdp=2, tensor=4)])
def test_make_mesh_rejects_sizes_that_do_not_fit(cfg):
    with pytest.raises(ValueError, match="do not multiply to the 8 available devices"):
        make_mesh(cfg)


def test_batch_and_replicated_shardings(mesh):
    x = jax.device_put(jnp.arange(16.0).reshape(8, 2), batch_sharding(mesh))
    # 4 batch shards (data x fsdp), each repeated over the 2 tensor devices.
    assert {s.data.shape for s in x.addressable_shards} == {(2, 2)}
    y = jax.device_put(jnp.ones(3), replicated(mesh))
    assert y.sharding.is_fully_replicated
