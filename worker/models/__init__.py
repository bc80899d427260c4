"""Model and pipeline specs, pre- and post-processing, and the bundled models."""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def default_pipeline_path() -> Path:
    """The pipeline used when none is configured: the exact-function demo models."""
    return _HERE / "demo.yaml"


def resnet50_pipeline_path() -> Path:
    """A ResNet-50-shaped pipeline for load tests and benchmarks."""
    return _HERE / "resnet50.yaml"
