"""Packing (data.packing=on): each text's logits, the loss and every gradient of a packed batch against the same
texts unpacked, for every family; the packer, the row counts and the batches against the unpacked iterator; the
main job's padding and shapes."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from flaxclf import assets, data
from flaxclf.config import DataConfig
from flaxclf.data import packing
from flaxclf.data.packing import per_text
from flaxclf.models.classifier import ClassifierConfig, init_params, make_classifier
from flaxclf.models.modernbert.spec import AttentionImpl
from flaxclf.options import SINGLE, hf_flax_problem
from flaxclf.training import losses
from flaxclf.training.steps import logits as step_logits
from tests.helpers import f32_bound, query_of
from tests.test_families import CASES, EMBEDDING_DEPTH, HEAD_DEPTH, LAYER_DEPTH, LOSS_DEPTH, _hf_kwargs, _layers

# ---------------------------------------------------------------------------------------------- exactness
LENGTHS = (5, 9, 3, 12, 7, 2, 16, 4)  # eight texts; the packer puts them in rows of ROW tokens
ROW = 20
# Both sides are flaxclf's own fp32 math; what differs is each row's width and layout (the keys a softmax sums
# over: padding and the other texts' keys get weight exactly 0), so the bound is f32_bound's, with n the longest
# reduction: the feed-forward width (48) or a weight gradient's sum over the batch's tokens (58 real ones, the
# padding of the wider side included: 8 x 20).
N = 8 * ROW


def _poolings(model_type: str) -> list[str]:
    return ["cls", "mean"] if model_type == "modernbert" else ["cls_pooler", "cls", "mean", "max"]


def _config(case: str, pooling: str) -> ClassifierConfig:
    model_type, kwargs = _hf_kwargs(case)
    hf = {"model_type": model_type, **kwargs, "num_labels": 3}
    if model_type == "modernbert":
        cfg = ClassifierConfig.from_hf(hf)
        return cfg.replace(backbone=dataclasses.replace(cfg.backbone, classifier_pooling=pooling))
    return ClassifierConfig.from_hf(hf, pooling=pooling)


def _texts(cfg: ClassifierConfig, seed: int = 0):
    """Eight texts (a first token, random ids, two token types where the family has them) and their labels."""
    rng = np.random.default_rng(seed)
    spec = cfg.backbone
    two_types = spec.family.token_types and getattr(spec, "type_vocab_size", 1) > 1
    texts = [np.concatenate([[3], rng.integers(5, spec.vocab_size, n - 1)]) for n in LENGTHS]
    types = [np.where(np.arange(n) >= n // 2, 1, 0) if two_types else np.zeros(n, int) for n in LENGTHS]
    return texts, types, rng.integers(0, 3, len(LENGTHS)).astype(np.int32)


def _split(texts, types, labels, max_length: int) -> data.TokenizedSplit:
    offsets = np.concatenate([[0], np.cumsum([len(t) for t in texts])])
    return data.TokenizedSplit("train", np.concatenate(texts).astype(np.int32), np.concatenate(types).astype(np.int8),
                               offsets, labels, np.arange(len(texts)), len(texts), max_length, 0, 1)


def _unpacked(split: data.TokenizedSplit, pad: int, length: int) -> dict:
    batch = data.batches._host_batch(split, np.arange(len(split)), length, len(split))
    batch["input_ids"] = np.where(batch["attention_mask"] > 0, batch["input_ids"], pad).astype(np.int32)
    return batch


def _packed(split: data.TokenizedSplit, pad: int) -> tuple[dict, np.ndarray]:
    rows = packing.pack(split.lengths, ROW)
    slots = packing.slots(rows, len(rows), max(map(len, rows)))
    batch = packing.host_batch(split, slots, ROW)
    batch["input_ids"] = np.where(batch["attention_mask"] > 0, batch["input_ids"], pad).astype(np.int32)
    return batch, slots


def _trained_looking(params: dict, seed: int) -> dict:
    """Large random weights in every head parameter, as in tests/test_families.py (an initial head's logits are
    too small to tell a wrong text from a right one)."""
    flat = flatten_dict(params)
    rng = np.random.default_rng(seed)
    head = ("pooler", "classifier", "head", "dense")
    out = {k: (jnp.asarray(rng.normal(0, 0.5, v.shape), v.dtype) if any(h in k[1:2] for h in head) else v)
           for k, v in flat.items()}
    return unflatten_dict(out)


@pytest.mark.parametrize("case,pooling", [(c, p) for c in CASES for p in _poolings(_hf_kwargs(c)[0])])
def test_a_packed_batch_gives_each_text_its_own_logits_loss_and_gradients(case, pooling):
    cfg = _config(case, pooling)
    # ModernBERT: blocks of 8 queries in its global layers and banded local ones (a 20-token row is > 3 x 4).
    model = make_classifier(cfg) if cfg.backbone.model_type != "modernbert" else \
        cfg.encoder.make(cfg, dtype=jnp.float32, remat=False, impl="fast", attention=AttentionImpl(global_chunk=8))
    params = _trained_looking(init_params(model, jax.random.PRNGKey(0)), 1)
    texts, types, labels = _texts(cfg)
    split = _split(texts, types, labels, ROW)
    pad = cfg.backbone.pad_token_id
    unpacked = _unpacked(split, pad, max(LENGTHS))
    packed, slots = _packed(split, pad)
    assert len(slots) < len(LENGTHS) and slots.shape[1] >= 2  # rows really hold several texts

    want = np.asarray(step_logits(params, unpacked, model))
    got = np.asarray(step_logits(params, packed, model))[(slots >= 0).ravel()]
    got = got[np.argsort(slots[slots >= 0])]  # back in text order
    depth = EMBEDDING_DEPTH + LAYER_DEPTH * _layers(case) + HEAD_DEPTH
    assert np.abs(got - want).max() <= 1e-5, np.abs(got - want).max()  # the goal for a text's logits
    assert np.abs(want).max() > 0.1  # the head is not near zero

    def loss_and_grads(batch):
        def f(p):
            z = step_logits(p, batch, model)
            return losses.loss(SINGLE, z, per_text(jnp.asarray(batch["labels"]), batch),
                               per_text(jnp.asarray(batch["weight"]), batch))
        return jax.value_and_grad(f)(params)

    (l_want, g_want), (l_got, g_got) = loss_and_grads(unpacked), loss_and_grads(packed)
    assert abs(float(l_got) - float(l_want)) <= f32_bound(depth + LOSS_DEPTH, N, abs(float(l_want)) + 1.0)
    worst = 0.0
    for path, w in flatten_dict(g_want).items():
        g = flatten_dict(g_got)[path]
        scale = float(np.abs(np.asarray(w)).max(initial=0.0))
        query = tuple(query_of("/".join(path)).split("/"))  # a key bias: at its query bias's scale
        scale = max(scale, float(np.abs(np.asarray(flatten_dict(g_want)[query])).max()))
        bound = f32_bound(2 * depth + LOSS_DEPTH, N, max(scale, 1e-30))
        diff = float(np.abs(np.asarray(g, np.float64) - np.asarray(w, np.float64)).max(initial=0.0))
        worst = max(worst, diff / bound)
        assert diff <= bound, (path, diff, bound)
    print(f"{case} {pooling}: logits max diff {np.abs(got - want).max():.2g}, worst gradient diff / bound "
          f"{worst:.2g}")


def test_packed_positions_and_starts_restart_at_each_text():
    from flaxclf.nn import segments

    seg = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    assert segments.positions(seg).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2], list(range(8))]
    assert segments.first_positions(seg, 3).tolist() == [[0, 3, 5], [0, 0, 0]]
    ids = jnp.asarray([[5, 6, 1, 5, 6, 5, 1, 1], [5] * 8])  # RoBERTa: pad (1) inside a text is not counted
    real = ids != 1
    assert (segments.positions(seg, real) * real + 1).tolist() == [[2, 3, 1, 2, 3, 2, 1, 1],
                                                                   list(range(2, 10))]


# ---------------------------------------------------------------------------------------------- the packer
def test_best_fit_decreasing_places_every_text_once_within_a_row():
    rng = np.random.default_rng(0)
    for _ in range(50):
        lengths = rng.integers(2, 65, rng.integers(1, 80))
        rows = packing.pack(lengths, 64)
        placed = sorted(i for r in rows for i in r)
        assert placed == list(range(len(lengths)))
        assert all(lengths[r].sum() <= 64 for r in rows)
        assert len(rows) <= max(1, -(-int(lengths.sum()) * 11 // 9 // 64) + 1)  # BFD: within 11/9 OPT + 1
        assert rows == packing.pack(lengths, 64)  # deterministic
    with pytest.raises(ValueError, match="does not fit a row of 8"):
        packing.pack([3, 9], 8)


def test_a_row_fits_the_longest_text_unless_data_packing_length_fixes_it():
    from flaxclf.config import ConfigError, load_config

    assert [packing.row_length(n, 128, None, "train") for n in (1, 16, 17, 79, 120, 128)] == [16, 16, 32, 80, 128, 128]
    assert packing.row_length(79, 128, 100, "train") == 100  # set: kept, whatever the data
    with pytest.raises(data.DataError) as e:
        packing.row_length(79, 128, 64, "train")
    assert str(e.value) == ("the train split has a text of 79 tokens, longer than a packed row of data.packing_length "
                            "64; raise data.packing_length to 79 or more, or set it to null to fit the rows to the "
                            "texts")
    with pytest.raises(ConfigError, match=r"^data.packing_length: 200 must be in \[1, data.max_length 128\], or null"):
        load_config(None, ["data.packing_length=200"])
    assert load_config(None, ["data.packing_length=96"]).data.packing_length == 96


def test_the_row_counts_chosen_pad_the_fewest_rows():
    rng = np.random.default_rng(1)
    for _ in range(30):
        needs = rng.integers(1, 12, rng.integers(1, 40))
        k = int(rng.integers(1, 5))
        chosen = packing.choose_shapes(needs, k)
        values = sorted(set(needs.tolist()))

        def cost(shapes, needs=needs):
            s = np.asarray(sorted(shapes))
            return int(s[np.searchsorted(s, needs)].sum())
        best = min(cost(c + (values[-1],)) for n in range(min(k, len(values)))
                   for c in itertools.combinations(values[:-1], n))
        assert len(chosen) <= k and max(chosen) == max(values) and cost(chosen) == best


# ---------------------------------------------------------------------------------------------- batches
@pytest.fixture(scope="module")
def rt128(minilm_dir, tmp_path_factory):
    """The main job's training split: rt-snippets-4way at max_length 128."""
    assets.resolve_task("rt-snippets-4way")
    cfg = DataConfig(cache_dir=str(tmp_path_factory.mktemp("rt128-cache")))
    return data.load_task(cfg, minilm_dir)[1]


def test_packed_batches_hold_the_texts_of_unpacked_batches_with_one_bucket(rt128):
    split = rt128["train"]
    packed = data.TrainBatches(split, 32, [16, 32], seed=0, sharding=None, prefetch=0, packing_shapes=4)
    packed.plan_packing(2 * packed.steps_per_epoch)
    plain = data.TrainBatches(split, 32, [split.max_length], seed=0, sharding=None, prefetch=0)
    assert split.lengths.max() == 79 and packed.row_length == 80  # the longest text, rounded up to 16s
    for step in range(packed.steps_per_epoch + 3):  # into the second epoch
        a, b = next(packed), next(plain)
        filled = a["weight"] > 0
        assert filled.sum() == 32 and a["input_ids"].shape == (a["weight"].shape[0], 80)
        assert a["weight"].shape[0] in packed.lengths(2 * packed.steps_per_epoch)
        # Each text slot's tokens and token types are the text's own, in order; segments are contiguous runs.
        texts = []
        for r in range(len(a["weight"])):
            seg = a["attention_mask"][r]
            assert (np.diff(seg[seg > 0]) >= 0).all() and (seg[np.argmax(seg == 0):] == 0).all() or seg.all()
            for s in range(int(filled[r].sum())):
                on = seg == s + 1
                texts.append((tuple(a["input_ids"][r][on]), int(a["labels"][r, s])))
        want = [(tuple(b["input_ids"][i][b["attention_mask"][i] > 0]), int(b["labels"][i])) for i in range(32)]
        assert sorted(texts) == sorted(want), step


def test_the_main_job_pads_at_most_a_tenth_in_three_train_shapes_and_one_eval_shape(rt128):
    split = rt128["train"]
    it = data.TrainBatches(split, 32, [128], seed=0, sharding=None, prefetch=0,
                           packing_shapes=DataConfig().packing_shapes)
    total = 3 * it.steps_per_epoch
    it.plan_packing(total)
    shapes = it.lengths(total)
    ratio = it.padded_tokens(total) / split.lengths.mean()
    print(f"train row counts {shapes}, segments {it.segments}, tokens per text {it.padded_tokens(total):.2f} against "
          f"{split.lengths.mean():.2f} real ({ratio:.3f}x)")
    assert len(shapes) <= 3 and ratio <= 1.10
    one = data.TrainBatches(split, 32, [128], seed=0, sharding=None, prefetch=0, packing_shapes=1)
    one.plan_packing(total)
    assert one.lengths(total) == [max(shapes)]  # data.packing_shapes=1: one static shape for the whole run
    for name in ("validation", "test"):
        assert len(data.eval_structs(rt128[name], 64, [128], None, packed=True)) == 1


def test_packed_evaluation_sees_every_text_once(rt128):
    split = rt128["validation"]
    rows, segments, plan, length = data.packed_eval_plan(split, 64, None)
    seen = np.concatenate([s[s >= 0] for s in plan])
    assert sorted(seen.tolist()) == list(range(len(split)))
    assert split.lengths.max() == 63 and length == 64  # this split's own longest text, rounded up
    batches = list(data.eval_batches(split, 64, [128], None, prefetch=0, packed=True))
    assert all(b["input_ids"].shape == (rows, 64) and b["row"].shape == (rows, segments) for b in batches)
    per_batch = [int((b["weight"] > 0).sum()) for b in batches]
    assert abs(np.mean(per_batch[:-1]) - 64) < 16  # about the batch size's texts a batch


def test_packing_with_transformers_flax_backbone_is_refused_in_one_line():
    from flaxclf.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"data.packing=on gives the encoder segment ids, which model.impl=hf .* "
                                          r"set data.packing=off$") as e:
        if hf_flax_problem() is not None:  # transformers 5: impl=hf itself is refused first, as test_model checks
            pytest.skip(hf_flax_problem())
        load_config(None, ["model.impl=hf", "data.packing=on"])
    assert "\n" not in str(e.value)
    assert load_config(None, ["model.impl=hf", "data.packing=off"]).data.packing == "off"
    assert load_config(None, []).data.packing == "on"  # the default



def test_a_resume_with_packing_changed_is_refused_and_older_checkpoints_count_as_padded():
    from flaxclf.config import RunConfig, load_config
    from flaxclf.training.checkpoint import resume_changes

    before_packing = RunConfig().to_dict()
    del before_packing["data"]["packing"], before_packing["data"]["packing_shapes"]
    assert resume_changes(before_packing, load_config(None, ["data.packing=on"])) == ["data.packing: off -> on"]
    assert resume_changes(before_packing, load_config(None, ["data.packing=off"])) == []
    packed = load_config(None, ["data.packing=on"])
    assert resume_changes(packed.to_dict(), load_config(None, ["data.packing=on", "data.packing_shapes=1"])) == []
