"""megatron_ztt: distributed pretraining of Zero Token Transformers."""

__version__ = "0.1.0"
