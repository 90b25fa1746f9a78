"""The one adapter to transformers' Flax BERT (model.impl=hf): the reference flaxclf's own encoder is tested
against. Imported only when a model asks for it; transformers 4.x only (Flax left transformers in v5.0)."""

from __future__ import annotations

import logging
import warnings

from flaxclf.options import hf_flax_problem


def hf_flax_bert_module() -> type:
    """transformers' FlaxBertModule, imported on first use: only model.impl=hf needs it."""
    problem = hf_flax_problem()
    if problem is not None:
        raise ImportError(problem)
    with warnings.catch_warnings():  # its notice that Flax is deprecated is known (see HF_FLAX_MAJOR)
        warnings.simplefilter("ignore")
        logger = logging.getLogger("transformers")
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            from transformers.models.bert.modeling_flax_bert import FlaxBertModule
        finally:
            logger.setLevel(level)
    return FlaxBertModule
