from .gpt import GPT, padded_vocab


def build_model(cfg):
    """The model class the config names (the one factory for every variant)."""
    return GPT(cfg)


__all__ = ["GPT", "build_model", "padded_vocab"]
