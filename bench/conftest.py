"""Setup for the benchmark suites in bench/ (collected only when asked: ``pytest bench``).

pyproject's addopts carries ``--benchmark-disable`` so that ``make test`` never
times anything. pytest-benchmark refuses ``--benchmark-only`` together with
``--benchmark-disable``, so here ``--benchmark-only`` also means
``--benchmark-enable``: ``pytest bench --benchmark-only`` times, and plain
``pytest bench`` runs every benchmarked function once as a correctness check.
"""
import pytest


@pytest.hookimpl(tryfirst=True)  # before pytest-benchmark's own pytest_configure reads the options
def pytest_configure(config):
    if config.getoption("benchmark_only", default=False):
        config.option.benchmark_enable = True
