"""The references the parity tests compare against: transformers' PyTorch BertForSequenceClassification (torch is
imported only by the tests that use it, so an environment without torch skips them and runs the rest), tiny
checkpoints and batches."""

import numpy as np
import pytest

from flaxclf.options import hf_flax_problem

TINY = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=64, type_vocab_size=2)

# transformers' Flax BERT (model.impl=hf) exists in transformers 4.x only: its tests skip with the refusal's words.
needs_hf_flax = pytest.mark.skipif(hf_flax_problem() is not None, reason=str(hf_flax_problem()))
IMPLS = ["fast", pytest.param("hf", marks=needs_hf_flax)]


def needs_torch():
    """torch, or a skip that says why: PyPI has only a multi-GB CUDA build of torch for some environments."""
    return pytest.importorskip("torch", reason="the PyTorch reference (torch) is not installed in this environment")


def batch(vocab: int, b: int = 4, length: int = 12, seed: int = 0) -> dict[str, np.ndarray]:
    """Ids with padding of different lengths and two segments, as a real pair batch has."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, vocab, (b, length))
    mask = np.ones((b, length), np.int64)
    tt = np.zeros((b, length), np.int64)
    for i in range(b):
        n = length - 3 * i if length - 3 * i > 2 else 2
        mask[i, n:] = 0
        ids[i, n:] = 0
        tt[i, n // 2: n] = 1
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=tt)


def torch_logits(model, b, labels=None):
    torch = needs_torch()
    with torch.no_grad():
        out = model(**{k: torch.tensor(v) for k, v in b.items()},
                    labels=None if labels is None else torch.tensor(labels))
    return out.logits.numpy(), (None if out.loss is None else out.loss.item())


def saved_torch_classifier(tmp_path, num_labels=3, problem_type=None, seed=0, **cfg):
    """A PyTorch classifier with a non-trivial (random, large) head, saved with save_pretrained."""
    torch = needs_torch()
    import transformers

    torch.manual_seed(seed)
    hf = transformers.BertConfig(**{**TINY, **cfg}, num_labels=num_labels, problem_type=problem_type)
    model = transformers.BertForSequenceClassification(hf).eval()
    with torch.no_grad():
        model.classifier.weight.normal_(0, 0.5)
        model.classifier.bias.normal_(0, 0.5)
    model.save_pretrained(tmp_path)
    return model


def saved_classifier(tmp_path, num_labels=3, seed=0):
    """A TINY classifier checkpoint in the Hugging Face format written by flaxclf itself, for the tests that need
    a checkpoint on disk but compare against no PyTorch model."""
    import jax

    from flaxclf.hf.weights import export_hf
    from flaxclf.models.bert import BertClassifier, BertSpec
    from flaxclf.models.classifier import ClassifierConfig, init_params

    config = ClassifierConfig(backbone=BertSpec(**TINY), num_labels=num_labels)
    params = init_params(BertClassifier(config), jax.random.PRNGKey(seed))
    head = params["params"]["classifier"]  # non-trivial, as saved_torch_classifier's
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed + 1))
    head["kernel"] = 0.5 * jax.random.normal(k1, head["kernel"].shape)
    head["bias"] = 0.5 * jax.random.normal(k2, head["bias"].shape)
    export_hf(tmp_path, config, params, tokenizer_dir=None)
    return tmp_path


def save_pretrained_bin(model, folder) -> None:
    """save_pretrained with the weights as pytorch_model.bin (a torch pickle), as older transformers wrote them:
    transformers 5 writes safetensors whatever safe_serialization says."""
    torch = needs_torch()
    import pathlib

    folder = pathlib.Path(folder)
    model.save_pretrained(folder)
    for f in folder.glob("model*.safetensors*"):
        f.unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
