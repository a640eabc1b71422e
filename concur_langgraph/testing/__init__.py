"""Helpers for tests, benchmarks and examples (test servers, tiny models)."""
