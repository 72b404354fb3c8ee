"""Conversion to and from Hugging Face transformers."""
from ..checkpoint import load_model as load_project_model  # until cli.py moves to load_model
from .commands import export_hf, import_hf
from .hf import ConversionError

__all__ = ["ConversionError", "export_hf", "import_hf", "load_project_model"]
