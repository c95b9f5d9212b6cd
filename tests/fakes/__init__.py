"""Fake upstream servers for tests and benchmarks."""

from tests.fakes.openai_upstream import FakeOpenAI, RecordedRequest

__all__ = ["FakeOpenAI", "RecordedRequest"]
