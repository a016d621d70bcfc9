"""lmstack: a PyTorch-native LLM engineering stack, from text to trained, fine-tuned and evaluated models."""

__version__ = "0.1.0"
