"""Configs of the export experiment: the GPFQ experiment's configs plus the export settings."""

import ml_collections


def export_fields(config: ml_collections.ConfigDict) -> None:
    """Adds the export settings to a GPFQ experiment config (training and data stay as there)."""
    # The alphabets to quantize to and export: C·median|W|·linspace(-1, 1, n) for each n
    # (2: binary, 1 bit per weight; 3: ternary, 2 bits; 16: 4 bits).
    config.export_num_letters = (2, 3, 16)
    config.export_method = "gpfq"
    config.export_c = 3.0
    # An orbax checkpoint of already quantized variables ({"params", "batch_stats"}) of
    # config.model, e.g. from a ProxQuant run: exported as it is instead of training + GPFQ.
    config.quantized_checkpoint = ""
