"""COPA: efficient vision-language pre-training with a Text-aware Patch Detector."""

from copa.config import Config, ModelConfig, load_config
from copa.model.copa import COPAModel, build_model, load

__all__ = ["COPAModel", "Config", "ModelConfig", "build_model", "load", "load_config"]
__version__ = "0.1.0"
