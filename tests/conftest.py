"""Shared fixtures: a tiny synthetic dataset and a tiny trained run. Plain helper functions live in helpers.py."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest

from skinfusion.cli import fuse_main, train_main
from skinfusion.data.synthetic import make_synthetic_dataset


@pytest.fixture(scope="session", autouse=True)
def _private_image_cache(tmp_path_factory):
    """Keep the tests' decoded-image caches out of the user's ~/.cache."""
    os.environ["SKINFUSION_CACHE"] = str(tmp_path_factory.mktemp("image-cache"))


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    """A 240-image SYNTHETIC dataset at 48 px, with lesion groups and no look-alike lesions."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), n_images=240, size=48, seed=3, atypical_rate=0.0)


@pytest.fixture(scope="session")
def trained_run(synthetic_data, tmp_path_factory):
    """A run with all three branches trained briefly at 32 px and a mean fusion."""
    run = tmp_path_factory.mktemp("run")
    for view in ("rgb", "hsv", "fft"):
        rc = train_main(["--view", view, "--data", str(synthetic_data), "--run", str(run),
                         "--image-size", "32", "--epochs", "6", "--patience", "6", "-q"])
        assert rc == 0
    # The gate's tests were written for the 95th percentile: with 60 validation images a 99.5th
    # percentile is their maximum, too coarse to check a pass rate against.
    assert fuse_main(["--run", str(run), "--method", "mean", "--ood-percentile", "95", "-q"]) == 0
    return run


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def pytest_collection_modifyitems(config, items):
    """A test that needs the trained run makes the session train three branches: it is slow, marked or not."""
    for item in items:
        if "trained_run" in getattr(item, "fixturenames", ()) and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.slow)
