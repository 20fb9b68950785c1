"""Configs of the Llama-family language-model experiment: `ptb` (≈ 15 minutes) and `tiny`."""
