"""The classifier against PyTorch's BertForSequenceClassification: logits, losses, and what feeds the head."""

import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from flaxclf.hf.weights import from_pretrained
from flaxclf.models.bert import BertClassifier
from flaxclf.models.classifier import ClassifierConfig, init_params
from flaxclf.options import MULTI, REGRESSION, SINGLE
from flaxclf.training import losses
from tests.helpers import f32_bound
from tests.torch_ref import (
    IMPLS,
    TINY,
    batch,
    needs_hf_flax,
    needs_torch,
    saved_classifier,
    saved_torch_classifier,
    torch_logits,
)

# ---------------------------------------------------------------------------------------------- float32 bounds
# Two float32 computations of one function agree to f32_bound (tests/helpers.py derives it), with:
# - depth: a layer's output depends on six matmuls in sequence (the query projection, the scores, the weighted
#   values, the output projection, the feed-forward's two; the softmax's and LayerNorms' sums are in f32_bound's
#   constant); the head adds two (the pooler, the classifier), a loss two (its per-row terms, the batch mean).
#   The backward pass retraces the chain and ends in the weight gradients' sums over the batch's tokens.
# - n: the longest contraction: the feed-forward's width (48), and the batch's 4 x 12 tokens (48).
# - scale: the largest magnitude of what is compared; a loss's terms are at the logits' magnitude (log-sum-exps
#   minus logits) or at the loss's own (squared residuals).
FORWARD_DEPTH = 6 * TINY["num_hidden_layers"] + 2
LOSS_DEPTH, WIDTH = 2, 48
# The issue's goal for the logits of a checkpoint loaded from PyTorch, kept as it stands: it is above float32's
# rounding (measured <= 2e-6) and below f32_bound for these depths.
LOGITS_GOAL = 1e-5


def _max_abs(x) -> float:
    return float(np.max(np.abs(np.asarray(x, np.float64)), initial=0.0))


@pytest.mark.hf
@pytest.mark.parametrize("impl", IMPLS)
def test_parity_small_random_config(tmp_path, impl):
    ref = saved_torch_classifier(tmp_path)
    model, params = from_pretrained(str(tmp_path), impl=impl)
    b = batch(TINY["vocab_size"])
    got = np.asarray(model.apply(params, **{k: jnp.asarray(v) for k, v in b.items()}))
    want, _ = torch_logits(ref, b)
    assert np.abs(want).max() > 0.1  # a head that really moves the logits
    print(f"\ntiny {impl}: logits max abs diff {_max_abs(got - want):.2g} (goal {LOGITS_GOAL:g})")
    np.testing.assert_allclose(got, want, rtol=0, atol=LOGITS_GOAL)


@pytest.mark.hf
@pytest.mark.parametrize("impl", IMPLS)
def test_parity_real_minilm_with_padding_and_segments(minilm_dir, tmp_path, impl):
    torch = needs_torch()
    import transformers

    ref = transformers.BertForSequenceClassification.from_pretrained(minilm_dir, num_labels=4).eval()
    with torch.no_grad():
        ref.classifier.weight.normal_(0, 0.5)
    ref.save_pretrained(tmp_path)
    model, params = from_pretrained(str(tmp_path), impl=impl)
    b = batch(30522, b=4, length=24, seed=1)
    got = np.asarray(model.apply(params, **{k: jnp.asarray(v) for k, v in b.items()}))
    want, _ = torch_logits(ref, b)
    assert np.abs(want).max() > 0.1
    print(f"\nMiniLM {impl}: logits max abs diff {_max_abs(got - want):.2g} (goal {LOGITS_GOAL:g})")
    np.testing.assert_allclose(got, want, rtol=0, atol=LOGITS_GOAL)


@pytest.mark.hf
@pytest.mark.parametrize("problem_type,num_labels", [(SINGLE, 3), (MULTI, 3), (REGRESSION, 1)])
def test_loss_parity_with_pytorch(tmp_path, problem_type, num_labels):
    ref = saved_torch_classifier(tmp_path, num_labels=num_labels, problem_type=problem_type)
    model, params = from_pretrained(str(tmp_path))
    b = batch(TINY["vocab_size"])
    rng = np.random.default_rng(3)
    labels = {SINGLE: rng.integers(0, 3, 4), MULTI: rng.integers(0, 2, (4, 3)).astype(np.float32),
              REGRESSION: rng.normal(size=4).astype(np.float32)}[problem_type]
    want_logits, want = torch_logits(ref, b, labels)
    logits = model.apply(params, **{k: jnp.asarray(v) for k, v in b.items()})
    got = float(losses.loss(problem_type, logits, jnp.asarray(labels)))
    scale = max(_max_abs(want_logits), abs(want))
    bound = f32_bound(FORWARD_DEPTH + LOSS_DEPTH, WIDTH, scale)
    print(f"\n{problem_type}: loss diff {abs(got - want):.2g} (bound {bound:.2g})")
    assert abs(got - want) <= bound
    # Padded examples (weight 0) leave the loss as it was, whatever their labels and logits: the loss's own ops
    # over the 6 rows' terms.
    pad_logits = jnp.concatenate([logits, 100.0 * jnp.ones_like(logits[:2])])
    pad_labels = jnp.concatenate([jnp.asarray(labels), jnp.asarray(labels[:2])])
    weight = jnp.array([1.0] * 4 + [0.0] * 2)
    padded = float(losses.loss(problem_type, pad_logits, pad_labels, weight))
    print(f"with padded rows: diff {abs(padded - got):.2g} (bound {f32_bound(LOSS_DEPTH, 6 * num_labels, scale):.2g})")
    assert abs(padded - got) <= f32_bound(LOSS_DEPTH, 6 * num_labels, scale)


def test_problem_type_inferred_as_pytorch_does():
    assert losses.infer_problem_type(1, np.array([0.5])) == REGRESSION
    assert losses.infer_problem_type(3, np.array([0, 2])) == SINGLE
    assert losses.infer_problem_type(3, np.array([[0.0, 1.0, 1.0]])) == MULTI


def _tiny_classifier(pooling):
    from flaxclf.models.bert import BertSpec

    cfg = ClassifierConfig(backbone=BertSpec(**TINY), num_labels=3, pooling=pooling)
    model = BertClassifier(cfg)
    params = init_params(model, jax.random.PRNGKey(0))
    # A large head so that any influence shows far above float noise.
    params = jax.tree.map(lambda x: x * 20 if x.ndim == 2 and x.shape[-1] == 3 else x, params)
    return model, params


def test_cls_pooler_classifies_on_position_zero_only():
    model, params = _tiny_classifier("cls_pooler")
    b = {k: jnp.asarray(v) for k, v in batch(TINY["vocab_size"]).items()}
    hidden = model.apply(params, **b, method="encode")
    base = model.apply(params, hidden, b["attention_mask"], method="classify")
    noise = jax.random.normal(jax.random.PRNGKey(1), hidden.shape)
    off_zero = hidden.at[:, 1:].add(noise[:, 1:])
    at_zero = hidden.at[:, 0].add(noise[:, 0])
    assert np.array_equal(model.apply(params, off_zero, b["attention_mask"], method="classify"), base)
    moved = model.apply(params, at_zero, b["attention_mask"], method="classify")
    assert np.abs(np.asarray(moved - base)).min() > 1e-3


@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_masked_poolings_ignore_padding(pooling):
    model, params = _tiny_classifier(pooling)
    b = {k: jnp.asarray(v) for k, v in batch(TINY["vocab_size"]).items()}
    hidden = model.apply(params, **b, method="encode")
    base = model.apply(params, hidden, b["attention_mask"], method="classify")
    pad = (b["attention_mask"] == 0)[..., None]
    shaken = jnp.where(pad, hidden + 1e3, hidden)
    np.testing.assert_array_equal(model.apply(params, shaken, b["attention_mask"], method="classify"), base)
    real = jnp.where(pad, hidden, hidden + 1.0)
    moved = model.apply(params, real, b["attention_mask"], method="classify")
    assert np.abs(np.asarray(moved - base)).max() > 1e-3


def test_pooler_params_exist_only_where_used():
    for pooling, has in [("cls_pooler", True), ("cls", False), ("mean", False), ("max", False)]:
        _, params = _tiny_classifier(pooling)
        assert ("pooler" in params["params"]) is has


def test_bf16_compute_keeps_fp32_params_and_fp32_logits(tmp_path):
    saved_classifier(tmp_path)
    model, params = from_pretrained(str(tmp_path), dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    b = {k: jnp.asarray(v) for k, v in batch(TINY["vocab_size"]).items()}
    logits = model.apply(params, **b)
    ref_model, _ = from_pretrained(str(tmp_path))
    assert logits.dtype == jnp.float32
    # bf16 has an 8-bit mantissa; over two tiny layers the logits stay within a few hundredths.
    np.testing.assert_allclose(logits, ref_model.apply(params, **b), atol=5e-2)


def test_remat_gives_the_same_gradients(tmp_path):
    saved_classifier(tmp_path)
    b = {k: jnp.asarray(v) for k, v in batch(TINY["vocab_size"]).items()}

    def grads(remat):
        model, params = from_pretrained(str(tmp_path), remat=remat)
        return flatten_dict(jax.grad(lambda p: model.apply(p, **b).sum())(params), sep="/")

    # The logits' sum's gradients, per tensor at its largest (a key bias, whose exact gradient is 0 as softmax
    # ignores a constant added to every score, at its query bias's: the rounding of its cancelling terms).
    plain, remat = grads(False), grads(True)
    worst = 0.0
    for path, a in plain.items():
        scale = max(_max_abs(a), _max_abs(plain[path.replace("key/bias", "query/bias")]))
        diff, bound = _max_abs(a - remat[path]), f32_bound(2 * FORWARD_DEPTH + 2, WIDTH, scale)
        assert diff <= bound, (path, diff, bound)
        worst = max(worst, diff / bound)
    print(f"\nremat: gradients worst diff / bound {worst:.2g}")


def test_importing_flaxclf_leaves_the_process_alone():
    """No transformers, no torch, no environment variable set: importing a library must not change a process."""
    code = ("import os, sys; before = dict(os.environ); import flaxclf, flaxclf.cli, flaxclf.training.loop, "
            "flaxclf.inference.predict; print('transformers' in sys.modules, 'torch' in sys.modules, "
            "dict(os.environ) == before)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False True"


@pytest.mark.hf
@needs_hf_flax
def test_pooler_equals_transformers_flax_pooler():
    """flaxclf's pooler has FlaxBertPooler's parameter names, initial values and output."""
    from transformers.models.bert.modeling_flax_bert import FlaxBertPooler

    from flaxclf.models.bert import BertSpec
    from flaxclf.models.bert.classifier import Pooler

    spec = BertSpec(**TINY)
    h = jax.random.normal(jax.random.PRNGKey(1), (3, 5, spec.hidden_size))
    ours, theirs = Pooler(spec.hidden_size, spec.initializer_range), FlaxBertPooler(spec.to_hf_config())
    p_ours, p_theirs = ours.init(jax.random.PRNGKey(0), h[:, 0]), theirs.init(jax.random.PRNGKey(0), h)
    assert jax.tree.map(np.shape, p_ours) == jax.tree.map(np.shape, p_theirs)
    for a, b in zip(jax.tree.leaves(p_ours), jax.tree.leaves(p_theirs), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ours.apply(p_ours, h[:, 0]), theirs.apply(p_theirs, h))


@pytest.mark.hf
def test_config_json_reads_as_transformers_reads_it(tmp_path):
    """config.json -> ClassifierConfig without transformers, equal to the path through transformers.BertConfig,
    fields left out included (they take BertConfig's defaults); and back to a config.json transformers reads."""
    import transformers

    from flaxclf.hf.config import read_hf_config
    from flaxclf.models.bert import BertSpec

    hf = transformers.BertConfig(**TINY, id2label={0: "neg", 1: "pos", 2: "mid"}, problem_type=SINGLE)
    hf.save_pretrained(tmp_path)
    ours = ClassifierConfig.from_hf(read_hf_config(tmp_path))
    assert ours.backbone == BertSpec(**{k: getattr(hf, k) for k in BertSpec.__dataclass_fields__ if hasattr(hf, k)})
    assert (ours.num_labels, ours.label_names, ours.problem_type) == (3, ("neg", "pos", "mid"), SINGLE)
    (tmp_path / "config.json").write_text('{"model_type": "bert", "hidden_size": 32}')
    sparse = ClassifierConfig.from_hf(read_hf_config(tmp_path))
    default = transformers.BertConfig(hidden_size=32)
    assert sparse.backbone == BertSpec(**{k: getattr(default, k) for k in BertSpec.__dataclass_fields__
                                          if hasattr(default, k)})
    assert sparse.num_labels == default.num_labels == 2
    back = transformers.BertConfig.from_dict(ours.to_hf())
    assert back.id2label == {0: "neg", 1: "pos", 2: "mid"} and back.label2id["mid"] == 2 and back.num_labels == 3
    assert ClassifierConfig.from_hf(ours.to_hf()) == ours


def test_impl_hf_is_refused_in_one_sentence_under_transformers_5(monkeypatch):
    from flaxclf import options as backbone
    from flaxclf.config import ConfigError, load_config
    from flaxclf.models.bert.hf_flax import hf_flax_bert_module

    monkeypatch.setattr(backbone, "transformers_version", lambda: "5.23.0")
    with pytest.raises(ConfigError, match=r"^model.impl=hf needs transformers 4.x \(Flax was removed in v5.0\) "
                                          r"but 5.23.0 is installed; use model.impl=fast"):
        load_config(None, ["model.impl=hf"])
    with pytest.raises(ImportError, match="5.23.0 is installed"):
        hf_flax_bert_module()


@pytest.mark.hf
def test_impl_hf_is_refused_by_the_command_under_the_installed_transformers_5(tmp_path):
    """The real refusal, under the transformers this environment has: one line, the version named, exit 2."""
    from flaxclf.options import transformers_version

    version = transformers_version()
    if version is None or int(version.split(".")[0]) < 5:
        pytest.skip(f"transformers {version} has Flax BERT: test_parity_* compares impl=hf against PyTorch here")
    from tests.helpers import flaxclf

    out = flaxclf("train", "--config", "configs/tiny.yaml", f"train.output_dir={tmp_path / 'run'}", "model.impl=hf")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"flaxclf train: error: model.impl=hf needs transformers 4.x (Flax was removed in v5.0) but {version} is "
        "installed; use model.impl=fast, or pip install 'transformers<5'"]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key", [jax.random.PRNGKey(0), jax.random.fold_in(jax.random.PRNGKey(7), 3),
                                 jax.random.key(11)], ids=["raw", "folded", "typed"])
def test_dropout_masks_are_jax_bernoulli_bit_for_bit_sharded_or_not(key):
    """flaxclf.nn.dropout.bernoulli (the hash unrolled for XLA:CPU) draws jax.random.bernoulli's bits, on one
    device and with the mask sharded over 8, and Dropout is nn.Dropout: the same output and gradient."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from flaxclf.nn.dropout import Dropout, bernoulli

    for shape in [(), (5,), (3, 7), (8, 20, 16), (1, 1, 24, 24)]:
        for p in (0.9, 0.5, 0.1, 0.0, 1.0):
            want = np.asarray(jax.random.bernoulli(key, p, shape))
            np.testing.assert_array_equal(np.asarray(jax.jit(bernoulli, static_argnums=2)(key, p, shape)), want)
    mesh = jax.make_mesh((2, 4), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    sharded = jax.jit(lambda k: bernoulli(k, 0.9, (8, 20, 16)), out_shardings=NamedSharding(mesh, P("a", None, "b")))
    np.testing.assert_array_equal(np.asarray(sharded(key)), np.asarray(jax.random.bernoulli(key, 0.9, (8, 20, 16))))

    x = jax.random.normal(jax.random.PRNGKey(1), (4, 6, 8))
    rngs = {"dropout": jax.random.PRNGKey(2)}
    def out_and_grad(module):
        def f(x):
            return module.apply({}, x, deterministic=False, rngs=rngs)
        return np.asarray(f(x)), np.asarray(jax.grad(lambda x: (f(x) ** 2).sum())(x))

    for rate in (0.1, 0.5, 1.0):
        for ours, theirs in zip(out_and_grad(Dropout(rate)), out_and_grad(nn.Dropout(rate)), strict=True):
            np.testing.assert_array_equal(ours, theirs)
