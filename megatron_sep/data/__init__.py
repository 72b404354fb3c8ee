from .dataset import BlendedDataset, PackedDataset, build_datasets, split_ranges
from .indexed import IndexedDataError, IndexedDataset, IndexedDatasetWriter
from .tokenizer import Tokenizer, TokenizerError, load_tokenizer

__all__ = ["BlendedDataset", "IndexedDataError", "IndexedDataset", "IndexedDatasetWriter", "PackedDataset",
           "Tokenizer", "TokenizerError", "build_datasets", "load_tokenizer", "split_ranges"]
