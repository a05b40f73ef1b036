"""Benchmarks that check attributions against a known ground truth."""
