"""megatron_ztt: distributed pretraining of Zero Token Transformers."""

import warnings

__version__ = "0.1.0"

# megatron-core announces on import that the optional CUDA extensions (Apex, Transformer
# Engine) are absent and that it uses its torch fallbacks; that is the intended CPU path.
for _message in (r"Apex is not installed", r"Transformer Engine and Apex are not installed",
                 r"full scope is deprecated"):
    warnings.filterwarnings("ignore", message=_message, category=UserWarning)
# DeepSpeed still calls this torch.distributed API; the warning is DeepSpeed's to fix.
warnings.filterwarnings("ignore", message=r"`torch.distributed.all_gather_into_tensor` is deprecated",
                        category=FutureWarning)
