"""Quick checks behind the bench/ figures: the job's jitted step compiles once per batch shape; the GPU bench's
FLOP formula. The BERT encoder's checks are in tests/test_fast_bert.py."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxclf.config import MeshConfig, OptimConfig
from flaxclf.models.bert import BertClassifier, BertSpec
from flaxclf.models.bert.families import decays as bert_decays
from flaxclf.models.classifier import ClassifierConfig, init_params
from flaxclf.options import SINGLE
from flaxclf.runtime import sharding
from flaxclf.training import steps
from flaxclf.training.optim import make_optimizer

SPEC = BertSpec(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                max_position_embeddings=64)


def _batch(b: int, length: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = (np.arange(length)[None] < rng.integers(2, length + 1, b)[:, None]).astype(np.int32)
    ids = np.where(mask, rng.integers(5, SPEC.vocab_size, (b, length)), 0).astype(np.int32)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids),
            "labels": rng.integers(0, 3, b).astype(np.int32), "weight": np.ones(b, np.float32)}


def test_train_step_compiles_once_per_batch_length():
    model = BertClassifier(ClassifierConfig(backbone=SPEC, num_labels=3, problem_type=SINGLE))
    tx = make_optimizer(OptimConfig(), 10, bert_decays)
    mesh = sharding.make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    shard = steps.state_shardings(steps.abstract_state(model, tx, jnp.float32), mesh, model)
    train, _ = steps.compile_steps(model, tx, SINGLE, 1, mesh, shard)
    state = steps.create_state(jax.device_get(init_params(model, jax.random.PRNGKey(0))), tx, shard, seed=0)
    for i, length in enumerate([16, 32, 16, 32, 16]):
        state, _ = train(state, jax.device_put(_batch(8, length, i), sharding.batch_sharding(mesh)))
    assert train._cache_size() == 2


def test_gpu_bench_flop_formula_is_notes_figure():
    pytest.importorskip("torch", reason="bench/gpu_bert_base.py imports the PyTorch reference, not installed here")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from gpu_bert_base import FLOP_PER_SEQ_128, flop_per_example

    assert flop_per_example(BertSpec(), 128) == pytest.approx(FLOP_PER_SEQ_128, rel=2e-3)
