"""Baseline attribution methods that influence functions are compared against, behind the `Attributor` interface."""
