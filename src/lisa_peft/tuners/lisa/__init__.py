"""The LiSA tuner, laid out like PEFT's own tuners: config.py, layer.py, model.py."""

from .config import LisaConfig
from .layer import LisaAttention
from .model import LisaModel

__all__ = ["LisaAttention", "LisaConfig", "LisaModel"]
