"""llmlab: the whole life of a decoder-only language model, readable end to end."""

__version__ = "0.1.0"
