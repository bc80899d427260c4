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


def resnet50_fp16_pipeline_path() -> Path:
    """resnet50.yaml in float16 (same weights, rounded): the bench's fp16 row."""
    return _HERE / "resnet50_fp16.yaml"
