"""Hot-path ops: each has a PyTorch reference and (on CUDA) a Triton kernel behind one function."""
from .norms import layer_norm, rms_norm
from .rope import apply_rope, rope_cos_sin

__all__ = ["apply_rope", "layer_norm", "rms_norm", "rope_cos_sin"]
