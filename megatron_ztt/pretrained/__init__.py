"""Pretrained models from elsewhere turned into ZTT checkpoints (``ztt import-hf``)."""
