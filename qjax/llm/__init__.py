"""Large language models end to end: Hugging Face checkpoints in, quantized checkpoints out.

Submodules: `checkpoint` (safetensors reading and writing, no PyTorch).
"""
