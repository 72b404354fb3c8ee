from tests.conftest import corpus  # noqa: F401  (the shared tokenizer and corpus fixture)
