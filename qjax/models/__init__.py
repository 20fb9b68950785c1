"""Flax models used by the qjax experiments."""
