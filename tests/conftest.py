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



@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist, absent under -p no:xdist
def pytest_xdist_make_scheduler(config, log):
    """`load` scheduling, except that each module holding `ray` in its name runs on one worker:
    its tests share one Ray instance per process, and starting one costs ~15 s."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class RayModulesTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if "ray" in Path(module).name else nodeid

    return RayModulesTogether(config, log)
