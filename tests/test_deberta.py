"""DeBERTa-v2/v3 beyond what tests/test_families.py checks for every family (logits, the loss and every gradient,
the export both ways, the seed question; tests/test_packing.py: packed = unpacked): the relative positions'
buckets, every hidden state of masked-LM and base checkpoints, the compiled step's gathers, memory against BERT,
what is refused, and the SentencePiece tokenizer."""

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from flaxclf.data import tokens
from flaxclf.data.types import DataError
from flaxclf.hf.weights import WeightsError, from_pretrained
from flaxclf.models.classifier import ClassifierConfig, init_params, make_classifier
from flaxclf.models.deberta import DebertaV2Spec
from flaxclf.models.deberta.spec import log_bucket
from tests.helpers import f32_bound, rt_texts, train_sentencepiece
from tests.test_families import EMBEDDING_DEPTH, LAYER_DEPTH, WIDTH, _batch, _hf_kwargs, _max_abs, _torch_inputs

torch = pytest.importorskip("torch", reason="the PyTorch reference (torch) is not installed in this environment")
transformers = pytest.importorskip("transformers")
from transformers.models.deberta_v2 import modeling_deberta_v2 as hf_deberta  # noqa: E402

pytestmark = pytest.mark.hf
CASES = ["deberta-v2", "deberta-v2-unshared", "deberta-v2-c2p"]  # tests/test_families.py's configs


def _torch_config(case: str, **extra):
    return transformers.AutoConfig.for_model(*_hf_kwargs(case)[:1], **{**_hf_kwargs(case)[1], **extra})


def _trained_looking(model, seed: int = 0):
    """Every weight redrawn at a trained-looking scale: sharp attention whose relative terms move the scores as
    much as the content's (at init's std 0.02 every score is ~0 and a wrong relative index would go unseen)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p) if name.endswith("weight") else 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0, 0.2)
            elif "embeddings" in name:
                p.normal_(0, 1.0)
            else:  # Linear weights [out, in]
                p.normal_(0, 1.0 / p.shape[1] ** 0.5)
    return model.eval()


@pytest.mark.parametrize("buckets,max_position", [(256, 512), (8, 16), (4, 64), (-1, 6), (-1, 512)])
def test_relative_index_is_transformers_for_every_distance(buckets, max_position):
    """The embedding row each distance reads (log buckets or a plain clamp) is the row transformers' c2p index
    gives (build_relative_position, then clamp(. + k, 0, 2k - 1)), for every distance of a 600-token row."""
    n = 600
    spec = DebertaV2Spec(relative_attention=True, position_buckets=buckets, max_relative_positions=max_position)
    q = torch.zeros(1, n, 1)
    rel = hf_deberta.build_relative_position(q, q, bucket_size=buckets, max_position=max_position)[0]
    k = spec.att_span
    want = torch.clamp(rel + k, 0, 2 * k - 1).numpy()  # [i, j]
    ours = spec.relative_index(n)
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    np.testing.assert_array_equal(ours[i - j + n - 1], want)
    if buckets > 0:  # the buckets themselves, over a wider range than any row
        d = np.arange(-4096, 4097)
        np.testing.assert_array_equal(
            log_bucket(d, buckets, max_position),
            hf_deberta.make_log_bucket_position(torch.tensor(d), buckets, max_position).long().numpy())


@pytest.mark.parametrize("kind", ["masked-lm", "masked-lm-legacy", "base"])
@pytest.mark.parametrize("case", CASES)
def test_masked_lm_and_base_checkpoints_load_every_hidden_state(case, kind, tmp_path, caplog):
    """DebertaV2ForMaskedLM (lm_predictions, or legacy cls heads), with v3's replaced-token detector
    (mask_predictions) and the position table that relative-only models carry, and a base DebertaV2Model: the
    encoder loads whole, the other heads and the unused table are ignored, the pooler and classifier alone are
    new; every hidden state equals transformers' at the real positions of 40-token rows (distances beyond the
    buckets and the clamp) within float32's bound. A missing encoder weight is refused by name.

    The checkpoint holds the model's whole state dict, as the hub's DeBERTa-v3 checkpoints do. (transformers
    4.57's save_pretrained of the non-legacy masked LM drops the word embeddings it ties to the LM head, and its
    own from_pretrained then initializes them afresh; flaxclf refuses that folder by the missing name.)"""
    cfg = _torch_config(case, legacy=kind.endswith("legacy"))
    ref = _trained_looking(transformers.DebertaV2ForMaskedLM(cfg) if kind.startswith("masked") else
                           transformers.DebertaV2Model(cfg))
    ref.save_pretrained(tmp_path, safe_serialization=True)
    prefix = "deberta." if kind.startswith("masked") else ""
    if f"{prefix}embeddings.word_embeddings.weight" not in load_file(str(tmp_path / "model.safetensors")):
        with pytest.raises(WeightsError, match="missing: deberta/embeddings/word_embeddings/embedding"):
            from_pretrained(str(tmp_path), num_labels=3)
    state = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
    extra = {"mask_predictions.dense.weight": np.ones((32, 32), np.float32),
             "mask_predictions.classifier.weight": np.ones((1, 32), np.float32)}
    if not cfg.position_biased_input:
        extra[f"{prefix}embeddings.position_embeddings.weight"] = np.ones((64, 32), np.float32)
    save_file({**state, **extra}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with caplog.at_level(logging.INFO, logger="flaxclf"):
        model, params = from_pretrained(str(tmp_path), num_labels=3)
    assert "classifier head initialized fresh" in caplog.text
    assert sorted(params["params"]) == ["classifier", "deberta", "pooler"]

    spec = model.config.backbone
    b = _batch(spec, length=40, seed=4)
    base = ref.deberta if kind.startswith("masked") else ref
    with torch.no_grad():
        want = base(**_torch_inputs(spec, b), output_hidden_states=True).hidden_states
    got = jax.jit(lambda p: model.apply(p, **b, method="hidden_states"))(params)
    assert len(got) == len(want) == spec.num_hidden_layers + 1
    real = b["attention_mask"].astype(bool)
    worst = 0.0
    for n, (ours, theirs) in enumerate(zip(got, want, strict=True)):
        theirs = theirs.numpy()[real]
        diff = _max_abs(np.asarray(ours)[real] - theirs)
        bound = f32_bound(EMBEDDING_DEPTH + LAYER_DEPTH * n, WIDTH, _max_abs(theirs))
        assert diff <= bound, (n, diff, bound)
        worst = max(worst, diff / bound)
    print(f"\n{case} {kind}: every hidden state, worst max abs diff / bound {worst:.2g} (last bound {bound:.2g})")

    del state[f"{prefix}encoder.rel_embeddings.weight"]
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightsError, match="missing: deberta/encoder/rel_embeddings/embedding"):
        from_pretrained(str(tmp_path), num_labels=3)


@pytest.mark.parametrize("case", CASES)
def test_relative_terms_by_blocks_match_pytorch(case, tmp_path, monkeypatch):
    """The relative terms by blocks of 4 rows (3 blocks at the suite's 12 tokens, as blocks of 64 at 512 tokens):
    the loss and every gradient equal transformers' within the bounds tests/test_families.py checks one block
    against."""
    from flaxclf.models.deberta import encoder
    from tests import test_families

    monkeypatch.setattr(encoder, "REL_BLOCK", 4)
    assert encoder._block_rows(12) == 4
    test_families.test_loss_and_every_gradient_match_pytorch(case, tmp_path)


def _grid_sized(hlo: str, op: str, elements: int) -> list[str]:
    """The `op` instructions of an HLO text any of whose shapes (result, operands, indices) has `elements` or
    more: the [B, H, L, L] grid of scores or of their indices, however XLA flattens it. Operands print by name:
    their shapes come from where they are defined (an instruction, or a computation's parameter)."""
    shapes = dict(re.findall(r"%?([\w.\-]+) = \w+\[([\d,]*)\]", hlo))
    shapes.update(re.findall(r"([\w.\-]+): \w+\[([\d,]*)\]", hlo))

    def size(dims: str) -> int:
        return int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64))
    out = []
    for line in hlo.splitlines():
        call = re.search(rf"= \w+\[([\d,]*)\]\S* {op}\(([^)]*)\)", line)
        if call:
            operands = [shapes.get(name.strip().lstrip("%"), "") for name in call.group(2).split(",")]
            if max(size(d) for d in (call.group(1), *operands)) >= elements:
                out.append(line.strip()[:200])
    return out


def test_compiled_train_step_has_no_gather_or_scatter_over_the_score_grid():
    """The real train step (flaxclf.training.steps, AdamW, loss and backward) of v3's settings at 4 x 128 compiles
    with no gather or scatter of B x L^2 elements or more (the vocabulary, 1,024 x 32, and the tokens' embedding
    rows, 512 x 32, are below it); transformers' way (take_along_axis of the [B, H, L, 2k] relative scores with
    [B, H, L, L] indices) compiles to both, which this check finds."""
    from flaxclf.config import MeshConfig, OptimConfig
    from flaxclf.models.deberta.family import decays
    from flaxclf.options import SINGLE
    from flaxclf.runtime import sharding
    from flaxclf.training import steps
    from flaxclf.training.optim import make_optimizer
    from tests.helpers import random_batches

    b, n = 4, 128
    grid = b * n * n
    hf = _torch_config("deberta-v2", vocab_size=1024, max_position_embeddings=n, num_labels=4).to_dict()
    model = make_classifier(ClassifierConfig.from_hf(hf))
    tx = make_optimizer(OptimConfig(), 10, decays)
    mesh = sharding.make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    shardings = steps.state_shardings(steps.abstract_state(model, tx, jnp.float32), mesh, model)
    state = steps.create_state(jax.device_get(init_params(model, jax.random.PRNGKey(0))), tx, shardings, 0)
    train, _ = steps.compile_steps(model, tx, SINGLE, 1, mesh, shardings)
    batch = random_batches(1, b, n, 4, vocab=1024)[0]
    hlo = train.lower(state, batch).compile().as_text()
    found = {op: _grid_sized(hlo, op, grid) for op in ("gather", "scatter")}
    print(f"\ntrain step at {b} x {n}: {hlo.count(' gather(')} gathers, {hlo.count(' scatter(')} scatters in the "
          f"HLO; of B x L^2 elements or more: {sum(map(len, found.values()))}")
    assert found == {"gather": [], "scatter": []}

    # The check bites: transformers' gathers, as jnp.take_along_axis, forward and backward.
    k = 8
    idx = np.broadcast_to(np.clip(np.arange(n)[:, None] - np.arange(n)[None, :] + k, 0, 2 * k - 1), (b, 4, n, n))

    def naive(c2p):
        return jnp.sin(jnp.take_along_axis(c2p, jnp.asarray(idx), axis=-1)).sum()
    naive_hlo = jax.jit(jax.grad(naive)).lower(jnp.ones((b, 4, n, 2 * k))).compile().as_text()
    assert _grid_sized(naive_hlo, "gather", grid) and _grid_sized(naive_hlo, "scatter", grid)


def _temp_bytes(model_type: str, n: int, **kw) -> int:
    """The temporaries of jax.grad of a classifier's summed logits at 2 x n tokens (XLA's memory analysis)."""
    shape = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=6, num_attention_heads=4, intermediate_size=128,
                 max_position_embeddings=512)
    model = make_classifier(ClassifierConfig.from_hf({"model_type": model_type, **shape, **kw, "num_labels": 3}))
    params = init_params(model, jax.random.PRNGKey(0))
    ids = jnp.ones((2, n), jnp.int32)
    mask = jnp.ones((2, n), jnp.int32).at[1, n // 2:].set(0)

    def loss(p):
        return model.apply(p, ids, mask, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)}).sum()
    return jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes


def test_memory_grows_with_length_no_faster_than_berts():
    """The train step's temporaries from L = 128 to 512 grow by no more than a BERT of the same shape's (6 layers,
    each classifier's own head): both keep [B, H, L, L] scores for the backward pass; DeBERTa's relative terms
    are [B, H, L, 2L - 1] before the skew, L^2 as well, and live only within their layer. (At 2 layers those
    transients outweigh what the layers keep, and DeBERTa grows 11.5x to BERT's 10.3x: measured.)"""
    v3 = dict(relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=256, share_att_key=True,
              norm_rel_ebd="layer_norm", position_biased_input=False, type_vocab_size=0)
    t = {(name, n): _temp_bytes(*args, n, **kw) for name, args, kw in (("deberta", ("deberta-v2",), v3),
                                                                         ("bert", ("bert",), {}))
         for n in (128, 512)}
    growth = {name: t[name, 512] / t[name, 128] for name in ("deberta", "bert")}
    print("\ntrain-step temporaries (MiB): " + ", ".join(f"{k[0]} L={k[1]} {v / 2**20:.1f}" for k, v in t.items())
          + f"; growth 128 -> 512: deberta {growth['deberta']:.1f}x, bert {growth['bert']:.1f}x; deberta / bert at "
          f"512: {t['deberta', 512] / t['bert', 512]:.2f}x")
    assert growth["deberta"] <= growth["bert"]


@pytest.mark.parametrize("key,value,message", [
    ("conv_kernel_size", 3, "conv_kernel_size=3 is not supported: the convolution layer"),
    ("pos_att_type", "p2c|p2p", "pos_att_type p2p is not supported"),
    ("norm_rel_ebd", "batch_norm", "norm_rel_ebd 'batch_norm' is not supported"),
    ("attention_head_size", 16, "attention_head_size=16 is not supported"),
    ("pooler_hidden_size", 16, "pooler_hidden_size=16 is not supported"),
    ("pooler_hidden_act", "swish3", "pooler_hidden_act 'swish3' is not known"),
])
def test_a_config_feature_flaxclf_does_not_compute_is_refused_in_one_line(key, value, message, tmp_path):
    hf = {**_torch_config("deberta-v2").to_dict(), key: value}
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        ClassifierConfig.from_hf(hf)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------- tokenizer

@pytest.fixture(scope="module")
def spm_folder(tmp_path_factory):
    """A folder as DeBERTa-v3's hub folders are: config.json and spm.model (no tokenizer.json)."""
    folder = tmp_path_factory.mktemp("spm")
    train_sentencepiece(folder, rt_texts(), vocab_size=400)
    (folder / "config.json").write_text(_torch_config("deberta-v2", vocab_size=400).to_json_string())
    return folder


def test_a_sentencepiece_only_folder_tokenizes_as_transformers_and_sentencepiece_do(spm_folder):
    """spm.model alone: flaxclf's ids are those of transformers' own tokenizer of the folder (its fast-tokenizer
    converter) for every Rotten Tomatoes text and odd ones, and, under transformers 4.x, SentencePiece's own (the
    pieces, between [CLS] and [SEP]). transformers 5.x's converter differs from SentencePiece on one RT text (a
    word SentencePiece splits into three pieces comes out as one [UNK]): measured in CI, 2026-12-06. Truncation
    keeps [SEP]."""
    import sentencepiece

    tok = tokens.load_tokenizer(spm_folder, max_length=512)
    texts = [*rt_texts(), "", "  odd   spacing,\tTAB and ÉLAN naïve 123 — dash", "日本語 emoji 🎬"]
    got = [e.ids for e in tok.encode_batch(texts)]
    theirs = transformers.AutoTokenizer.from_pretrained(str(spm_folder))
    assert got == [theirs(t)["input_ids"] for t in texts]
    if int(transformers.__version__.split(".")[0]) < 5:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_folder / "spm.model"))
        assert got == [[1, *sp.encode(t), 2] for t in texts]
    short = tokens.load_tokenizer(spm_folder, max_length=8).encode(texts[0]).ids
    assert len(short) == 8 and short[0] == 1 and short[-1] == 2


def test_a_sentencepiece_only_folder_without_sentencepiece_is_refused_in_one_line(spm_folder, monkeypatch,
                                                                                   tmp_path):
    """... and the tokenized-data cache's key covers spm.model: another SentencePiece model is another key."""
    other = tmp_path / "other"
    other.mkdir()
    (other / "spm.model").write_bytes((spm_folder / "spm.model").read_bytes() + b"\0")
    assert tokens.tokenizer_hash(other) != tokens.tokenizer_hash(spm_folder)
    monkeypatch.setattr(tokens, "_importable", lambda module: module != "sentencepiece")
    with pytest.raises(DataError, match="has only spm.model .* needs pip install sentencepiece protobuf") as e:
        tokens.require_tokenizer(spm_folder)
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="has no tokenizer.json, vocab.txt or SentencePiece model"):
        tokens.require_tokenizer(tmp_path)
