"""qjax: neural-network weight quantization in JAX and Flax.

Two published methods:

* GPFQ, greedy path-following quantization (Lybrand & Saab), post-training;
* ProxQuant (Bai, Wang & Liberty, ICLR 2019), quantization-aware training as an optax transform.
"""

__version__ = "0.1.0"
