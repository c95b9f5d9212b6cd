"""Build the provider for a configured model."""

from __future__ import annotations

from promptline.config import ModelConfig

from .base import Provider
from .openai_compat import OpenAIProvider
from .simulated import SimulatedProvider


def build_provider(model: ModelConfig) -> Provider:
    if model.provider == "simulated":
        return SimulatedProvider(model.simulated)
    if model.provider == "openai":
        return OpenAIProvider(model)
    raise ValueError(f"unknown provider {model.provider!r}")  # config validation forbids this

