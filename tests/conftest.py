"""Shared pytest fixtures and hypothesis settings for the tokcore test suite."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Hypothesis profiles. "ci" (the default) keeps the whole suite fast on a 2-core machine:
# modest example counts and no per-example deadline (the first call of an op may pay
# one-time costs such as library loading, and a shared machine has noisy timings).
settings.register_profile(
    "ci",
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    print_blob=True,
)
settings.register_profile(
    "dev",
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "thorough",
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

CUDA_AVAILABLE = torch.cuda.is_available()

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not CUDA_AVAILABLE, reason="CUDA is not available"),
    ),
]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Runs a test once on the CPU and once on CUDA (skipped when there is no GPU)."""
    return request.param


@pytest.fixture
def cuda_device() -> str:
    """For tests that only make sense on a GPU (e.g. device mixes)."""
    if not CUDA_AVAILABLE:
        pytest.skip("CUDA is not available")
    return "cuda"


class RecordingOps:
    """Stands in for torch.ops.tokcore in tokcore.pooling.ops: records each call as
    (op name, a CPU copy of its offsets argument, its check_offsets), then runs it.
    The offsets that word_boundaries makes (valid by construction) are recorded in
    `made_offsets`, in call order."""

    def __init__(self):
        self.calls: list[tuple[str, torch.Tensor, bool]] = []
        self.made_offsets: list[torch.Tensor] = []

    def __getattr__(self, name):
        def call(*args, **kwargs):
            self.calls.append((name, args[1].detach().cpu().clone(), kwargs.get("check_offsets", True)))
            result = getattr(torch.ops.tokcore, name)(*args, **kwargs)
            if name == "word_boundaries":
                self.made_offsets.extend(t.detach().cpu().clone() for t in result)
            return result
        return call


@pytest.fixture
def recorded_pooling_ops(monkeypatch) -> RecordingOps:
    """Records the pooling ops that the wrappers, their autograd and the models call."""
    import tokcore.pooling.ops as pooling_ops
    recorder = RecordingOps()
    monkeypatch.setattr(pooling_ops, "_ops", recorder)
    return recorder


@pytest.fixture
def tokcore_setting(monkeypatch):
    """set(name, value) sets a tokcore environment variable (None: unsets it) for this
    test and makes the library use it (tokcore.reload_settings(): the library reads
    the environment only then); the old environment and settings come back after."""
    import tokcore

    def set_(name: str, value: str | None) -> None:
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
        tokcore.reload_settings()

    yield set_
    monkeypatch.undo()
    tokcore.reload_settings()
