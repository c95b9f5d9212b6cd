"""Build the provider of one deployment of a configured model."""

from __future__ import annotations

from promptline.config import DeploymentConfig, ModelConfig

from .base import Provider
from .openai_compat import OpenAIProvider
from .simulated import SimulatedProvider


def build_provider(model: ModelConfig, deployment: DeploymentConfig) -> Provider:
    if model.provider == "simulated":
        return SimulatedProvider(deployment.simulated or model.simulated)
    if model.provider == "openai":
        return OpenAIProvider(model, deployment)
    raise ValueError(f"unknown provider {model.provider!r}")  # config validation forbids this
