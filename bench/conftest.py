"""pytest options of the kernel benchmarks (`pytest bench --benchmark-only [--bench-device cuda]
[--bench-size quick] [--bench-only lp]`) and their parametrisation: one test per case of bench/suite.py."""
from __future__ import annotations

import pytest
import torch

from . import suite
from .harness import copy_bandwidth_gbps, provenance


def pytest_addoption(parser):
    group = parser.getgroup("rlhf-engine kernel benchmarks")
    group.addoption("--bench-device", default=None, help="cpu | cuda (default: cuda when available)")
    group.addoption("--bench-size", default=None, choices=sorted(suite.SIZES),
                    help="sizes of bench/suite.py (default: the device's; quick: a smoke run)")
    group.addoption("--bench-only", default=None, choices=sorted(suite.KERNELS), help="one kernel's cases")


def _device(config) -> str:
    return config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")


def _size(config) -> str:
    return config.getoption("--bench-size") or _device(config)


def pytest_generate_tests(metafunc):
    if "case_id" in metafunc.fixturenames:
        ids = suite.case_ids(_device(metafunc.config), _size(metafunc.config), metafunc.config.getoption("--bench-only"))
        metafunc.parametrize("case_id", ids, ids=[label for *_, label in ids])


@pytest.fixture(scope="session")
def bench_device(pytestconfig) -> str:
    return _device(pytestconfig)


@pytest.fixture(scope="session")
def bench_size(pytestconfig) -> str:
    return _size(pytestconfig)


@pytest.fixture(scope="session")
def copy_bw(pytestconfig, bench_device) -> float:
    """The copy bandwidth (bytes read + written per second), measured once per session, as every case's ceiling."""
    bw = copy_bandwidth_gbps(bench_device)
    pytestconfig._rlhf_copy_bw = bw
    return bw


def pytest_benchmark_update_machine_info(config, machine_info):
    """The saved JSON (--benchmark-autosave / --benchmark-json) carries the run's copy bandwidth and provenance."""
    machine_info["copy_bandwidth_gbps"] = getattr(config, "_rlhf_copy_bw", None)
    machine_info["rlhf_engine"] = provenance("pytest bench --benchmark-only", _device(config))
