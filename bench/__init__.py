"""Benchmarks: each module prints one JSON object (``make bench``)."""
