"""The fast encoder (flaxclf.models.bert.encoder) against transformers' FlaxBertModule and against its own full
computation: the same params, init values and dropout masks; the [CLS]-only last layer; bf16 mixed precision."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from flaxclf.models.bert import BertClassifier, BertSpec
from flaxclf.models.classifier import ClassifierConfig, init_params
from tests.helpers import f32_bound
from tests.torch_ref import needs_hf_flax, needs_torch

SPEC = BertSpec(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                max_position_embeddings=64)

# ---------------------------------------------------------------------------------------------- float32 bounds
# Two float32 computations of one function agree to f32_bound (tests/helpers.py derives it), with:
# - depth: a layer's output depends on six matmuls in sequence (the query projection, the scores, the weighted
#   values, the output projection, the feed-forward's two; the softmax's and LayerNorms' sums are in f32_bound's
#   constant); the head adds two (the pooler or the mean's sum, the classifier). The backward pass retraces the
#   chain and ends in the weight gradients' sums over the batch's tokens.
# - n: the longest contraction: the feed-forward's width, and the batch's 4 x 16 tokens: both 64.
# - scale: the largest magnitude of what is compared.
ENCODER_DEPTH = 6 * SPEC.num_hidden_layers
FORWARD_DEPTH = ENCODER_DEPTH + 2
WIDTH = 64


def batch(b: int = 4, length: int = 16, seed: int = 0) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    mask = (np.arange(length)[None] < rng.integers(2, length + 1, b)[:, None]).astype(np.int32)
    ids = np.where(mask, rng.integers(5, SPEC.vocab_size, (b, length)), 0).astype(np.int32)
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}


def logits_fn(model, b, train: bool):
    rngs = {"dropout": jax.random.PRNGKey(5)} if train else None
    return lambda p: model.apply(p, **b, deterministic=not train, rngs=rngs)


def loss_fn(model, b, train: bool):
    return lambda p: logits_fn(model, b, train)(p).sum()


def _max_abs(x) -> float:
    return float(np.max(np.abs(np.asarray(x, np.float64)), initial=0.0))


@pytest.mark.hf
@needs_hf_flax
@pytest.mark.parametrize("pooling,remat,train", [("cls_pooler", False, True), ("cls_pooler", True, True),
                                                 ("cls_pooler", False, False), ("mean", False, True),
                                                 ("mean", False, False)])
def test_fast_backbone_matches_hf_module(pooling, remat, train):
    """cls_pooler runs fast's [CLS]-only last layer, mean its full one; eval and train both run the
    exp-matmul-divide attention (train with the dropout mask inside the matmul), hf the softmax. The first case
    can take a minute on a cold cache and a busy machine: jax.grad outside jit runs both encoders' forward and
    backward op by op, compiling each primitive on first use."""
    cfg = ClassifierConfig(backbone=SPEC, num_labels=3, pooling=pooling)
    fast, hf = BertClassifier(cfg, impl="fast", remat=remat), BertClassifier(cfg, impl="hf", remat=remat)
    params = init_params(hf, jax.random.PRNGKey(0))
    for a, b in zip(jax.tree.leaves(init_params(fast, jax.random.PRNGKey(0))), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)  # same tree, same initial values
    b = batch()
    # Dropout on: equal logits mean the same masks were drawn (a different mask moves them by far more).
    got, want = logits_fn(fast, b, train)(params), logits_fn(hf, b, train)(params)
    diff, bound = _max_abs(got - want), f32_bound(FORWARD_DEPTH, WIDTH, _max_abs(want))
    assert diff <= bound
    # The gradients of the logits' sum, per tensor at its largest (a key bias, whose exact gradient is 0 as softmax
    # ignores a constant added to every score, at its query bias's: the rounding of its cancelling terms).
    grads = [flatten_dict(jax.grad(loss_fn(m, b, train))(params), sep="/") for m in (fast, hf)]
    worst = 0.0
    for path, h in grads[1].items():
        scale = max(_max_abs(h), _max_abs(grads[1][path.replace("key/bias", "query/bias")]))
        g_diff, g_bound = _max_abs(grads[0][path] - h), f32_bound(2 * FORWARD_DEPTH + 2, WIDTH, scale)
        assert g_diff <= g_bound, (path, g_diff, g_bound)
        worst = max(worst, g_diff / g_bound)
    print(f"\nfast vs hf {pooling} remat={remat} train={train}: logits max abs diff {diff:.2g} (bound {bound:.2g}); "
          f"gradients worst diff / bound {worst:.2g}")


@pytest.mark.parametrize("train", [False, True])
def test_cls_only_last_layer_is_position_zero_of_the_full_one(train):
    model = BertClassifier(ClassifierConfig(backbone=SPEC, num_labels=3), impl="fast")
    params = init_params(model, jax.random.PRNGKey(0))
    b = batch(length=24)
    rngs = {"dropout": jax.random.PRNGKey(7)} if train else None

    def encode(cls_only):
        return model.apply(params, **b, deterministic=not train, rngs=rngs,
                           method=lambda m, **kw: m.bert(**kw, cls_only=cls_only))
    full, cls = encode(False), encode(True)
    assert full.shape == (4, 24, SPEC.hidden_size) and cls.shape == (4, 1, SPEC.hidden_size)
    diff, bound = _max_abs(cls - full[:, :1]), f32_bound(ENCODER_DEPTH, WIDTH, _max_abs(full[:, :1]))
    print(f"\n[CLS]-only vs full last layer: max abs diff {diff:.2g} (bound {bound:.2g})")
    assert diff <= bound


def test_cls_only_skips_most_of_the_last_layer():
    """XLA's own FLOP count: with 2 layers and 24 positions, the [CLS]-only last layer keeps 1/24 of its
    matmuls (no key or value projections: the query goes through the key kernel instead), so the encoder's
    matmuls cost about 1 - (1/2)(23/24) = 0.52 of the full; XLA counts 0.60 with the elementwise work (0.67 while
    the layer still projected keys and values)."""
    model = BertClassifier(ClassifierConfig(backbone=SPEC, num_labels=3), impl="fast")
    params = init_params(model, jax.random.PRNGKey(0))
    b = batch(length=24)

    def flops(cls_only):
        f = jax.jit(lambda p: model.apply(p, **b, method=lambda m, **kw: m.bert(**kw, cls_only=cls_only)))
        return f.lower(params).compile().cost_analysis()["flops"]
    assert flops(True) < 0.62 * flops(False)


def _dots(jaxpr) -> list:
    """Every dot_general in a jaxpr, sub-jaxprs (jit, remat, custom_vjp) included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(eqn)
        for v in eqn.params.values():
            for sub in v if isinstance(v, (tuple, list)) else [v]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _dots(inner)
    return found


def test_bf16_runs_every_encoder_matmul_in_bf16_forward_and_backward():
    cfg = ClassifierConfig(backbone=SPEC, num_labels=3)
    f32, bf16 = BertClassifier(cfg, impl="fast"), BertClassifier(cfg, impl="fast", dtype=jnp.bfloat16)
    params = init_params(f32, jax.random.PRNGKey(0))
    params = jax.tree.map(lambda x: x * 20 if x.ndim == 2 and x.shape[-1] == 3 else x, params)  # a live head
    b = batch()
    grad = jax.grad(loss_fn(bf16, b, train=True))
    dots = _dots(jax.make_jaxpr(grad)(params).jaxpr)
    # 2 layers x (query, key, value, scores, context, attention out, ffn in, ffn out) forward (at least six of
    # them in any layout) + 2 per matmul backward, and
    # the pooler and classifier: every one takes bf16 operands.
    assert len(dots) >= 3 * 6 * SPEC.num_hidden_layers
    assert all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars), \
        sorted({str([v.aval.dtype for v in e.invars]) for e in dots})
    # Mixed precision, not bf16 everywhere: fp32 params and gradients, logits and gradients within bf16
    # rounding (8-bit mantissa, relative step 2^-8 = 0.4%) of the fp32 model over two layers.
    g16, g32 = grad(params), jax.grad(loss_fn(f32, b, train=True))(params)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(g16))
    num = sum(float(jnp.sum((a - c) ** 2)) for a, c in zip(jax.tree.leaves(g16), jax.tree.leaves(g32), strict=True))
    den = sum(float(jnp.sum(c ** 2)) for c in jax.tree.leaves(g32))
    assert (num / den) ** 0.5 < 2e-2
    logits16 = bf16.apply(params, **b)
    assert logits16.dtype == jnp.float32
    np.testing.assert_allclose(logits16, f32.apply(params, **b), rtol=0, atol=5e-2)


# The GELU x * 0.5 * (1 + erf(x / sqrt 2)) is 5 roundings (the scaling, erf, 1 +, the two products), its
# derivative by autodiff 11 (0.5 (1 + erf) + x * 0.5 * 2 / sqrt(pi) * exp(-x^2 / 2) / sqrt 2); elementwise (n = 1).
GELU_OPS, GELU_GRAD_OPS = 5, 11


@pytest.mark.hf
def test_gelu_is_the_exact_gelu():
    """The encoder's GELU (torch's erf formula, with a select below -6 for XLA's fusion) against the closed form
    in float64 (torch, double), values and derivatives over [-12, 12], elementwise to float32's bound. 1 + erf is
    rounded at 1 whatever its size (it cancels below 0), then multiplied by x: a value's error is at the scale of
    max(|exact|, |x|), a derivative's (0.5 (1 + erf) plus a term below 1) at max(|exact|, 1)."""
    torch = needs_torch()
    from flaxclf.models.bert.encoder import ACTIVATIONS

    gelu = ACTIVATIONS["gelu"]
    x = np.concatenate([np.linspace(-12, 12, 200_001), [-6.0, -5.999999, 0.0]]).astype(np.float32)
    t = torch.tensor(x.astype(np.float64), requires_grad=True)
    exact = torch.nn.functional.gelu(t)
    exact.sum().backward()
    for what, ours, ref, ops, floor in [
            ("values", gelu(jnp.asarray(x)), exact.detach().numpy(), GELU_OPS, np.abs(x)),
            ("derivatives", jax.vmap(jax.grad(gelu))(jnp.asarray(x)), t.grad.numpy(), GELU_GRAD_OPS, 1.0)]:
        diff, bound = np.abs(np.asarray(ours, np.float64) - ref), f32_bound(ops, 1, np.maximum(np.abs(ref), floor))
        worst = np.max(np.divide(diff, bound, out=np.zeros_like(diff), where=bound > 0))
        print(f"\nGELU {what}: worst |diff| / bound {worst:.2g}")
        assert np.all(diff <= bound)
