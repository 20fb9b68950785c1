"""Configs of the transformer language-model experiment: `ptb` (≈ 30 minutes) and `tiny`."""
