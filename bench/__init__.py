"""Benchmarks behind ``make bench``: each module ``bench/<name>.py`` returns tables for one question."""

from bench.harness import Table, machine_description, ratio

__all__ = ["Table", "machine_description", "ratio"]
