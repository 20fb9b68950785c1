"""Perplexity of a float or quantized (compressed-tensors) Llama-family checkpoint.

    python -m qjax.llm.perplexity --model_dir=path/to/model --corpus=ptb --split=test

The standard protocol of GPTQ and llm-compressor: non-overlapping windows of `seq_len` tokens
(default: the model's context, at most 2048), each scored on its seq_len - 1 next-token
predictions (`qjax.llm.pipeline.perplexity`). The corpus is Penn Treebank word ids ("ptb"), the
character corpus shipped with qjax ("char"), a .npy of ids, or a text file tokenized with the
checkpoint's tokenizer; the ids must be those the model was trained on.
"""

import json

from absl import app, flags, logging

from qjax.llm import pipeline

FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", None, "A float or pack-quantized checkpoint directory.")
flags.DEFINE_string("corpus", "ptb", "'ptb', 'char', a .npy of token ids or a text file.")
flags.DEFINE_enum("split", "test", ["train", "valid", "test"], "Split of 'ptb' or 'char'.")
flags.DEFINE_string("data_dir", None, "Where to look for PTB (default: the usual data folders).")
flags.DEFINE_integer("seq_len", None, "Window length (default: the context, at most 2048).")
flags.DEFINE_integer("batch_size", 8, "Windows per forward pass.")
flags.DEFINE_string("output", None, "Also write the result as JSON to this file.")
flags.mark_flags_as_required(["model_dir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError("Too many command-line arguments.")
    logging.set_verbosity(logging.INFO)
    model = pipeline.load_model(FLAGS.model_dir)
    seq_len = FLAGS.seq_len or min(model.config.max_position_embeddings, 2048)
    tokens = pipeline.load_tokens(
        FLAGS.corpus, split=FLAGS.split, model_dir=FLAGS.model_dir, data_dir=FLAGS.data_dir
    )
    value = pipeline.perplexity(model, tokens, seq_len=seq_len, batch_size=FLAGS.batch_size)
    result = {
        "model_dir": FLAGS.model_dir,
        "corpus": FLAGS.corpus,
        "split": FLAGS.split,
        "seq_len": seq_len,
        "tokens": len(tokens),
        "perplexity": value,
    }
    print(json.dumps(result))
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)
