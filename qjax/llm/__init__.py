"""Large language models end to end: Hugging Face checkpoints in, quantized checkpoints out.

Submodules (imported explicitly; `compressed` and the tokenizer path need `qjax[hf]`):

* `checkpoint`: safetensors reading (memory-mapped, bfloat16 included) and writing, no PyTorch;
* `compressed`: `pack-quantized` compressed-tensors checkpoints, written and read through the
  `compressed-tensors` package (`save_compressed`, `load_compressed`, `layer_alphabets`);
* `pipeline`: token sources, calibration windows, `quantize_checkpoint`, `perplexity`;
* `quantize`, `perplexity`: the command lines (`python -m qjax.llm.quantize`, ...).

The model itself is `qjax.models.llama`.
"""
