"""Hot-path ops: each has a PyTorch reference and (on CUDA) a faster backend behind one function."""

from .norms import layer_norm, rms_norm
from .rope import apply_rope, rope_cos_sin
from .sep_attention import plan_for, resolve_backend, sep_attention, sep_mask
from .sep_plan import SepPlan, kept_keys

__all__ = [
    "SepPlan",
    "apply_rope",
    "kept_keys",
    "layer_norm",
    "plan_for",
    "resolve_backend",
    "rms_norm",
    "rope_cos_sin",
    "sep_attention",
    "sep_mask",
]
