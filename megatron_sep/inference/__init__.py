"""Inference: generation with a KV cache that applies the SepLLM mask (and can evict)."""
from .cache import SepKVCache
from .generate import generate

__all__ = ["SepKVCache", "generate"]
