"""The one-layer LSTM language model of ProxQuant's Penn Treebank experiment.

Embedding (300) → dropout → LSTM (300) → dropout → decoder to the vocabulary, with the decoder
either its own dense layer or tied to the embedding (`tied=True`: logits = h·Eᵀ). The LSTM's
state is carried across consecutive BPTT segments (truncated back-propagation through time).
Parameter names: `embed/embedding` (vocab, 300); `cell/{ii,if,ig,io}/kernel` (the gates' input
weights) and `cell/{hi,hf,hg,ho}/{kernel,bias}` (recurrent), each (300, 300); `decoder/kernel`
(300, vocab) and `decoder/bias`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["LSTMLanguageModel"]

LSTMCarry = tuple[jax.Array, jax.Array]


class LSTMLanguageModel(nn.Module):
    """Word-level LSTM language model.

    Attributes:
      vocab_size: number of tokens.
      embed_dim: embedding width (300 in the paper).
      hidden_dim: LSTM width (300 in the paper).
      dropout_rate: dropout on the embeddings and on the LSTM outputs (0.5 in the paper).
      tied: share the embedding matrix with the decoder (needs embed_dim == hidden_dim).
    """

    vocab_size: int
    embed_dim: int = 300
    hidden_dim: int = 300
    dropout_rate: float = 0.5
    tied: bool = False

    def initial_carry(self, batch_size: int) -> LSTMCarry:
        """The zero LSTM state (c, h), each (batch_size, hidden_dim)."""
        zeros = jnp.zeros((batch_size, self.hidden_dim), jnp.float32)
        return zeros, zeros

    @nn.compact
    def __call__(
        self, tokens: jax.Array, carry: LSTMCarry, *, train: bool
    ) -> tuple[jax.Array, LSTMCarry]:
        """Next-token logits (batch, time, vocab) and the final LSTM state.

        Args:
          tokens: int token ids (batch, time).
          carry: the LSTM state (c, h) from the previous segment (`initial_carry` at the start).
          train: apply dropout (needs a 'dropout' PRNG key).
        """
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be int (batch, time), got {tokens.dtype} {tokens.shape}")
        if self.tied and self.embed_dim != self.hidden_dim:
            raise ValueError(
                f"tied=True needs embed_dim == hidden_dim, got {self.embed_dim}, {self.hidden_dim}"
            )
        uniform = nn.initializers.uniform(0.2)
        embed = nn.Embed(
            self.vocab_size,
            self.embed_dim,
            embedding_init=lambda *a: uniform(*a) - 0.1,
            name="embed",
        )
        dropout = nn.Dropout(self.dropout_rate, deterministic=not train)
        x = dropout(embed(tokens))
        rnn = nn.RNN(nn.OptimizedLSTMCell(self.hidden_dim, name="cell"), return_carry=True)
        carry, y = rnn(x, initial_carry=carry)
        y = dropout(y)
        logits = embed.attend(y) if self.tied else nn.Dense(self.vocab_size, name="decoder")(y)
        return logits, carry
