"""Conversion to and from Hugging Face transformers."""

from .commands import export_hf, import_hf
from .hf import ConversionError

__all__ = ["ConversionError", "export_hf", "import_hf"]
