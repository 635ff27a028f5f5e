"""Small synthetic datasets shared by the pipeline tests (generated once per session, ~2 s each)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

SIZE = {"width": 64, "height": 48, "frames": 12, "fps": 6}


@pytest.fixture(scope="session")
def k400_tree(tmp_path_factory):
    from pipeline.synth import generate

    root = tmp_path_factory.mktemp("k400_tree")
    generate(root, "k400", classes=4, videos_per_class=4, val_videos_per_class=2, test_videos_per_class=1,
             corrupt=3, seed=1, workers=2, progress=False, **SIZE)
    return root


@pytest.fixture(scope="session")
def k400_flat(tmp_path_factory):
    from pipeline.synth import generate

    root = tmp_path_factory.mktemp("k400_flat")
    generate(root, "k400", classes=3, videos_per_class=3, val_videos_per_class=1, test_videos_per_class=1,
             seed=2, video_layout="flat", workers=2, progress=False, **SIZE)
    return root


@pytest.fixture(scope="session")
def ssv2(tmp_path_factory):
    from pipeline.synth import generate

    root = tmp_path_factory.mktemp("ssv2")
    generate(root, "ssv2", classes=4, videos_per_class=3, val_videos_per_class=1, test_videos_per_class=1,
             corrupt=3, seed=3, workers=2, progress=False, **SIZE)
    return root


def pytest_collection_modifyitems(config, items):
    """Ray's deprecations are errors in the pipeline's tests: pipeline/ must run unchanged on Ray 2.64, where the
    arguments Ray 2.60 deprecates are gone."""
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.filterwarnings("error::ray.util.annotations.RayDeprecationWarning"))
