"""The NNX face: the same classifier as the linen module (identical logits, same parameters), trainable with
nnx.Optimizer, exported through the same path; and the README's NNX snippet runs as written."""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from safetensors.numpy import load_file

from flaxclf.hf.weights import export_hf, from_pretrained
from flaxclf.models.bert import BertClassifier
from flaxclf.nnx import export_nnx, nnx_from_pretrained, params_of, to_nnx
from tests.helpers import f32_bound

README = Path(__file__).resolve().parents[1] / "README.md"
# The session's tiny BERT (tests/conftest.py: 2 layers, feed-forward 64) computed by the linen and the nnx module:
# float32's bound (tests/helpers.py) for six matmuls in sequence per layer (the query projection, the scores, the
# weighted values, the output projection, the feed-forward's two) and the head's two, over at most 64 terms.
FORWARD_DEPTH, WIDTH = 6 * 2 + 2, 64


def _batch():
    ids = jnp.array([[101, 1037, 21006, 2143, 102, 0], [101, 2307, 102, 0, 0, 0]], jnp.int32)
    return ids, (ids > 0).astype(jnp.int32), jnp.zeros_like(ids)


def test_nnx_logits_equal_the_linen_module(tiny_model_dir):
    model, params = from_pretrained(str(tiny_model_dir), num_labels=3)
    _, clf = nnx_from_pretrained(str(tiny_model_dir), num_labels=3)
    ids, mask, types = _batch()
    np.testing.assert_array_equal(np.asarray(clf(ids, mask, types)), np.asarray(model.apply(params, ids, mask, types)))
    same = jax.tree.map(np.array_equal, params_of(clf), jax.device_get(params))
    assert all(jax.tree.leaves(same))


def test_one_nnx_optimizer_step_lowers_the_loss_and_exports_like_linen(tiny_model_dir, tmp_path):
    model, params = from_pretrained(str(tiny_model_dir), num_labels=3)
    clf = to_nnx(model, params)
    ids, mask, types = _batch()
    labels = jnp.array([2, 0])
    optimizer = nnx.Optimizer(clf, optax.adamw(1e-2), wrt=nnx.Param)

    def loss_fn(clf):
        z = clf(ids, mask, types)  # eval mode: the loss before and after is the same function
        return optax.softmax_cross_entropy_with_integer_labels(z, labels).mean()

    @nnx.jit
    def step(clf, optimizer):
        loss, grads = nnx.value_and_grad(loss_fn)(clf)
        optimizer.update(clf, grads)
        return loss

    before = float(step(clf, optimizer))
    after = float(loss_fn(clf))
    assert after < before
    # The NNX weights export through the linen path: the same folder as the linen module with those params.
    out = export_nnx(tmp_path / "nnx", model, clf, tiny_model_dir)
    ref = export_hf(tmp_path / "linen", model.config, jax.device_get(params_of(clf)), tiny_model_dir)
    a, b = load_file(str(out / "model.safetensors")), load_file(str(ref / "model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    reloaded, p2 = from_pretrained(str(out))
    want = np.asarray(clf(ids, mask, types))
    diff = float(np.abs(np.asarray(reloaded.apply(p2, ids, mask, types)) - want).max())
    bound = f32_bound(FORWARD_DEPTH, WIDTH, float(np.abs(want).max()))
    print(f"\nlinen from the NNX export vs NNX: logits max abs diff {diff:.2g} (bound {bound:.2g})")
    assert diff <= bound
    assert isinstance(reloaded, BertClassifier)


def test_readme_nnx_snippet_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    snippet = next(b for b in blocks if "nnx_from_pretrained" in b)
    namespace: dict = {}
    exec(compile(snippet, str(README), "exec"), namespace)
    assert namespace["logits"].shape == (1, 4) and np.isfinite(float(namespace["loss"]))
