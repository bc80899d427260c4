"""cuda_max_connections: CUDA_DEVICE_MAX_CONNECTIONS is set before the driver starts, unless the operator
set it; the CPU runtime leaves the environment alone."""

from __future__ import annotations

import os

import pytest

from worker.engines import MAX_CONNECTIONS_VAR, CpuRuntime, create_runtime, set_cuda_connections
from worker.errors import ConfigError
from worker.settings import Settings


@pytest.fixture
def no_variable(monkeypatch):
    monkeypatch.delenv(MAX_CONNECTIONS_VAR, raising=False)


def test_the_setting_becomes_the_variable(no_variable):
    assert set_cuda_connections(32) == "32"
    assert os.environ[MAX_CONNECTIONS_VAR] == "32"


def test_the_operators_variable_wins(monkeypatch):
    monkeypatch.setenv(MAX_CONNECTIONS_VAR, "8")
    assert set_cuda_connections(32) == "8"
    assert os.environ[MAX_CONNECTIONS_VAR] == "8"


def test_zero_leaves_the_drivers_default(no_variable):
    assert set_cuda_connections(0) is None
    assert MAX_CONNECTIONS_VAR not in os.environ


def test_create_runtime_sets_it_before_probing_cuda(no_variable, monkeypatch):
    seen = []
    monkeypatch.setattr("worker.engines.cuda_unusable",
                        lambda index: seen.append(os.environ.get(MAX_CONNECTIONS_VAR)) or "no CUDA in this test")
    runtime = create_runtime(Settings(device="auto", cuda_max_connections=24))
    assert isinstance(runtime, CpuRuntime)  # auto without CUDA: the CPU
    assert seen == ["24"]  # in place when the driver would have been initialised


def test_the_cpu_runtime_does_not_touch_it(no_variable):
    assert isinstance(create_runtime(Settings(device="cpu")), CpuRuntime)
    assert MAX_CONNECTIONS_VAR not in os.environ


@pytest.mark.parametrize("bad", [-1, 33])
def test_out_of_range_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="cuda_max_connections must be 0..32"):
        Settings(cuda_max_connections=bad)
