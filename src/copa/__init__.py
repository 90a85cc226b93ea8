"""COPA: efficient vision-language pre-training with a Text-aware Patch Detector."""

from __future__ import annotations

import importlib
from typing import Any

from copa.config import Config, ModelConfig, load_config
from copa.model.copa import COPAModel, build_model, load

# the inference API loads on first use, so `import copa` (and every CLI command) stays cheap
_LAZY = {
    "Box": "copa.predictor",
    "Predictor": "copa.predictor",
    "Retrieval": "copa.predictor",
    "load_model_and_transforms": "copa.predictor",
    "ImageTransform": "copa.preprocess",
    "Tokenizer": "copa.preprocess",
}

__all__ = [
    "Box",
    "COPAModel",
    "Config",
    "ImageTransform",
    "ModelConfig",
    "Predictor",
    "Retrieval",
    "Tokenizer",
    "build_model",
    "load",
    "load_config",
    "load_model_and_transforms",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'copa' has no attribute {name!r}")
