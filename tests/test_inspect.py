"""`flaxclf inspect` measures what feeds the classifier: behaviour, not implementation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxclf.inference import influence as inspect
from flaxclf.inference.predict import load
from tests.helpers import f32_bound

TEXT = "not bad at all, honestly"
# float32's bound (tests/helpers.py) for the session's tiny BERT (tests/conftest.py: 2 layers, feed-forward 64):
# six matmuls in sequence per layer (the query projection, the scores, the weighted values, the output projection,
# the feed-forward's two), the head's two (the pooler or the pooling's sum, the classifier), over <= 64 terms.
FORWARD_DEPTH, WIDTH = 6 * 2 + 2, 64


@pytest.fixture(scope="module", params=["cls_pooler", "cls", "mean", "max"])
def loaded(request, tiny_model_dir):
    return load(str(tiny_model_dir), pooling=request.param, num_labels=3)


_CACHE = {}


def _measure(loaded):
    """One measurement per model (padded to 16) shared by the tests."""
    key = id(loaded)
    if key not in _CACHE:
        _CACHE[key] = inspect.measure(loaded, TEXT, pad_to=16)
    return _CACHE[key]


@pytest.mark.hf
def test_padding_and_tokens(loaded):
    inf = _measure(loaded)
    n = int(inf.mask.sum())
    assert len(inf.tokens) == 16 and 2 < n < 16
    assert inf.tokens[0] == "[CLS]" and inf.tokens[n - 1] == "[SEP]" and inf.tokens[n:] == ["[PAD]"] * (16 - n)


def test_padding_never_reaches_the_logits(loaded):
    inf = _measure(loaded)
    pad = ~inf.mask.astype(bool)
    assert np.all(inf.moved[pad] == 0.0) and np.all(inf.grad[pad] == 0.0)


@pytest.mark.parametrize("loaded", ["cls_pooler", "cls"], indirect=True)
def test_cls_heads_read_position_0_only(loaded):
    inf = _measure(loaded)
    assert inf.moved[0] > 0 and inf.grad[0] > 0
    assert np.all(inf.moved[1:] == 0.0) and np.all(inf.grad[1:] == 0.0)  # exactly zero, not small
    assert inspect.verdict(loaded.model.config.pooling, inf).startswith("Yes: it classifies on the [CLS] vector")


@pytest.mark.parametrize("loaded", ["mean"], indirect=True)
def test_mean_reads_every_real_position(loaded):
    inf = _measure(loaded)
    real = inf.mask.astype(bool)
    assert np.all(inf.moved[real] > 0) and np.all(inf.grad[real] > 0)
    # d mean / d h_i is the same 1/n for every real position: the Jacobian norms agree, to the rounding of the
    # mean's backward (the mask, / n), and of the norm's sum over the classes' and the width's 3 x 32 terms.
    diff, bound = np.abs(inf.grad[real] - inf.grad[0]).max(), f32_bound(3, 3 * 32, inf.grad[0])
    print(f"\nJacobian norms: max abs diff {diff:.2g} (bound {bound:.2g})")
    assert diff <= bound
    assert inspect.verdict("mean", inf).startswith("No: pooling=mean reads more than position 0")


@pytest.mark.parametrize("loaded", ["cls_pooler", "mean"], indirect=True)
def test_measured_change_matches_a_direct_perturbation(loaded):
    """The table's number for position i equals running the head by hand with h_i moved by the same vector."""
    batch, _ = inspect.encode_text(loaded, TEXT, pad_to=16)
    m, params = loaded.model, loaded.params
    inf = _measure(loaded)
    hidden = m.apply(params, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                     method="encode")
    u = jax.random.normal(jax.random.PRNGKey(0), hidden.shape[1:])
    u = u / jnp.linalg.norm(u, axis=-1, keepdims=True)
    base = m.apply(params, hidden, batch["attention_mask"], method="classify")
    scale = float(jnp.abs(base).max())
    diff, bound = float(np.abs(inf.logits - base[0]).max()), f32_bound(FORWARD_DEPTH, WIDTH, scale)
    print(f"\nlogits: max abs diff {diff:.2g} (bound {bound:.2g})")
    assert diff <= bound
    for i in (0, 2):
        moved = hidden.at[0, i].add(jnp.linalg.norm(hidden[0, i]) * u[i])
        z = m.apply(params, moved, batch["attention_mask"], method="classify")
        # A difference of two logits, each computed from hidden states of its own (the forward's bound) moved by
        # a vector of its own (two norms and a product), at the logits' magnitude.
        diff = abs(float(jnp.abs(z - base).max()) - float(inf.moved[i]))
        bound = f32_bound(FORWARD_DEPTH + 3, WIDTH, scale)
        print(f"moved at {i}: {float(inf.moved[i]):.3g}, max abs diff {diff:.2g} (bound {bound:.2g})")
        assert diff <= bound


def test_architecture_counts_every_parameter(loaded):
    text = inspect.architecture(loaded, 16)
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(loaded.params))
    assert f"total {total:,} params" in text
    assert "classifier: dense 32 -> 3" in text and "hidden [1, 16, 32]" in text
    assert ("pooler: tanh(dense 32 -> 32)" in text) == (loaded.model.config.pooling == "cls_pooler")


def test_table_collapses_silent_padding(loaded):
    inf = _measure(loaded)
    n = int(inf.mask.sum())
    table = inspect.influence_table(inf)
    assert f"{n}-15  [PAD] x{16 - n}" in table
    assert len(table.splitlines()) == 1 + n + 1  # header, one row per real token, one for the padding


@pytest.mark.hf
def test_padding_follows_the_buckets(loaded):
    batch, tokens = inspect.encode_text(loaded, TEXT, pad_to=0)
    assert batch["attention_mask"].all() and "[PAD]" not in tokens
    n = batch["input_ids"].shape[1]
    assert loaded.buckets == [16, 24, 32, 40, 48, 64, 128] and n <= 16  # the default buckets; a short text
    batch, _ = inspect.encode_text(loaded, TEXT)  # default: the smallest training bucket that holds the text
    assert batch["input_ids"].shape == (1, 16)
    batch, _ = inspect.encode_text(loaded, " ".join([TEXT] * 3))  # longer than 16 tokens, no more than 24
    assert 16 < int(batch["attention_mask"].sum()) <= 24 and batch["input_ids"].shape == (1, 24)
