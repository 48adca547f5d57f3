"""A micro training configuration for the training tests."""

from megatron_ztt.config import load_config

# A model and run small enough for a few steps on one CPU core in seconds.
MICRO_OVERRIDES = [
    "data.split=90,5,5",
    "model.vocab_size=512", "model.hidden_size=32", "model.num_layers=3",
    "model.num_attention_heads=4", "model.num_query_groups=2", "model.seq_length=32",
    "model.num_cycles=2", "model.make_vocab_size_divisible_by=64",
    "model.exit_loss_weights=[0.5,1.0]",
    "train.micro_batch_size=2", "train.global_batch_size=8", "train.train_iters=4",
    "train.lr=1e-2", "train.min_lr=1e-3", "train.warmup_iters=1",
    "checkpoint.interval=1000", "eval.interval=1000", "eval.iters=1", "logging.interval=2",
]


def micro_overrides(data, run_dir, *overrides):
    """Dotted overrides of the micro run on ``data`` = (prefix, tokenizer) into ``run_dir``."""
    prefix, tokenizer = data
    return [f"run.dir={run_dir}", f"data.blend=[{prefix}]", f"data.tokenizer={tokenizer}",
            *MICRO_OVERRIDES, *overrides]


def micro_config(data, run_dir, *overrides):
    return load_config(None, micro_overrides(data, run_dir, *overrides))
