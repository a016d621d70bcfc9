"""lmstack: a PyTorch-native LLM engineering stack, from text to served, evaluated models."""

__version__ = "0.1.0"
