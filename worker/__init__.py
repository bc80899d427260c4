"""Kafka worker for GPU image inference."""

__version__ = "0.1.0"
