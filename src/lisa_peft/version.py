"""The lisa-peft version (read by setup.cfg and the model card; a leaf module)."""

__version__ = "0.1.0"
