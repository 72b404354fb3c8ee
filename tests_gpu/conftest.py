import pytest


def pytest_collection_modifyitems(config, items):
    """Every test here needs a CUDA device: marked `gpu` (registered in pytest.ini)."""
    for item in items:
        item.add_marker(pytest.mark.gpu)
