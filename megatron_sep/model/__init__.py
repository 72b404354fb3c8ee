from .gpt import GPT, padded_vocab

__all__ = ["GPT", "padded_vocab"]
