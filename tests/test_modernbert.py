"""flaxclf.models.modernbert against transformers' PyTorch ModernBertForSequenceClassification (eager attention: the
padded path with a global mask and a sliding-window mask), on tiny random models whose sequences are longer than
the local window."""

import json
from dataclasses import asdict
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import unflatten_dict
from safetensors.numpy import save_file

from flaxclf.hf import weights
from flaxclf.models.classifier import ClassifierConfig, init_params, make_classifier
from flaxclf.models.modernbert import AttentionImpl, ModernBertClassifier, ModernBertSpec
from flaxclf.models.modernbert.encoder import ModernBertLayer
from flaxclf.models.registry import FAMILIES
from flaxclf.nn.attention import banded_local_attention, chunked_attention, dense_attention
from tests.helpers import f32_bound

torch = pytest.importorskip("torch", reason="the PyTorch reference (torch) is not installed in this environment")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.hf

# 4 layers: 0 and 2 global, 1 and 3 local with a window of 4 on each side; sequences of 32.
TINY = dict(vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
            global_attn_every_n_layers=2, local_attention=8, max_position_embeddings=64, pad_token_id=0)
NUM_LABELS = 3
FAMILY = FAMILIES["modernbert"]
BIASES_ON = dict(norm_bias=True, attention_bias=True, mlp_bias=True, classifier_bias=True, local_rope_theta=500.0,
                 global_rope_theta=20000.0)
LENGTHS = (32, 27, 13, 5)  # real tokens per row; 5 is shorter than a local layer's window

# ---------------------------------------------------------------------------------------------- float32 bounds
# Against torch, f32_bound (tests/helpers.py derives it) with:
# - depth: a layer's output depends on six matmuls in sequence (Wqkv, the scores, the weighted values, Wo, the
#   MLP's Wi and Wo; the softmax's and norms' sums are in f32_bound's constant); the head adds three (the mean
#   pooling's sum, the head's dense layer, the classifier) and the loss two (log-sum-exp, the batch mean). The
#   backward pass retraces the chain and ends in the weight gradients' sums over the batch's tokens.
# - n: the longest contraction: the MLP's width in the forward, the batch's tokens in the weight gradients.
# - scale: the largest magnitude of what is compared (a loss's terms are log-sum-exps minus logits: the logits').
LAYER_DEPTH, HEAD_DEPTH, LOSS_DEPTH = 6, 3, 2
WIDTH, TOKENS = TINY["intermediate_size"], len(LENGTHS) * max(LENGTHS)
# The goal for the logits of a checkpoint loaded from (or exported to) PyTorch, kept as it stands: it is
# above float32's rounding (measured 2-3e-6 on logits up to ~5) and below f32_bound for this depth.
LOGITS_GOAL = 1e-5
# One attention (banded, chunked or dense): the scores, the softmax, the weighted values; the keys summed over are
# at most the row's length. The backward pass retraces them and sums over the queries.
ATTENTION_DEPTH = 3


def _forward_depth(spec: ModernBertSpec) -> int:
    return LAYER_DEPTH * spec.num_hidden_layers + HEAD_DEPTH


def _max_abs(x) -> float:
    return float(np.max(np.abs(np.asarray(x, np.float64)), initial=0.0))


def _ratio(diff: float, bound: float) -> float:
    """diff / bound, <= 1 when diff is within bound (a gradient that is 0 exactly has bound 0)."""
    return diff / bound if bound > 0 else (0.0 if diff == 0 else np.inf)


def _spec(pooling="cls", biases=False, **kw) -> ModernBertSpec:
    return ModernBertSpec(**{**TINY, **(BIASES_ON if biases else {}), "classifier_pooling": pooling, **kw})


def _config(spec: ModernBertSpec) -> ClassifierConfig:
    return ClassifierConfig(backbone=spec, num_labels=NUM_LABELS)


def _model(spec: ModernBertSpec, **kw):
    return make_classifier(_config(spec), **kw)


def _params(state: dict[str, np.ndarray]) -> dict:
    """A PyTorch state dict -> our param tree, by flaxclf.hf.weights' family renaming."""
    return unflatten_dict(weights._from_pt_names(FAMILY, state))


def _to_state(params: dict) -> dict[str, np.ndarray]:
    return weights.to_pt_state({"params": params}, FAMILY)


def _torch_model(spec: ModernBertSpec, seed: int = 0):
    """HF's model with every weight redrawn at a trained-looking scale (sharp attention, a head that matters)."""
    torch.manual_seed(seed)
    cfg = transformers.ModernBertConfig(**_config(spec).to_hf(), attn_implementation="eager",
                                        reference_compile=False)
    model = transformers.ModernBertForSequenceClassification(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p) if name.endswith("weight") else 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0, 0.2)
            elif "tok_embeddings" in name:
                p.normal_(0, 1.0)
            else:  # Linear weights [out, in]; the head and classifier at std 0.5
                p.normal_(0, 0.5 if name.startswith(("head", "classifier")) else 1.0 / p.shape[1] ** 0.5)
    return model


def _state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _batch(spec: ModernBertSpec, lengths=LENGTHS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = max(lengths)
    ids = rng.integers(1, spec.vocab_size, (len(lengths), n))
    mask = (np.arange(n)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
    return np.where(mask > 0, ids, spec.pad_token_id), mask


def _torch_forward(model, ids, mask, labels=None):
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True,
                 labels=None if labels is None else torch.tensor(labels))


@partial(jax.jit, static_argnums=0)
def _encode_and_logits(model, params, ids, mask):
    variables = {"params": params}
    return (model.apply(variables, ids, mask, method="hidden_states"),
            model.apply(variables, ids, mask, method="encode"), model.apply(variables, ids, mask))


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# 8 layers, a global one every 3: with remat, layer 0, then a scan over the groups (1, 2, 3) and (4, 5, 6), then 7.
SCANNED = dict(num_hidden_layers=8, global_attn_every_n_layers=3)


# Each pooling once, each with the biases off and on between the two tests (XLA compiles each model once), and
# the scanned gradient-checkpointing path once in each.
@pytest.mark.parametrize("pooling,biases,remat", [("cls", False, False), ("mean", True, False), ("mean", False, True)])
def test_logits_and_hidden_states_match_torch(pooling, biases, remat):
    spec = _spec(pooling, biases, **(SCANNED if remat else {}))
    model_pt = _torch_model(spec)
    ids, mask = _batch(spec)
    with torch.no_grad():
        out = _torch_forward(model_pt, ids, mask)
    model = _model(spec, remat=remat)
    states, final, logits = _encode_and_logits(model, _params(_state(model_pt)), ids, mask)
    assert logits.dtype == jnp.float32 and logits.shape == (len(LENGTHS), NUM_LABELS)
    diff = _max_diff(logits, out.logits.numpy())
    print(f"\nlogits {pooling} biases={biases}: max abs diff {diff:.3g} (max |logit| {out.logits.abs().max():.3g}, "
          f"goal {LOGITS_GOAL:g})")
    assert diff <= LOGITS_GOAL
    # Every layer's output at the real positions (padded positions are nobody's input: see the module doc), after
    # its layers' matmuls (the embeddings' norm: 1), at its own largest magnitude.
    real = mask.astype(bool)
    assert len(states) == len(out.hidden_states) == spec.num_hidden_layers + 1
    if int(transformers.__version__.split(".")[0]) >= 5:  # 5.x's last hidden state is after final_norm
        states = (*states[:-1], final)
    worst = 0.0
    for n, (ours, theirs) in enumerate(zip(states, out.hidden_states, strict=True)):
        theirs = theirs.numpy()[real]
        diff, bound = _max_diff(np.asarray(ours)[real], theirs), f32_bound(max(1, LAYER_DEPTH * n), WIDTH,
                                                                           _max_abs(theirs))
        assert diff <= bound, (n, diff, bound)
        worst = max(worst, diff / bound)
    print(f"hidden states: worst max abs diff / bound {worst:.2g} (layer {spec.num_hidden_layers}'s bound {bound:.2g})")


@pytest.mark.parametrize("pooling,biases,remat", [("cls", True, False), ("mean", False, False), ("cls", True, True)])
def test_loss_and_gradients_match_torch(pooling, biases, remat):
    spec = _spec(pooling, biases, **(SCANNED if remat else {}))
    model_pt = _torch_model(spec, seed=1).train()  # every dropout rate is 0: train mode is deterministic
    ids, mask = _batch(spec, seed=1)
    ids[0, 3] = spec.pad_token_id  # a real token that is the pad id: torch's padding_idx gives its row no gradient
    labels = np.array([0, 2, 1, 2])
    out = _torch_forward(model_pt, ids, mask, labels)
    out.loss.backward()
    grads_pt = {k: p.grad.numpy() for k, p in model_pt.named_parameters()}

    model = _model(spec, remat=remat)

    def loss_fn(params):
        logits = model.apply({"params": params}, ids, mask, deterministic=False)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1))

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(_params(_state(model_pt)))
    depth = _forward_depth(spec) + LOSS_DEPTH
    loss_diff = abs(float(loss) - out.loss.item())
    loss_bound = f32_bound(depth, WIDTH, max(_max_abs(out.logits.detach()), out.loss.item()))
    print(f"\nloss {pooling}: {out.loss.item():.8g} (torch) {float(loss):.8g} (flax): diff {loss_diff:.3g}, "
          f"bound {loss_bound:.3g}")
    assert loss_diff <= loss_bound
    grads = _to_state(grads)
    assert grads.keys() == grads_pt.keys()
    worst = 0.0
    for name, g_pt in grads_pt.items():  # every tensor at its own largest gradient (Wqkv's bias holds the queries')
        diff, bound = _max_diff(grads[name], g_pt), f32_bound(2 * depth + 1, max(WIDTH, TOKENS), _max_abs(g_pt))
        worst = max(worst, _ratio(diff, bound))
        assert diff <= bound, (name, diff, bound)
    assert not grads["model.embeddings.tok_embeddings.weight"][spec.pad_token_id].any()
    print(f"gradients {pooling}: worst max|diff| / bound {worst:.3g} (bound {f32_bound(2 * depth + 1, TOKENS):.3g} "
          f"of each tensor's largest)")


def _folder(tmp_path, spec, state, **config):
    """A save_pretrained-like folder: config.json and model.safetensors."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps({**_config(spec).to_hf(), **config}))
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    return tmp_path


def test_state_dict_round_trip_and_export_to_torch(tmp_path):
    spec = _spec("mean", biases=True)
    model_pt = _torch_model(spec, seed=2)
    sd = _state(model_pt)
    back = _to_state(_params(sd))
    assert back.keys() == sd.keys()
    assert all(back[k].dtype == sd[k].dtype and np.array_equal(back[k], sd[k]) for k in sd)

    # init_params makes the same tree.
    model = _model(spec)
    shapes = jax.eval_shape(partial(init_params, model), jax.random.PRNGKey(0))["params"]
    params = _params(sd)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), shapes) == jax.tree.map(lambda x: (x.shape, x.dtype), params)
    # Other flax params -> export_hf -> transformers' own from_pretrained: the same logits.
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: x + np.float32(0.1) * rng.standard_normal(x.shape, np.float32), params)
    out = weights.export_hf(tmp_path / "export", model.config, {"params": params}, None)
    fresh = transformers.AutoModelForSequenceClassification.from_pretrained(
        out, attn_implementation="eager").eval()
    assert type(fresh).__name__ == "ModernBertForSequenceClassification"
    assert fresh.config.classifier_pooling == "mean" and fresh.config.num_labels == NUM_LABELS
    ids, mask = _batch(spec)
    with torch.no_grad():
        expected = _torch_forward(fresh, ids, mask).logits.numpy()
    diff = _max_diff(_encode_and_logits(model, params, ids, mask)[2], expected)  # compiled already
    print(f"\nexported to torch: logits max abs diff {diff:.3g} (goal {LOGITS_GOAL:g})")
    assert diff <= LOGITS_GOAL
    # ... and back into flaxclf from the export: the same parameters.
    again, loaded = weights.from_pretrained(str(out))
    assert again.config == model.config.replace(classifier_dropout=0.0)  # written out as the number it is
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(loaded["params"]), jax.tree.leaves(params),
                                                     strict=True))


def test_loading_is_strict(tmp_path):
    spec = _spec()
    model = _model(spec)
    sd = _state(_torch_model(spec))

    def load(state, name):
        return weights.load_params(model, _folder(tmp_path / name, spec, state), jax.random.PRNGKey(0))

    # A masked-LM checkpoint: its decoder is not the classifier's, its head is.
    mlm = {k: v for k, v in sd.items() if not k.startswith("classifier.")}
    params = load({**mlm, "decoder.weight": np.zeros((99, 32)), "decoder.bias": np.zeros(99)}, "mlm")["params"]
    np.testing.assert_array_equal(params["head"]["dense"]["kernel"], sd["head.dense.weight"].T)
    assert params["classifier"]["kernel"].shape == (32, NUM_LABELS)
    # A base ModernBertModel (no prefix, no head): head and classifier new, the head's norm at 1.
    base = {k.removeprefix("model."): v for k, v in mlm.items() if k.startswith("model.")}
    params = load(base, "base")["params"]
    np.testing.assert_array_equal(params["model"]["final_norm"]["scale"], sd["model.final_norm.weight"])
    assert np.all(params["head"]["norm"]["scale"] == 1.0)
    with pytest.raises(weights.WeightsError, match=r"unexpected: model/layers/9/mlp_norm/scale"):
        load({**sd, "model.layers.9.mlp_norm.weight": np.ones(32, np.float32)}, "extra")
    with pytest.raises(weights.WeightsError, match=r"missing: model/layers/1/attn/Wqkv/kernel"):
        load({k: v for k, v in sd.items() if k != "model.layers.1.attn.Wqkv.weight"}, "missing")
    with pytest.raises(weights.WeightsError, match=r"mis-shaped: model/final_norm/scale \(31,\) != \(32,\)"):
        load({**sd, "model.final_norm.weight": np.ones(31, np.float32)}, "shape")


def test_spec_reads_config_json_of_transformers_4_and_5():
    """transformers' own config, default and tiny, read back to the same spec (4.x writes global_rope_theta and
    global_attn_every_n_layers, 5.x rope_parameters and layer_types)."""
    assert ModernBertSpec.from_hf(transformers.ModernBertConfig().to_dict()) == ModernBertSpec()
    spec = _spec("mean", biases=True, global_attn_every_n_layers=3, num_hidden_layers=5)
    assert ModernBertSpec.from_hf(transformers.ModernBertConfig(**spec.to_hf()).to_dict()) == spec
    v5 = {**TINY, "layer_types": ["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
          "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e4},
                              "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}}}
    got = ModernBertSpec.from_hf(v5)
    assert (got.global_attn_every_n_layers, got.global_rope_theta, got.local_rope_theta) == (3, 1e4, 50.0)
    with pytest.raises(ValueError, match="layer_types"):
        ModernBertSpec.from_hf({**v5, "layer_types": ["full_attention", "sliding_attention", "full_attention",
                                                      "sliding_attention", "sliding_attention"]})
    with pytest.raises(ValueError, match="rope_parameters"):
        ModernBertSpec.from_hf({**v5, "rope_parameters": {"full_attention": {"rope_type": "yarn"}}})
    with pytest.raises(ValueError, match="classifier_pooling 'max'"):
        ModernBertSpec.from_hf({"classifier_pooling": "max"})


def test_pooling_setting_picks_classifier_pooling():
    """model.pooling cls or mean is ModernBERT's classifier_pooling (its PyTorch class has both, so an export
    keeps it); cls_pooler keeps the checkpoint's; max has no ModernBERT head and is refused."""
    spec = _spec("cls")
    mean = ClassifierConfig(backbone=spec, num_labels=2, pooling="mean")
    assert mean.backbone.classifier_pooling == "mean" and mean.pooling == "cls_pooler"
    assert mean.to_hf()["classifier_pooling"] == "mean"
    assert ClassifierConfig(backbone=spec, pooling="cls_pooler").backbone.classifier_pooling == "cls"
    with pytest.raises(ValueError, match="pooling 'max' is not one of ModernBERT's"):
        ClassifierConfig(backbone=spec, pooling="max")


@pytest.mark.parametrize("local_impl", ["banded", "dense"])
def test_local_layer_ignores_tokens_outside_its_window(local_impl):
    """Layer 1 (local, window 4 each side) on fixed inputs: moving position 20 changes its output at positions
    16..24 and leaves every other position bit-identical."""
    spec = _spec(biases=True)
    layers = _params(_state(_torch_model(spec)))["model"]["layers"]
    layer = ModernBertLayer(spec, layer_id=1, attention=AttentionImpl(local=local_impl))
    apply = jax.jit(lambda x: layer.apply({"params": layers["1"]}, x, jnp.ones((1, 64), bool)))
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 64, spec.hidden_size))
    before, after = apply(x), apply(x.at[0, 20].add(1.0))
    changed = np.any(np.asarray(before != after)[0], axis=-1)
    assert np.array_equal(np.flatnonzero(changed), np.arange(16, 25))
    # A global layer (2) sees it far away too.
    glob = ModernBertLayer(spec, layer_id=2)
    out = [glob.apply({"params": layers["2"]}, y, jnp.ones((1, 64), bool)) for y in (x, x.at[0, 20].add(1.0))]
    changed = np.any(np.asarray(out[0] != out[1])[0], axis=-1)
    assert changed[:16].any() and changed[25:].any()


@pytest.mark.parametrize("n,local_attention", [(64, 8), (61, 7), (16, 1)])
def test_banded_attention_equals_dense_masked_reference(n, local_attention):
    """Banded local attention = a dense [L, L] masked softmax (the mask as HF's: |i - j| <= local_attention // 2
    and a real key), values and gradients, at the real rows of a batch with padding; L need not be a multiple of
    the block."""
    window = local_attention // 2
    kq, kk, kv, kg = jax.random.split(jax.random.PRNGKey(0), 4)
    shape = (3, 2, n, 8)
    q, k, v = (2.0 * jax.random.normal(key, shape) for key in (kq, kk, kv))
    lengths = np.array([n, n - 11, 7])
    mask = np.arange(n)[None, :] < lengths[:, None]
    real = mask[:, None, :, None]  # padded query rows are nobody's input (the module doc)
    g = jax.random.normal(kg, shape) * real

    @jax.jit
    def outputs_and_grads(q, k, v):
        out = []
        for f in (banded_local_attention, dense_attention):
            y, vjp = jax.vjp(lambda *t, f=f: f(*t, mask, window), q, k, v)
            out.append((y, *vjp(g)))
        return out

    (banded, *grads_banded), (dense, *grads_dense) = outputs_and_grads(q, k, v)
    # Sums over 3c keys instead of L round differently: float32's bound of one attention over n keys, at the
    # outputs' magnitude (the values'); the gradients at each one's largest.
    dense_real = np.where(real, dense, 0.0)
    diff = _max_diff(np.where(real, banded, 0.0), dense_real)
    bound = f32_bound(ATTENTION_DEPTH, n, _max_abs(dense_real))
    grad_ratio = max(_ratio(_max_diff(a, b), f32_bound(2 * ATTENTION_DEPTH, n, _max_abs(b)))
                     for a, b in zip(grads_banded, grads_dense, strict=True))
    print(f"\nbanded vs dense L={n} window={window}: max abs diff {diff:.3g} (bound {bound:.3g}), gradients "
          f"worst diff / bound {grad_ratio:.3g}")
    assert diff <= bound and grad_ratio <= 1.0
    # Both against float64 numpy.
    pos = np.arange(n)
    allowed = (np.abs(pos[:, None] - pos[None, :]) <= window)[None, None] & mask[:, None, None, :]
    q64, k64, v64 = (np.asarray(t, np.float64) for t in (q, k, v))
    s = np.where(allowed, np.einsum("bhqd,bhkd->bhqk", q64, k64) / np.sqrt(q64.shape[-1]), -1e300)
    p = np.exp(s - s.max(-1, keepdims=True))
    expected = np.where(real, np.einsum("bhqk,bhkd->bhqd", p / p.sum(-1, keepdims=True), v64), 0.0)
    diff64 = _max_diff(np.where(real, banded, 0.0), expected)
    print(f"banded vs float64 numpy: {diff64:.3g} (bound {f32_bound(ATTENTION_DEPTH, n, _max_abs(expected)):.3g})")
    assert diff64 <= f32_bound(ATTENTION_DEPTH, n, _max_abs(expected))


@pytest.mark.parametrize("n,chunk", [(40, 16), (48, 16), (7, 4)])
def test_chunked_global_attention_equals_dense(n, chunk):
    """A global layer's attention a block of queries at a time = the dense [L, L] softmax, values and gradients,
    with padding, L not a multiple of the block."""
    kq, kk, kv, kg = jax.random.split(jax.random.PRNGKey(1), 4)
    shape = (3, 2, n, 8)
    q, k, v = (2.0 * jax.random.normal(key, shape) for key in (kq, kk, kv))
    mask = np.arange(n)[None, :] < np.array([n, n - 5, 3])[:, None]
    g = jax.random.normal(kg, shape)

    @jax.jit
    def outputs_and_grads(q, k, v):
        out = []
        for f in (partial(chunked_attention, chunk=chunk), dense_attention):
            y, vjp = jax.vjp(lambda *t, f=f: f(*t, mask), q, k, v)
            out.append((y, *vjp(g)))
        return out

    (chunked, *grads_chunked), (dense, *grads_dense) = outputs_and_grads(q, k, v)
    diff, bound = _max_diff(chunked, dense), f32_bound(ATTENTION_DEPTH, n, _max_abs(dense))
    grad_ratio = max(_ratio(_max_diff(a, b), f32_bound(2 * ATTENTION_DEPTH, n, _max_abs(b)))
                     for a, b in zip(grads_chunked, grads_dense, strict=True))
    print(f"\nchunked vs dense L={n}: max abs diff {diff:.3g} (bound {bound:.3g}), gradients worst diff / bound "
          f"{grad_ratio:.3g}")
    assert diff <= bound and grad_ratio <= 1.0


def test_attention_memory_grows_linearly_with_length_not_as_its_square():
    """The train step's temporaries from L = 1024 to 2048 (local window 128, blocks of 128 queries in the
    global layers): about 2x, where the dense path's grow about 4x (it holds [B, H, L, L] scores in every layer);
    at 2048 they are below the dense path's by more than 5x. The logits are the dense path's."""
    spec = ModernBertSpec(**{**TINY, "max_position_embeddings": 2048, "local_attention": 128})
    chunked = ModernBertClassifier(_config(spec), attention=AttentionImpl(global_chunk=128))
    dense = ModernBertClassifier(_config(spec), attention=AttentionImpl(local="dense", global_chunk=0))
    params = init_params(chunked, jax.random.PRNGKey(0))

    def temp_bytes(model, n):
        ids, mask = _batch(spec, lengths=(n, n - 300))

        def loss(p):
            return model.apply(p, ids, mask).sum()
        return jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes

    t = {(name, n): temp_bytes(m, n) for name, m in (("chunked", chunked), ("dense", dense)) for n in (1024, 2048)}
    print("\ntrain-step temporaries (MiB): " + ", ".join(f"{k[0]} L={k[1]} {v / 2**20:.0f}" for k, v in t.items()))
    assert t["chunked", 2048] / t["chunked", 1024] < 2.5 and t["dense", 2048] / t["dense", 1024] > 3.5
    assert t["chunked", 2048] * 5 < t["dense", 2048]
    ids, mask = _batch(spec, lengths=(2048, 1748))
    logits = [jax.jit(m.apply)(params, ids, mask) for m in (chunked, dense)]
    # The whole forward, whose global attentions sum over up to 2,048 keys.
    diff, bound = _max_diff(*logits), f32_bound(_forward_depth(spec), 2048, _max_abs(logits[1]))
    print(f"chunked vs dense logits at L = 2048: max abs diff {diff:.3g} (bound {bound:.3g})")
    assert diff <= bound


def test_remat_keeps_one_group_of_layers_not_every_layer():
    """With remat, the train step's temporaries grow by a few residual streams per added group of layers (the
    forward pass keeps each group's input; the backward pass recomputes one group at a time), where
    without it each layer adds its activations. 4 -> 13 layers (a global every 3: 1 -> 4 groups) at 2 x 2,048.
    (At 4 layers both hold the same: the one group's recomputation holds its 3 layers, as no remat does.)"""
    spec = ModernBertSpec(**{**TINY, "max_position_embeddings": 2048, "local_attention": 128,
                             "global_attn_every_n_layers": 3})
    ids, mask = _batch(spec, lengths=(2048, 1748))
    labels = np.array([0, 2])
    t = {}
    for layers in (4, 13):
        s = ModernBertSpec(**{**asdict(spec), "num_hidden_layers": layers})
        for remat in (False, True):
            model = _model(s, remat=remat)
            params = init_params(model, jax.random.PRNGKey(0))

            def loss(p, model=model):
                logits = model.apply(p, ids, mask, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
                return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1))
            compiled = jax.jit(jax.grad(loss)).lower(params).compile()
            t[layers, remat] = compiled.memory_analysis().temp_size_in_bytes
    print("\ntrain-step temporaries (MiB): " + ", ".join(f"{k[0]} layers remat={k[1]} {v / 2**20:.1f}"
                                                      for k, v in t.items()))
    stream = 2 * 2048 * spec.hidden_size * 4  # one [B, L, D] fp32 residual stream
    per_layer = (t[13, False] - t[4, False]) / 9
    per_group = (t[13, True] - t[4, True]) / 3
    assert per_layer > 10 * stream  # each layer keeps many streams' worth of activations
    # A group keeps its input and its global layer's attention output (and its share of the parameters' copies).
    assert per_group < 4 * stream
    assert t[13, True] * 2 < t[13, False]


def test_remat_scan_draws_dropout_in_every_group():
    """Dropout inside the checkpointed scan: every scanned layer's output depends on the step's key, and the same
    key gives the same outputs (a resumed run replays its steps)."""
    spec = _spec("cls", **SCANNED, mlp_dropout=0.3)
    model = _model(spec, remat=True)
    params = init_params(model, jax.random.PRNGKey(0))
    ids, mask = _batch(spec)

    @jax.jit
    def states(key):
        return model.apply(params, ids, mask, method=lambda m, i, a: m.model(i, a, False, every_state=True)[1],
                           rngs={"dropout": key})

    a, a2, b = states(jax.random.PRNGKey(1)), states(jax.random.PRNGKey(1)), states(jax.random.PRNGKey(2))
    ref = model.apply(params, ids, mask, method=lambda m, i, a: m.model(i, a, True, every_state=True)[1])
    for layer in range(1, 8):  # states[layer + 1] is layer `layer`'s output
        assert np.array_equal(a[layer + 1], a2[layer + 1]), layer
        assert not np.array_equal(a[layer + 1], b[layer + 1]), layer
        assert not np.array_equal(a[layer + 1], ref[layer + 1]), layer


def _head_grad(spec, seed=0):
    """d(sum of logits)/d(final hidden states) of a random model, and the batch's mask."""
    model = _model(spec)
    params = _params(_state(_torch_model(spec, seed)))
    ids, mask = _batch(spec)
    hidden = jax.random.normal(jax.random.PRNGKey(seed), (*ids.shape, spec.hidden_size))

    def logits_sum(h):
        return model.apply({"params": params}, h, mask, method=model.classify).sum()

    return np.asarray(jax.grad(logits_sum)(hidden)), mask


def test_cls_pooling_reads_position_zero_only():
    grad, _ = _head_grad(_spec("cls"))
    assert np.all(np.abs(grad[:, 0]).sum(-1) > 0)
    assert not grad[:, 1:].any()


def test_mean_pooling_reads_every_real_token_and_no_padding():
    grad, mask = _head_grad(_spec("mean"))
    touched = np.abs(grad).sum(-1) > 0
    assert np.array_equal(touched, mask.astype(bool))


def test_bf16_with_remat_stays_close_to_fp32():
    """bf16 matmuls (with gradient checkpointing on) stay close to fp32 and return fp32 logits."""
    spec = _spec("mean", biases=True)
    params = _params(_state(_torch_model(spec)))
    ids, mask = _batch(spec)
    ref = _encode_and_logits(_model(spec), params, ids, mask)[2]
    model = _model(spec, dtype=jnp.bfloat16, remat=True)
    half = jax.jit(lambda p: model.apply({"params": p}, ids, mask))(params)
    assert half.dtype == jnp.float32 and _max_diff(half, ref) <= 0.05 * float(jnp.abs(ref).max())
