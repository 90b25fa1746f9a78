"""LoRA (model.lora): peft's adapters in both directions for every family, what is trained and what is frozen (no
gradient, no optimizer state, no weight-gradient matmul for the frozen weights), the sharded step against one
device, and the refusals. The kill -9 journey runs with LoRA on (tests/test_checkpoint.py)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from flaxclf.config import ConfigError, LoraConfig, MeshConfig, OptimConfig, load_config
from flaxclf.hf import peft as fpeft
from flaxclf.hf import weights
from flaxclf.hf.weights import WeightsError
from flaxclf.models.bert import BertSpec
from flaxclf.models.bert.families import decays as bert_decays
from flaxclf.models.classifier import ClassifierConfig, init_params, make_classifier
from flaxclf.models.registry import family_of
from flaxclf.nn import lora
from flaxclf.options import SINGLE
from flaxclf.runtime import sharding
from flaxclf.training import steps
from flaxclf.training.optim import make_optimizer
from tests.helpers import flaxclf, refused
from tests.test_families import CONFIGS, _batch, _torch_inputs
from tests.torch_ref import needs_torch

# The goal for logits across flaxclf and peft, as for the plain exports (tests/test_families.py).
LOGITS_GOAL = 1e-5


def needs_peft():
    needs_torch()
    return pytest.importorskip("peft", reason="peft (the PyTorch reference for adapters) is not installed here")


def _max_abs(x) -> float:
    return float(np.max(np.abs(np.asarray(x, np.float64)), initial=0.0))


def _trained_looking(variables: dict, spec: lora.LoraSpec, seed: int) -> dict:
    """Every trained leaf random and large (a fresh adapter's B is zero: it would change nothing)."""
    flat = flatten_dict(variables["params"])
    for i, path in enumerate(sorted(p for p in flat if spec.trains(p))):
        flat[path] = np.asarray(0.3 * jax.random.normal(jax.random.PRNGKey(seed + i), flat[path].shape))
    return {**variables, "params": unflatten_dict(flat)}


def _base(model_type: str, folder):
    """A base model of the family (AutoModel: no classification head), saved as a user downloads one."""
    torch = needs_torch()
    import transformers

    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(model_type, **CONFIGS[model_type])
    transformers.AutoModel.from_config(cfg).save_pretrained(folder)
    return folder


def _theirs(folder, num_labels: int = 3):
    import transformers

    return transformers.AutoModelForSequenceClassification.from_pretrained(
        folder, num_labels=num_labels, attn_implementation="eager").eval()


@pytest.mark.hf
@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_adapters_cross_between_flaxclf_and_peft(model_type, tmp_path):
    """flaxclf's adapter, loaded by PeftModel.from_pretrained on the base, gives flaxclf's logits; an adapter that
    peft trains (get_peft_model, the family's default targets, its head modules saved) loads into flaxclf with
    peft's logits; both adapters hold the same tensor names."""
    torch = needs_torch()
    peft = needs_peft()
    base = _base(model_type, tmp_path / "base")
    family = family_of(model_type)

    plain, _ = weights.from_pretrained(str(base), num_labels=3)
    _, new_head = weights.load_base(plain, base, jax.random.PRNGKey(0))
    model = fpeft.with_lora(plain, LoraConfig(rank=4, alpha=16), new_head)
    params = _trained_looking(weights.load_params(model, base, jax.random.PRNGKey(0)), model.config.lora, 1)
    fpeft.export_adapter(tmp_path / "ours", model.config, params, str(base))
    b = _batch(model.config.backbone, seed=2)
    ours = np.asarray(model.apply(params, **{k: jnp.asarray(v) for k, v in b.items()}))
    loaded = peft.PeftModel.from_pretrained(_theirs(base), tmp_path / "ours").eval()
    with torch.no_grad():
        want = loaded(**_torch_inputs(model.config.backbone, b)).logits.numpy()
    print(f"\n{model_type} flaxclf -> peft: logits max abs diff {_max_abs(ours - want):.2g}")
    np.testing.assert_allclose(ours, want, rtol=0, atol=LOGITS_GOAL)

    extra = fpeft.saved_modules(model.config, params)[1:]  # the head modules the base lacks
    torch.manual_seed(1)
    trained = peft.get_peft_model(_theirs(base), peft.LoraConfig(
        task_type=peft.TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules=list(family.lora_targets),
        modules_to_save=extra or None))
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    trained.save_pretrained(tmp_path / "theirs")
    back, back_params, _ = fpeft.load(tmp_path / "theirs", base=str(base))
    with torch.no_grad():
        want = trained.eval()(**_torch_inputs(model.config.backbone, b)).logits.numpy()
    got = np.asarray(back.apply(back_params, **{k: jnp.asarray(v) for k, v in b.items()}))
    print(f"{model_type} peft -> flaxclf: logits max abs diff {_max_abs(got - want):.2g}")
    np.testing.assert_allclose(got, want, rtol=0, atol=LOGITS_GOAL)
    from safetensors.numpy import load_file

    assert (load_file(str(tmp_path / "ours" / "adapter_model.safetensors")).keys()
            == load_file(str(tmp_path / "theirs" / "adapter_model.safetensors")).keys())
    assert back.config.lora.modules == model.config.lora.modules and back.config.lora.save == model.config.lora.save


@pytest.mark.hf
def test_what_is_trained_is_what_peft_trains(tmp_path):
    """On a BERT base (its pooler pretrained): the adapter's matrices and the classifier, as peft's
    requires_grad says; the pooler stays frozen."""
    needs_peft()
    import peft

    base = _base("bert", tmp_path / "base")
    plain, _ = weights.from_pretrained(str(base), num_labels=3)
    model = fpeft.with_lora(plain, LoraConfig(rank=4), weights.load_base(plain, base, jax.random.PRNGKey(0))[1])
    params = weights.load_params(model, base, jax.random.PRNGKey(0))
    ours = set(fpeft.adapter_state(model.config, params))
    theirs = peft.get_peft_model(_theirs(base), peft.LoraConfig(task_type=peft.TaskType.SEQ_CLS, r=4))
    want = {re.sub(r"\.(default|modules_to_save\.default)\.", ".", n)
            for n, p in theirs.named_parameters() if p.requires_grad}
    assert ours == want
    assert not any("pooler" in n for n in ours)


# ---------------------------------------------------------------------------------------------- frozen is free
_SPEC = BertSpec(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                 max_position_embeddings=64, type_vocab_size=2)


def _step_hlo(model, b: int = 2, length: int = 20) -> tuple[str, steps.TrainState]:
    """The compiled train step's HLO on one device, and its abstract state."""
    tx = make_optimizer(OptimConfig(), 10, bert_decays)
    mesh = sharding.make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    abstract = steps.abstract_state(model, tx, jnp.float32)
    shardings = steps.state_shardings(abstract, mesh, model)
    train, _ = steps.compile_steps(model, tx, SINGLE, 1, mesh, shardings)
    i32, f32 = jax.ShapeDtypeStruct((b, length), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.float32)
    batch = dict(input_ids=i32, attention_mask=i32, token_type_ids=i32, labels=jax.ShapeDtypeStruct((b,), jnp.int32),
                 weight=f32)
    return train.lower(abstract, batch).compile().as_text(), abstract


def _results(hlo: str, op: str) -> set[tuple[int, ...]]:
    """The result shapes of every `op` instruction (dot, scatter) in an HLO module's text."""
    shapes = re.findall(rf"= f32\[([\d,]*)\]\S* {op}\(", hlo)
    return {tuple(int(d) for d in s.split(",") if d) for s in shapes}


def test_frozen_weights_get_no_gradient_no_optimizer_state_and_no_weight_gradient_matmul():
    """The full fine-tuning step computes a weight-gradient matmul for each dense kernel ([in, out]) and scatters
    into the word embeddings; the LoRA step (query and value, r = 4) computes none of them, and its optimizer
    holds moments for the adapter's matrices and the classifier alone."""
    config = ClassifierConfig(backbone=_SPEC, num_labels=3, problem_type=SINGLE)
    plain = make_classifier(config)
    abstract_plain = jax.eval_shape(plain.init, jax.random.PRNGKey(0), input_ids=jnp.zeros((1, 8), jnp.int32),
                                    attention_mask=jnp.ones((1, 8), jnp.int32))
    spec = fpeft.resolve(LoraConfig(rank=4), config, abstract_plain, ())
    adapted = make_classifier(config.replace(lora=spec))
    kernels = {(32, 32), (32, 48), (48, 32)}  # every frozen dense kernel's shape (the pooler's is 32 x 32)
    full, _ = _step_hlo(plain)
    assert kernels <= _results(full, "dot") and (120, 32) in _results(full, "scatter")  # the check bites
    hlo, abstract = _step_hlo(adapted)
    assert not kernels & _results(hlo, "dot"), kernels & _results(hlo, "dot")
    assert (120, 32) not in _results(hlo, "scatter")
    assert {(32, 4), (4, 32)} <= _results(hlo, "dot")  # the adapter's own gradients
    adam = [s for s in jax.tree.leaves(abstract.opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)][0]
    moments = {"/".join(p) for p in flatten_dict(adam.mu["params"])}
    assert moments == {*(f"bert/encoder/layer/{i}/attention/self/{m}/lora_{x}" for i in range(2)
                         for m in ("query", "value") for x in "AB"), "classifier/kernel", "classifier/bias"}


# ---------------------------------------------------------------------------------------------- sharding
@pytest.mark.parametrize("family", ["bert", "modernbert"])
def test_lora_sharded_step_equals_single_device(family):
    """Three LoRA steps (dropout on, LoRA's too) on a (2, 2, 2) mesh give the single-device losses and parameters;
    A and B split as their kernel's rule says; the frozen weights stay bit-exact. ModernBERT: its fused Wqkv
    adapted whole, inside the remat scan over stacked layers."""
    from tests.test_steps import NUM_LABELS, _assert_same_run, _batches, _max_diff, _mesh, _train

    if family == "bert":
        backbone = BertSpec(**{**_SPEC.__dict__, "vocab_size": 30522, "hidden_dropout_prob": 0.1,
                               "attention_probs_dropout_prob": 0.1})
        kernel = "bert/encoder/layer/1/attention/self/query"
    else:
        from flaxclf.models.modernbert import ModernBertSpec

        backbone = ModernBertSpec(vocab_size=30522, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                  num_attention_heads=4, global_attn_every_n_layers=2, local_attention=8,
                                  max_position_embeddings=64, pad_token_id=0, attention_bias=True,
                                  attention_dropout=0.1, mlp_dropout=0.1)
        kernel = "model/layers/1/attn/Wqkv"
    config = ClassifierConfig(backbone=backbone, num_labels=NUM_LABELS, problem_type=SINGLE)
    plain = make_classifier(config, remat=family == "modernbert")
    abstract = jax.eval_shape(plain.init, jax.random.PRNGKey(0), input_ids=jnp.zeros((1, 8), jnp.int32),
                              attention_mask=jnp.ones((1, 8), jnp.int32))
    spec = fpeft.resolve(LoraConfig(rank=4, alpha=8, dropout=0.1), config, abstract, ())
    model = make_classifier(config.replace(lora=spec), remat=family == "modernbert")
    host = jax.device_get(_trained_looking(init_params(model, jax.random.PRNGKey(0)), spec, 3))
    train = lambda mesh: _train(model, host, mesh, _batches(3, 16))  # noqa: E731
    ref_losses, ref_state, _, nus = train(_mesh((1, 1, 1)))
    losses, state, specs, _ = train(_mesh((2, 2, 2)))
    _assert_same_run(f"{family} lora", backbone.num_hidden_layers, 16 * 16,
                     (ref_losses, lora.split(ref_state.params, spec)[0], nus), losses,
                     lora.split(state.params, spec)[0])
    trained, frozen = lora.split(jax.device_get(state.params), spec)
    assert _max_diff(trained, lora.split(host, spec)[0]) > 1e-3
    for path, x in flatten_dict(frozen).items():
        np.testing.assert_array_equal(x, flatten_dict(host)[path], err_msg="/".join(path))
    P = jax.sharding.PartitionSpec
    assert specs[f"params/params/{kernel}/kernel"][0] == P("fsdp", "tensor")
    assert specs[f"params/params/{kernel}/lora_A"][0] == P("fsdp")
    assert specs[f"params/params/{kernel}/lora_B"][0] == P(None, "tensor")


# ---------------------------------------------------------------------------------------------- refusals
def test_bad_lora_settings_are_refused_in_one_line():
    config = ClassifierConfig(backbone=_SPEC, num_labels=3)
    abstract = jax.eval_shape(make_classifier(config).init, jax.random.PRNGKey(0),
                              input_ids=jnp.zeros((1, 8), jnp.int32), attention_mask=jnp.ones((1, 8), jnp.int32))
    with pytest.raises(WeightsError, match=r"'qkv' matches no layer of this bert model; its layers are named "
                                           r"dense, key, query, value"):
        fpeft.resolve(LoraConfig(rank=4, targets=["qkv"]), config, abstract, ())
    with pytest.raises(WeightsError, match=r"rank: 40 is larger than layer bert.encoder.layer.0.attention.self.query "
                                           r"\(32 x 32\) allows; use at most 32"):
        fpeft.resolve(LoraConfig(rank=40), config, abstract, ())
    for value, words in (("0", "must be >= 1"), ("-2", "must be >= 1")):
        with pytest.raises(ConfigError, match=f"model.lora.rank: {value} {words}"):
            load_config(None, [f"model.lora.rank={value}"])
    with pytest.raises(ConfigError, match="model.impl=hf"):
        load_config(None, ["model.lora.rank=4", "model.impl=hf", "data.packing=off"])


def test_an_adapter_made_for_another_model_is_refused_naming_what_differs(tmp_path):
    """A BERT adapter of width 32 on a base of width 48: refused, naming the mis-shaped tensors."""
    needs_torch()
    base = _base("bert", tmp_path / "base")
    plain, _ = weights.from_pretrained(str(base), num_labels=3)
    model = fpeft.with_lora(plain, LoraConfig(rank=4), ())
    fpeft.export_adapter(tmp_path / "ad", model.config, weights.load_params(model, base, jax.random.PRNGKey(0)),
                         str(base))
    import transformers

    wider = dict(CONFIGS["bert"], hidden_size=48, intermediate_size=64)
    transformers.AutoModel.from_config(transformers.AutoConfig.for_model("bert", **wider)).save_pretrained(
        tmp_path / "wider")
    with pytest.raises(WeightsError, match=r"does not fit the base model \(bert, 3 labels\): "
                                           r"bert.encoder.layer.0.attention.self.query.lora_A.weight "
                                           r"\(4, 32\) != \(4, 48\)"):
        fpeft.load(tmp_path / "ad", base=str(tmp_path / "wider"))


@pytest.mark.journey
def test_the_command_refuses_a_target_that_matches_nothing_and_an_adapter_export_without_lora(tiny_run, tmp_path,
                                                                                             tiny_model_dir):
    from tests.helpers import train_args

    p = flaxclf(*train_args(tiny_model_dir, tmp_path / "run", "model.lora.rank=4", "model.lora.targets=[attn]"))
    refused(p, "train", "'attn' matches no layer of this bert model; its layers are named dense, key, query, value")
    assert not (tmp_path / "run" / "checkpoints").exists()
    p = flaxclf("export", tiny_run, tmp_path / "out", "--adapter")
    refused(p, "export", "was trained without LoRA (model.lora.rank null), so it has no adapter")
    assert not (tmp_path / "out").exists()
