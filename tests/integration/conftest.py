import pytest

from .train_helpers import wscnn_screen


@pytest.fixture(scope="module")
def train_screen(tmp_path_factory):
    """(plate URIs, root) of :func:`.train_helpers.wscnn_screen`, made once per module of
    the training tests (test_train*.py; a few seconds each)."""
    root = tmp_path_factory.mktemp("wscnn")
    return wscnn_screen(root), root
