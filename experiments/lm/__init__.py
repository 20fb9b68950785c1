"""A transformer language model trained for post-training quantization (PTB, characters)."""
