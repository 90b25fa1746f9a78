"""Hugging Face weights in and out: every format, the strict merge, and round trips through PyTorch."""

import json
import logging
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from safetensors.numpy import load_file, save_file

from flaxclf.hf.weights import WeightsError, export_hf, from_pretrained
from tests.torch_ref import (
    TINY,
    batch,
    needs_hf_flax,
    needs_torch,
    save_pretrained_bin,
    saved_classifier,
    saved_torch_classifier,
    torch_logits,
)

# The goal for the logits of a checkpoint loaded from (or exported to) PyTorch, kept as it stands: it is
# above float32's rounding (measured <= 3.5e-6, MiniLM's export) and below helpers.f32_bound for the models' depths.
LOGITS_GOAL = 1e-5


def jnp_batch(vocab=TINY["vocab_size"], **kw):
    return {k: jnp.asarray(v) for k, v in batch(vocab, **kw).items()}


@pytest.mark.hf
@pytest.mark.parametrize("fmt", ["safetensors", "bin", pytest.param("msgpack", marks=needs_hf_flax)])
def test_every_checkpoint_format_loads_to_the_same_logits(tmp_path, fmt):
    ref = saved_torch_classifier(tmp_path / "st")
    if fmt == "bin":
        save_pretrained_bin(ref, tmp_path / fmt)
    elif fmt == "msgpack":
        import transformers

        flax_model = transformers.FlaxBertForSequenceClassification.from_pretrained(tmp_path / "st", from_pt=True)
        flax_model.save_pretrained(tmp_path / fmt)
    folder = tmp_path / ("st" if fmt == "safetensors" else fmt)
    assert {"safetensors": "model.safetensors", "bin": "pytorch_model.bin",
            "msgpack": "flax_model.msgpack"}[fmt] in {p.name for p in folder.iterdir()}
    model, params = from_pretrained(str(folder))
    want, _ = torch_logits(ref, batch(TINY["vocab_size"]))
    got = np.asarray(model.apply(params, **jnp_batch()))
    print(f"\n{fmt}: logits max abs diff {np.abs(got - want).max():.2g} (goal {LOGITS_GOAL:g})")
    np.testing.assert_allclose(got, want, rtol=0, atol=LOGITS_GOAL)


def test_base_bertmodel_checkpoint_gets_a_fresh_head_with_a_notice(minilm_dir, caplog):
    with caplog.at_level(logging.INFO, logger="flaxclf"):
        model, params = from_pretrained(str(minilm_dir), num_labels=4)
    assert "classifier head initialized fresh" in caplog.text
    k = np.asarray(params["params"]["classifier"]["kernel"])
    assert k.shape == (384, 4)
    assert abs(k.std() - 0.02) < 0.003 and not params["params"]["classifier"]["bias"].any()
    # The pooler came from the checkpoint, not from an init.
    pooler = load_file(str(minilm_dir / "model.safetensors"))["pooler.dense.weight"]
    np.testing.assert_array_equal(params["params"]["pooler"]["dense"]["kernel"], pooler.T)


@pytest.mark.hf
def test_label_names_and_problem_type_come_from_the_checkpoint(tmp_path):
    """A config.json as transformers writes it (save_pretrained of a PyTorch model)."""
    torch = needs_torch()
    import transformers

    torch.manual_seed(0)
    hf = transformers.BertConfig(**TINY, num_labels=2, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1},
                                 problem_type="single_label_classification")
    transformers.BertForSequenceClassification(hf).save_pretrained(tmp_path)
    model, _ = from_pretrained(str(tmp_path))
    assert model.config.label_names == ("neg", "pos")
    assert model.config.problem_type == "single_label_classification"


def _drop(tmp_path, name):
    saved_classifier(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state[name]
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})


def test_strict_merge_names_a_missing_encoder_weight(tmp_path):
    _drop(tmp_path, "bert.encoder.layer.1.attention.self.value.weight")
    with pytest.raises(WeightsError, match=re.escape("missing: bert/encoder/layer/1/attention/self/value/kernel")):
        from_pretrained(str(tmp_path))


def test_strict_merge_names_unexpected_and_misshaped(tmp_path):
    saved_classifier(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["bert.encoder.layer.7.output.dense.weight"] = np.zeros((32, 48), np.float32)
    state["bert.embeddings.word_embeddings.weight"] = np.zeros((99, 32), np.float32)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightsError) as e:
        from_pretrained(str(tmp_path))
    assert "unexpected: bert/encoder/layer/7/output/dense/kernel" in str(e.value)
    assert "mis-shaped: bert/embeddings/word_embeddings/embedding (99, 32) != (120, 32)" in str(e.value)


def test_missing_pooler_is_an_error_for_cls_pooler_only(tmp_path):
    _drop(tmp_path, "bert.pooler.dense.weight")
    with pytest.raises(WeightsError, match="missing: pooler/dense/kernel"):
        from_pretrained(str(tmp_path))
    model, params = from_pretrained(str(tmp_path), pooling="mean")
    assert "pooler" not in params["params"]


def test_a_differently_shaped_head_is_replaced(tmp_path):
    saved_classifier(tmp_path, num_labels=3)
    model, params = from_pretrained(str(tmp_path), num_labels=5)
    assert params["params"]["classifier"]["kernel"].shape == (32, 5)
    assert model.config.label_names == ()


def test_no_weights_file_is_one_clear_sentence(tmp_path):
    saved_classifier(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="has no model.safetensors, flax_model.msgpack or pytorch_model.bin"):
        from_pretrained(str(tmp_path))


@pytest.fixture(scope="module")
def minilm_export(minilm_dir, tmp_path_factory):
    """MiniLM with a non-trivial 4-way head, as after fine-tuning, exported: (model, params, folder)."""
    model, params = from_pretrained(str(minilm_dir), label_names=("very negative", "negative", "positive",
                                                                  "very positive"))
    params["params"]["classifier"]["kernel"] = np.asarray(
        jax.random.normal(jax.random.PRNGKey(2), params["params"]["classifier"]["kernel"].shape))
    out = export_hf(tmp_path_factory.mktemp("minilm") / "export", model.config, params, tokenizer_dir=minilm_dir)
    return model, params, out


@pytest.mark.hf
def test_export_loads_in_pytorch_with_no_missing_keys_and_same_logits(minilm_export):
    needs_torch()
    import transformers

    model, params, out = minilm_export
    ref, info = transformers.BertForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]  # lists or sets
    b = batch(30522, length=20, seed=4)
    want, _ = torch_logits(ref.eval(), b)
    got = np.asarray(model.apply(params, **{k: jnp.asarray(v) for k, v in b.items()}))
    assert np.abs(want).max() > 0.1
    print(f"\nMiniLM export: logits max abs diff {np.abs(got - want).max():.2g} (goal {LOGITS_GOAL:g})")
    np.testing.assert_allclose(got, want, rtol=0, atol=LOGITS_GOAL)


@pytest.mark.hf
def test_export_round_trips_bit_for_bit_with_its_tokenizer(minilm_export):
    """The exported folder: the config transformers reads, the tokenizer, and the params back into flaxclf."""
    from flaxclf.data.tokens import load_tokenizer

    model, params, out = minilm_export
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["BertForSequenceClassification"] and cfg["num_labels"] == 4
    assert cfg["id2label"]["0"] == "very negative" and cfg["label2id"]["very positive"] == 3
    assert {"vocab.txt", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    model2, params2 = from_pretrained(str(out))
    assert model2.config == model.config
    for (p, a), b2 in zip(flatten_dict(params).items(), jax.tree.leaves(params2), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b2), err_msg=str(p))
    assert load_tokenizer(out, 32).encode("a fine film").ids[0] == 101


@pytest.mark.hf
def test_export_tokenizer_loads_in_transformers(minilm_export):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed in this environment")
    assert transformers.AutoTokenizer.from_pretrained(minilm_export[2])("a fine film")["input_ids"][0] == 101


def test_export_refuses_poolings_pytorch_does_not_have(minilm_dir, tmp_path):
    model, params = from_pretrained(str(minilm_dir), num_labels=2, pooling="mean")
    with pytest.raises(WeightsError, match="needs pooling=cls_pooler"):
        export_hf(tmp_path / "x", model.config, params, None)
    assert not Path(tmp_path / "x").exists()


def test_param_dtype_casts_storage(tmp_path):
    saved_classifier(tmp_path)
    _, params = from_pretrained(str(tmp_path), param_dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
