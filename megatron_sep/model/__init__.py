from .dlcm_model import DLCM
from .gpt import GPT, padded_vocab
from .subllm_model import SubLLM


def build_model(cfg):
    """The model class the config names: the one factory for every variant."""
    if cfg.model.arch == "dlcm":
        return DLCM(cfg)
    if cfg.model.subsampled:
        return SubLLM(cfg)
    return GPT(cfg)


__all__ = ["DLCM", "GPT", "SubLLM", "build_model", "padded_vocab"]
