"""Every encoder family against transformers' PyTorch *ForSequenceClassification, on small random configs built
offline: config.json, logits, loss and gradients, checkpoints in and exports out, and the seed question.

The harness: a family joins the parity tests (logits from a saved PyTorch classifier, the loss and every
gradient, the export round trip, the seed question) with one line in CONFIGS, the kwargs of transformers' config
class for it. The tests reach the model only through flaxclf's interface (from_pretrained, make_classifier,
encode, classify, the family's names), whatever encoder computes it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from flaxclf.hf.weights import WeightsError, export_hf, flax_to_pt, from_pretrained
from flaxclf.models import bert
from flaxclf.models.bert import BertSpec
from flaxclf.models.classifier import ClassifierConfig, init_params, make_classifier
from flaxclf.models.interface import EncoderSpec
from flaxclf.models.registry import family_of
from flaxclf.options import SINGLE
from flaxclf.training import losses
from tests.helpers import f32_bound, query_of
from tests.torch_ref import needs_hf_flax, needs_torch, save_pretrained_bin

pytestmark = pytest.mark.hf

_BASE = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
             max_position_embeddings=64)
_ROBERTA = dict(_BASE, pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1,
                max_position_embeddings=66)
# model_type -> the kwargs of transformers' config class for it (its own key names).
CONFIGS = {
    "bert": dict(_BASE, type_vocab_size=2),
    "roberta": _ROBERTA,
    "xlm-roberta": _ROBERTA,
    "camembert": _ROBERTA,
    "electra": dict(_BASE, embedding_size=16, type_vocab_size=2),
    "distilbert": dict(vocab_size=120, dim=32, n_layers=2, n_heads=4, hidden_dim=48, max_position_embeddings=64),
    "albert": dict(_BASE, embedding_size=16, num_hidden_layers=3, hidden_act="gelu_new", type_vocab_size=2,
                   hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1),
    # Layers 0 and 2 global, 1 and 3 local with a window of 4 on each side (tests/test_modernbert.py: the rest).
    "modernbert": dict(vocab_size=120, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                       global_attn_every_n_layers=2, local_attention=8, max_position_embeddings=64, pad_token_id=0),
    # v3's settings: relative attention only, c2p and p2c with shared keys over 8 log buckets a side (distances
    # from 4 on share buckets up to 16), LayerNorm'd relative embeddings, no token types, no absolute positions.
    "deberta-v2": dict(_BASE, relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=8,
                       max_relative_positions=16, share_att_key=True, norm_rel_ebd="layer_norm", type_vocab_size=0,
                       position_biased_input=False, hidden_act="gelu", layer_norm_eps=1e-7),
}
# Variants of a family's config: (model_type, its kwargs).
VARIANTS = {
    "albert-2-groups": ("albert", dict(CONFIGS["albert"], num_hidden_layers=4, num_hidden_groups=2)),
    # v2's: separate pos_key_proj and pos_query_proj, distances clamped at 6 without buckets, absolute positions
    # and token types, a factorized embedding with its projection, the old "c2p|p2c" spelling.
    "deberta-v2-unshared": ("deberta-v2", dict(_BASE, relative_attention=True, pos_att_type="c2p|p2c",
                                               max_relative_positions=6, type_vocab_size=2, embedding_size=16,
                                               pooler_hidden_act="tanh", hidden_dropout_prob=0.1,
                                               attention_probs_dropout_prob=0.1)),
    # c2p alone, and a scale of sqrt(2 * head_dim).
    "deberta-v2-c2p": ("deberta-v2", dict(_BASE, relative_attention=True, pos_att_type=["c2p"], position_buckets=4,
                                          max_relative_positions=64, position_biased_input=False)),
}
CASES = [*CONFIGS, *VARIANTS]
BERT_LIKE = [t for t in CONFIGS if t in bert.families.MODEL_TYPES]  # the tests of what the BERT encoder does

# ---------------------------------------------------------------------------------------------- float32 bounds
# Against transformers, f32_bound (tests/helpers.py derives it) with:
# - depth: a layer's output depends on six matmuls in sequence (the query projection, the scores, the weighted
#   values, the output projection, the feed-forward's two; the softmax's and LayerNorms' sums are in f32_bound's
#   constant); an embedding projection (ELECTRA, ALBERT) adds one, the head two or three (pre-classifier or
#   pooler, classifier; ELECTRA's two dense layers), the loss two (log-sum-exp, the batch mean). The backward
#   pass retraces the chain and ends in the weight gradients' sums over the batch's tokens.
# - n: the longest contraction: the feed-forward's width (48) in the forward, the batch's 4 x 12 tokens (48) in
#   the weight gradients.
# - scale: the largest magnitude of what is compared (a loss's terms are log-sum-exps minus logits: the logits').
LAYER_DEPTH, EMBEDDING_DEPTH, HEAD_DEPTH, LOSS_DEPTH, WIDTH = 6, 1, 3, 2, 48
# The goal for the logits of a checkpoint loaded from (or exported to) transformers, kept as it stands: it
# is above float32's rounding (measured <= 2e-6) and below f32_bound for these depths.
LOGITS_GOAL = 1e-5


def _layers(case: str) -> int:
    kwargs = _hf_kwargs(case)[1]
    return kwargs.get("num_hidden_layers", kwargs.get("n_layers"))


def _max_abs(x) -> float:
    return float(np.max(np.abs(np.asarray(x, np.float64)), initial=0.0))


def _hf_kwargs(case: str) -> tuple[str, dict]:
    return VARIANTS[case] if case in VARIANTS else (case, CONFIGS[case])


def _batch(spec: EncoderSpec, b: int = 4, length: int = 12, seed: int = 0) -> dict[str, np.ndarray]:
    """Padding of different lengths (pad ids where the mask is 0) and, where the family has them, two segments."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, spec.vocab_size, (b, length))
    mask = np.ones((b, length), np.int64)
    tt = np.zeros((b, length), np.int64)
    for i in range(b):
        n = max(length - 3 * i, 2)
        mask[i, n:] = 0
        ids[i, n:] = spec.pad_token_id
        if spec.family.token_types and spec.type_vocab_size > 1:
            tt[i, n // 2: n] = 1
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=tt)


def _torch_inputs(spec: EncoderSpec, b: dict) -> dict:
    torch = needs_torch()
    out = {k: torch.tensor(v) for k, v in b.items()}
    if not spec.family.token_types:
        del out["token_type_ids"]  # DistilBERT's forward has no such argument
    return out


def _torch_classifier(case: str, num_labels: int = 3, seed: int = 0):
    """transformers' PyTorch *ForSequenceClassification of the case, eval mode, with a trained-looking head (large
    random weights in every head parameter)."""
    torch = needs_torch()
    import transformers

    model_type, kwargs = _hf_kwargs(case)
    torch.manual_seed(seed)
    cfg = transformers.AutoConfig.for_model(model_type, **kwargs, num_labels=num_labels)
    model = transformers.AutoModelForSequenceClassification.from_config(cfg, attn_implementation="eager").eval()
    prefix = family_of(model_type).prefix
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith(prefix + "."):
                p.normal_(0, 0.5)
    return model


def _ours_logits(model, params, b):
    return np.asarray(model.apply(params, **{k: jnp.asarray(v) for k, v in b.items()}))


@pytest.mark.parametrize("model_type", BERT_LIKE)
def test_config_json_reads_with_the_config_class_defaults(model_type, tmp_path):
    """A sparse config.json (only model_type) gives transformers' class defaults, under each family's key names;
    a full one gives its values; and ours written back reads as the same config in transformers."""
    transformers = pytest.importorskip("transformers")
    family = BertSpec(model_type=model_type).family
    default = transformers.AutoConfig.for_model(model_type)
    spec = ClassifierConfig.from_hf({"model_type": model_type}).backbone
    for field in BertSpec.__dataclass_fields__:
        key = family.hf_key(field)
        if field in ("model_type", *family.unused) or not hasattr(default, key):
            continue
        assert getattr(spec, field) == getattr(default, key), field
    full = transformers.AutoConfig.for_model(model_type, **_hf_kwargs(model_type)[1], num_labels=3)
    full.save_pretrained(tmp_path)
    from flaxclf.hf.config import read_hf_config

    ours = ClassifierConfig.from_hf(read_hf_config(tmp_path))
    back = transformers.AutoConfig.for_model(**ours.to_hf())
    assert type(back) is type(full)
    for key, value in full.to_diff_dict().items():
        if key not in ("transformers_version", "architectures", "torch_dtype", "dtype", "_name_or_path"):
            assert getattr(back, key) == value, key


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("case", CASES)
def test_a_saved_pytorch_classifier_gives_the_same_logits(case, fmt, tmp_path):
    """save_pretrained of the PyTorch class, with a trained-looking head, loaded by flaxclf: logits <= 1e-5 (fp32,
    eval, padding and segments)."""
    torch = needs_torch()
    ref = _torch_classifier(case)
    if fmt == "bin":
        save_pretrained_bin(ref, tmp_path)
    else:
        ref.save_pretrained(tmp_path)
    assert (tmp_path / ("model.safetensors" if fmt == "safetensors" else "pytorch_model.bin")).is_file()
    model, params = from_pretrained(str(tmp_path))
    b = _batch(model.config.backbone)
    with torch.no_grad():
        want = ref(**_torch_inputs(model.config.backbone, b)).logits.numpy()
    assert np.abs(want).max() > 0.1
    print(f"\n{case} {fmt}: logits max abs diff {_max_abs(_ours_logits(model, params, b) - want):.2g}")
    np.testing.assert_allclose(_ours_logits(model, params, b), want, rtol=0, atol=LOGITS_GOAL)


@pytest.mark.parametrize("case", CASES)
def test_loss_and_every_gradient_match_pytorch(case, tmp_path):
    torch = needs_torch()
    ref = _torch_classifier(case, seed=1)
    ref.save_pretrained(tmp_path)
    model, params = from_pretrained(str(tmp_path))
    spec = model.config.backbone
    b = _batch(spec, seed=1)
    labels = np.array([0, 2, 1, 2])
    out = ref(**_torch_inputs(spec, b), labels=torch.tensor(labels))
    out.loss.backward()
    want_grads = {n: p.grad.numpy() for n, p in ref.named_parameters()}

    def loss(p):
        logits = model.apply(p, **{k: jnp.asarray(v) for k, v in b.items()})
        return losses.loss(SINGLE, logits, jnp.asarray(labels))

    value, grads = jax.value_and_grad(loss)(params)
    depth = EMBEDDING_DEPTH + LAYER_DEPTH * _layers(case) + HEAD_DEPTH + LOSS_DEPTH
    loss_diff = abs(float(value) - out.loss.item())
    loss_bound = f32_bound(depth, WIDTH, max(_max_abs(out.logits.detach()), out.loss.item()))
    assert loss_diff <= loss_bound
    got_grads = {}
    for path, g in flatten_dict(grads["params"]).items():
        name, transpose = flax_to_pt(spec.family, path)
        got_grads[name] = np.asarray(g).T if transpose else np.asarray(g)
    assert set(got_grads) == set(want_grads)
    # Per tensor, normwise: the sums behind an embedding row's gradient run in different orders, so an element far
    # below its tensor's largest can differ by more than float32's bound of itself.
    worst, grad_diff = 0.0, 0.0
    for name, want in want_grads.items():
        diff = _max_abs(got_grads[name] - want)
        bound = f32_bound(2 * depth + 1, WIDTH, max(_max_abs(want), _max_abs(want_grads[query_of(name)])))
        assert diff <= bound, (name, diff, bound)
        worst, grad_diff = max(worst, diff / bound), max(grad_diff, diff)
    print(f"\n{case}: loss diff {loss_diff:.2g} (bound {loss_bound:.2g}); gradients max diff {grad_diff:.2g}, "
          f"worst diff / bound {worst:.2g} (bound {f32_bound(2 * depth + 1, WIDTH):.2g} of each tensor's largest)")


@pytest.mark.parametrize("case", CASES)
def test_export_loads_in_pytorch_and_comes_back_bit_exact(case, tmp_path):
    """flaxclf's export: AutoModelForSequenceClassification.from_pretrained with no missing, unexpected or
    mis-shaped keys and the same logits; its save_pretrained back into flaxclf, bit-exact."""
    torch = needs_torch()
    import transformers

    model_type, kwargs = _hf_kwargs(case)
    hf = transformers.AutoConfig.for_model(model_type, **kwargs, num_labels=3).to_dict()
    config = ClassifierConfig.from_hf(hf)
    model = make_classifier(config)
    params = init_params(model, jax.random.PRNGKey(0))
    flat = flatten_dict(params["params"])
    head = ("classifier", config.backbone.family.head_path)
    for i, path in enumerate(sorted(p for p in flat if p[0] in head)):  # a trained-looking head
        flat[path] = 0.5 * jax.random.normal(jax.random.PRNGKey(10 + i), flat[path].shape)
    params = {"params": unflatten_dict(flat)}
    export_hf(tmp_path / "out", config, params, tokenizer_dir=None)
    theirs, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "out", output_loading_info=True, attn_implementation="eager")
    assert type(theirs).__name__ == config.backbone.family.architectures[model_type]
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    b = _batch(config.backbone, seed=2)
    with torch.no_grad():
        want = theirs.eval()(**_torch_inputs(config.backbone, b)).logits.numpy()
    print(f"\n{case} export: logits max abs diff {_max_abs(_ours_logits(model, params, b) - want):.2g}")
    np.testing.assert_allclose(_ours_logits(model, params, b), want, rtol=0, atol=LOGITS_GOAL)
    theirs.save_pretrained(tmp_path / "back")
    _, back = from_pretrained(str(tmp_path / "back"))
    for path, arr in flatten_dict(params["params"]).items():
        np.testing.assert_array_equal(np.asarray(flatten_dict(back["params"])[path]), np.asarray(arr),
                                      err_msg="/".join(path))


# The family's pretraining checkpoint (what a fine-tuning run starts from) and the base model.
PRETRAINING = {"bert": "BertForPreTraining", "roberta": "RobertaForMaskedLM", "xlm-roberta": "XLMRobertaForMaskedLM",
               "camembert": "CamembertForMaskedLM", "electra": "ElectraForPreTraining",
               "distilbert": "DistilBertForMaskedLM", "albert": "AlbertForPreTraining"}


@pytest.mark.parametrize("kind", ["pretraining", "base"])
@pytest.mark.parametrize("model_type", BERT_LIKE)
def test_pretraining_and_base_checkpoints_load_with_only_the_head_new(model_type, kind, tmp_path, caplog):
    """The encoder comes from the checkpoint (same final hidden states as torch's), the other task's head is
    ignored, the classification head alone is new; a checkpoint missing an encoder weight is refused by name."""
    torch = needs_torch()
    import logging

    import transformers
    from safetensors.numpy import load_file, save_file

    cfg = transformers.AutoConfig.for_model(model_type, **CONFIGS[model_type])
    torch.manual_seed(0)
    cls = getattr(transformers, PRETRAINING[model_type]) if kind == "pretraining" else transformers.AutoModel
    ref = (cls(cfg) if kind == "pretraining" else cls.from_config(cfg)).eval()
    ref.save_pretrained(tmp_path)
    with caplog.at_level(logging.INFO, logger="flaxclf"):
        model, params = from_pretrained(str(tmp_path), num_labels=3)
    assert "classifier head initialized fresh" in caplog.text
    spec = model.config.backbone
    b = _batch(spec, seed=3)
    base = ref if kind == "base" else getattr(ref, spec.family.prefix)
    with torch.no_grad():
        want = base(**_torch_inputs(spec, b)).last_hidden_state.numpy()
    got = model.apply(params, **{k: jnp.asarray(v) for k, v in b.items()}, method="encode")
    real = b["attention_mask"].astype(bool)
    # The encoder's output: its layers' matmuls and an embedding projection, at the states' magnitude.
    diff = _max_abs(np.asarray(got)[real] - want[real])
    bound = f32_bound(EMBEDDING_DEPTH + LAYER_DEPTH * _layers(model_type), WIDTH, _max_abs(want[real]))
    print(f"\n{model_type} {kind}: last hidden state max abs diff {diff:.2g} (bound {bound:.2g})")
    assert diff <= bound

    state = load_file(str(tmp_path / "model.safetensors"))
    dropped = sorted(k for k in state if "query" in k or "q_lin" in k)[0]
    del state[dropped]
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightsError, match="missing: bert/encoder/layer/0/attention/self/query"):
        from_pretrained(str(tmp_path), num_labels=3)


@pytest.mark.parametrize("case", CASES)
def test_the_seed_question_each_head_reads_position_zero_alone(case):
    """Perturbing the final hidden states anywhere but position 0 leaves the logits bit-identical (padding and
    real tokens alike); perturbing position 0 moves them. Holds in training mode too, with dropout."""
    pytest.importorskip("transformers")
    import transformers

    model_type, kwargs = _hf_kwargs(case)
    config = ClassifierConfig.from_hf(transformers.AutoConfig.for_model(model_type, **kwargs, num_labels=3).to_dict())
    model = make_classifier(config)
    params = init_params(model, jax.random.PRNGKey(0))
    b = _batch(config.backbone)
    hidden = jax.random.normal(jax.random.PRNGKey(1), (4, 12, config.backbone.hidden_size))
    mask = jnp.asarray(b["attention_mask"])
    for deterministic in (True, False):
        rngs = None if deterministic else {"dropout": jax.random.PRNGKey(2)}

        def logits(h, deterministic=deterministic, rngs=rngs):
            return np.asarray(model.apply(params, h, mask, deterministic=deterministic, method="classify", rngs=rngs))

        base = logits(hidden)
        others = hidden.at[:, 1:].add(jax.random.normal(jax.random.PRNGKey(3), hidden[:, 1:].shape))
        np.testing.assert_array_equal(logits(others), base)
        moved = logits(hidden.at[:, 0].add(1.0))
        assert (np.abs(moved - base).max(-1) > 1e-4).all()


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_no_large_matrix_is_replicated_by_accident(model_type):
    """Under a (2, 2, 2) mesh its encoder's rules shard every matrix of hidden_size^2 elements or more, in every
    family's parameter tree (and so in its optimizer state, which keeps the paths)."""
    pytest.importorskip("transformers")
    import transformers

    from flaxclf.config import MeshConfig
    from flaxclf.models.classifier import dummy_inputs
    from flaxclf.models.registry import encoder_of
    from flaxclf.runtime.sharding import make_mesh, param_specs, path_str

    kwargs = dict(CONFIGS[model_type], vocab_size=512)
    config = ClassifierConfig.from_hf(transformers.AutoConfig.for_model(model_type, **kwargs).to_dict())
    abstract = jax.eval_shape(make_classifier(config).init, jax.random.PRNGKey(0), **dummy_inputs())
    rules = encoder_of(config.backbone).sharding_rules
    specs = param_specs(abstract, make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)), rules)
    large = config.backbone.hidden_size ** 2
    leaves = jax.tree_util.tree_leaves_with_path(abstract)
    spec_of = {path_str(kp): s for kp, s in jax.tree_util.tree_leaves_with_path(
        specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))}
    replicated = [path_str(kp) for kp, x in leaves if x.ndim == 2 and np.prod(x.shape) >= large
                  and spec_of[path_str(kp)] == jax.sharding.PartitionSpec()]
    assert replicated == []


@needs_hf_flax
@pytest.mark.parametrize("model_type", ["bert", "roberta", "xlm-roberta", "electra", "distilbert", "albert"])
def test_a_transformers_flax_checkpoint_loads_to_the_same_logits(model_type, tmp_path):
    """flax_model.msgpack, as transformers 4.x's Flax*ForSequenceClassification saves it."""
    import transformers

    cfg = transformers.AutoConfig.for_model(model_type, **CONFIGS[model_type], num_labels=3)
    ref = transformers.FlaxAutoModelForSequenceClassification.from_config(cfg, seed=4)
    ref.save_pretrained(tmp_path)
    model, params = from_pretrained(str(tmp_path))
    spec = model.config.backbone
    b = _batch(spec, seed=4)
    inputs = {k: v for k, v in b.items() if spec.family.token_types or k != "token_type_ids"}
    want = np.asarray(ref(**inputs, train=False).logits)
    print(f"\n{model_type} flax: logits max abs diff {_max_abs(_ours_logits(model, params, b) - want):.2g}")
    np.testing.assert_allclose(_ours_logits(model, params, b), want, rtol=0, atol=LOGITS_GOAL)


@pytest.mark.parametrize("model_type,key,rate", [
    ("bert", "classifier_dropout", 0.3), ("roberta", "classifier_dropout", 0.3),
    ("distilbert", "seq_classif_dropout", 0.2), ("albert", "classifier_dropout_prob", 0.1)])
def test_the_head_dropout_is_each_familys_own(model_type, key, rate):
    """A classifier built in code (classifier_dropout None) takes the family's rule: hidden_dropout_prob where
    transformers falls back to it, the config class's own default where it has one; config.json carries it."""
    config = ClassifierConfig(backbone=BertSpec(model_type=model_type, hidden_dropout_prob=0.3), num_labels=2)
    assert config.dropout_rate == rate
    assert config.to_hf()[key] == (None if rate == 0.3 else rate)
    assert ClassifierConfig.from_hf(config.to_hf()).dropout_rate == rate


def test_roberta_takes_two_tokens_fewer_than_its_position_table(tmp_path):
    """RoBERTa's positions start at padding_idx + 1: max_position_embeddings 514 holds 512 tokens."""
    import json

    from flaxclf.hf.config import max_positions

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "roberta", "max_position_embeddings": 514}))
    assert max_positions(tmp_path) == 512
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "max_position_embeddings": 512}))
    assert max_positions(tmp_path) == 512


def test_another_model_type_is_refused_naming_those_that_load(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 32}))
    with pytest.raises(WeightsError, match=r"is a 'gpt2' model; flaxclf loads albert, bert, camembert, deberta-v2, "
                                           r"distilbert, electra, modernbert, roberta, xlm-roberta"):
        from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "albert", "inner_group_num": 2}))
    with pytest.raises(WeightsError, match="inner_group_num=2 is not supported"):
        from_pretrained(str(tmp_path))


@pytest.mark.parametrize("model_type", ["roberta", "distilbert"])
def test_a_pooling_override_replaces_the_familys_dense_layer_and_export_refuses_it(model_type, tmp_path):
    """pooling=mean: masked mean -> dropout -> the family's last linear layer; the checkpoint's dense layer is
    left out, and an export, which no PyTorch class could load, is refused in one sentence."""
    spec = BertSpec(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                    max_position_embeddings=66, model_type=model_type)
    config = ClassifierConfig(backbone=spec, num_labels=3)
    export_hf(tmp_path / "clf", config, init_params(make_classifier(config), jax.random.PRNGKey(0)), None)
    model, params = from_pretrained(str(tmp_path / "clf"), pooling="mean")
    assert set(params["params"]) == {"bert", "classifier"}
    b = _batch(spec)
    hidden = model.apply(params, **{k: jnp.asarray(v) for k, v in b.items()}, method="encode")
    logits = _ours_logits(model, params, b)
    m = b["attention_mask"][..., None]
    mean = (np.asarray(hidden) * m).sum(1) / m.sum(1)
    c = params["params"]["classifier"]
    want = mean @ np.asarray(c["kernel"]) + np.asarray(c["bias"])
    # The head by hand in numpy: the mean's sum over positions, the classifier's over the width.
    diff, bound = _max_abs(logits - want), f32_bound(2, spec.hidden_size, _max_abs(want))
    print(f"\n{model_type} mean pooling: logits max abs diff {diff:.2g} (bound {bound:.2g})")
    assert diff <= bound
    arch = spec.family.architectures[model_type]
    with pytest.raises(WeightsError, match=f"pooling='mean' has no PyTorch {arch} equivalent"):
        export_hf(tmp_path / "out", model.config, params, None)
