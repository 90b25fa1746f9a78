"""The PyTorch reference: tiny random BertForSequenceClassification models and batches to compare against."""

import numpy as np
import torch
import transformers

TINY = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=64, type_vocab_size=2)


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
    with torch.no_grad():
        out = model(**{k: torch.tensor(v) for k, v in b.items()},
                    labels=None if labels is None else torch.tensor(labels))
    return out.logits.numpy(), (None if out.loss is None else out.loss.item())


def saved_torch_classifier(tmp_path, num_labels=3, problem_type=None, seed=0, **cfg):
    """A PyTorch classifier with a non-trivial (random, large) head, saved with save_pretrained."""
    torch.manual_seed(seed)
    hf = transformers.BertConfig(**{**TINY, **cfg}, num_labels=num_labels, problem_type=problem_type)
    model = transformers.BertForSequenceClassification(hf).eval()
    with torch.no_grad():
        model.classifier.weight.normal_(0, 0.5)
        model.classifier.bias.normal_(0, 0.5)
    model.save_pretrained(tmp_path)
    return model
