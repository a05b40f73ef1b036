"""End-to-end steps behind each CLI command: load, check, compute, write atomically."""
