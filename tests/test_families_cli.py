"""Each family through the real `flaxclf` command: a base checkpoint (encoder only, as a pretraining run leaves
it) fine-tuned, resumed, inspected, predicted with, and its export read by PyTorch's AutoModel. A BERT-like family
joins with one line in SPECS. BERT's own journeys: tests/test_journeys.py. ModernBERT's (its masked-LM checkpoint
fine-tuned, a kill -9 and resume, inspect, predict, PyTorch reading the export, long inputs, remat, mean pooling):
tests/test_modernbert_journeys.py, whose shared runs already carry what a row here would assert."""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from flaxclf.hf.weights import TOKENIZER_FILES, to_pt_state
from flaxclf.models.bert import BertSpec
from flaxclf.models.classifier import ClassifierConfig, init_params, make_classifier
from flaxclf.options import hf_flax_problem
from tests.helpers import flaxclf, ok, records, refused, train_args
from tests.torch_ref import needs_torch

pytestmark = pytest.mark.journey

# Tiny encoders over MiniLM's real WordPiece tokenizer (vocabulary 30522, [PAD] = 0, so RoBERTa's padding_idx is 0).
_SHAPE = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
              max_position_embeddings=66)
SPECS = {
    "roberta": BertSpec(**_SHAPE, model_type="roberta", type_vocab_size=1),
    "electra": BertSpec(**_SHAPE, model_type="electra", embedding_size=16),
    "distilbert": BertSpec(**_SHAPE, model_type="distilbert", type_vocab_size=0),
    "albert": BertSpec(**dict(_SHAPE, num_hidden_layers=3), model_type="albert", embedding_size=16,
                       hidden_act="gelu_new"),
}


@pytest.fixture(scope="module", params=list(SPECS))
def base_dir(request, tmp_path_factory, minilm_dir) -> Path:
    """The family's base model checkpoint: the encoder's weights (and ALBERT's pooler, which its base model has),
    no classification head, a config.json that names the base architecture."""
    spec = SPECS[request.param]
    folder = tmp_path_factory.mktemp(f"base-{request.param}")
    params = init_params(make_classifier(ClassifierConfig(backbone=spec, num_labels=2)), jax.random.PRNGKey(0))
    state = {k: v for k, v in to_pt_state(params, spec.family).items() if k.startswith(spec.family.prefix + ".")}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    arch = spec.family.architectures[spec.model_type].replace("ForSequenceClassification", "Model")
    (folder / "config.json").write_text(json.dumps(spec.to_hf(architectures=[arch])))
    for name in TOKENIZER_FILES:
        if (minilm_dir / name).is_file():
            shutil.copy2(minilm_dir / name, folder / name)
    return folder


@pytest.mark.hf
def test_fine_tune_resume_inspect_predict_and_export(base_dir, tmp_path):
    run_dir = tmp_path / "run"
    # A rate a tiny random encoder learns from in a few steps; every step's loss is logged.
    # Padded batches by length bucket, as when this journey's loss check was set: six steps of random batches are
    # too few for "the loss goes down" to hold whatever the draw (packing's own exactness: tests/test_packing.py).
    base = ("checkpoint.every_steps=2", "train.eval_every=2", "train.log_every=1", "optim.learning_rate=2e-3",
            "optim.warmup_ratio=0", "data.packing=off")
    first = ok(flaxclf(*train_args(base_dir, run_dir, "train.max_steps=4", *base)))
    assert "classifier head initialized fresh" in first.stdout + first.stderr
    again = ok(flaxclf(*train_args(base_dir, run_dir, "train.max_steps=6", *base)))
    assert f"resumed from {run_dir / 'checkpoints' / '4'} at step 4 of 6" in again.stdout
    assert [r["step"] for r in records(run_dir) if r["split"] == "validation"] == [2, 4, 6]
    loss = [r["loss"] for r in records(run_dir) if r["split"] == "train"]
    assert len(loss) == 6 and np.mean(loss[-2:]) < np.mean(loss[:2])  # the loss goes down

    p = ok(flaxclf("inspect", str(run_dir), "--text", "not bad at all", "--json", "-"))
    out = json.loads(p.stdout)
    assert out["verdict"].startswith("Yes")
    changes = [q["logit_change"] for q in out["positions"]]
    assert changes[0] > 0 and all(c == 0.0 for c in changes[1:])

    texts = ["a great film", "awful, just awful", "not bad at all, if a little long"]
    export = run_dir / "export"  # the best step's model, which PyTorch reads below
    p = ok(flaxclf("predict", str(export), "--format", "jsonl", stdin="\n".join(texts) + "\n"))
    rows = [json.loads(line) for line in p.stdout.splitlines()]
    assert [r["text"] for r in rows] == texts

    torch = needs_torch()
    import transformers

    model, info = transformers.AutoModelForSequenceClassification.from_pretrained(export, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    tok = transformers.AutoTokenizer.from_pretrained(export)
    token_types = SPECS[model.config.model_type].family.token_types
    enc = tok(texts, padding=True, return_tensors="pt", return_token_type_ids=token_types)
    with torch.no_grad():
        probs = torch.softmax(model.eval()(**enc).logits, -1).numpy()
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    ours = np.array([[r["probs"][n] for n in labels] for r in rows])
    np.testing.assert_allclose(ours, probs, rtol=0, atol=1e-5)


@pytest.mark.hf
def test_impl_hf_is_refused_for_another_family_in_one_line(tmp_path, minilm_dir):
    """transformers' Flax backbone (model.impl=hf) is BERT's: a RoBERTa run is refused before it starts."""
    from flaxclf.hf.weights import export_hf

    spec = SPECS["roberta"]
    config = ClassifierConfig(backbone=spec, num_labels=2)
    export_hf(tmp_path / "roberta", config, init_params(make_classifier(config), jax.random.PRNGKey(0)), minilm_dir)
    p = flaxclf(*train_args(tmp_path / "roberta", tmp_path / "run", "model.impl=hf", "data.packing=off",
                           "train.max_steps=2"))
    if hf_flax_problem() is None:
        refused(p, "train", "model.impl=hf is transformers' FlaxBertModule, for BERT", "is a roberta model")
    else:  # under transformers 5 the setting is refused first, whatever the model: Flax BERT is not there
        refused(p, "train", hf_flax_problem())
    assert not (tmp_path / "run").exists()
