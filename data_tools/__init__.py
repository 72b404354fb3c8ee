"""Corpus -> tokenizer -> Megatron `.bin/.idx`: the offline data tools behind the CLI."""
