from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub

from models import build_family  # noqa: E402


@pytest.fixture(scope="session")
def families(tmp_path_factory):
    """family name -> {base, ft_dense, ft_sparse, ft_flip} directories, built once per session."""
    cache: dict[str, dict[str, Path]] = {}

    def get(family: str) -> dict[str, Path]:
        if family not in cache:
            cache[family] = build_family(tmp_path_factory.mktemp(family), family)
        return cache[family]

    return get


@pytest.fixture()
def llama(families):
    return families("llama")
