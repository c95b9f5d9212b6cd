"""Development tooling: fakes and helpers for tests, benchmarks and local runs.

Nothing here is imported by the services at runtime; a production deployment never needs it.
"""
