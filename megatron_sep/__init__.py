"""megatron-sep: Megatron-style GPT pretraining with SepLLM sparse separator attention."""

__version__ = "0.1.0"
