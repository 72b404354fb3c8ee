"""Inference: generation with a KV cache that applies the SepLLM mask (and can evict), and SepCache, the
fixed-capacity streaming cache."""

from .cache import SepKVCache
from .generate import generate
from .options import DecodeOptions
from .sep_cache import SepCache

__all__ = ["DecodeOptions", "SepCache", "SepKVCache", "generate"]
