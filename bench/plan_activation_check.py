"""`ztt plan`'s activation model against measured peaks, one micro batch of the whole model.

    python bench/plan_activation_check.py [--sizes tiny mid wide] [--out work/bench/plan_activation]

For each size, with and without ``model.activation_checkpointing``: the planner's
``activation_bytes`` (one process, PP=1, fp32) against the measured peak of one micro
batch's forward and backward minus the static part. Measured: a torch dispatch mode counts
the bytes of every tensor storage created while it is on and frees them when the storage
dies, so its peak is the peak of live tensor memory of the step; the weights, their
gradients (allocated by a first step, kept) and the optimizer exist before it starts, so the
peak is the activation part (saved tensors plus backward's temporaries). One process, CPU;
the model is the training model (``ZTTModel``, megatron-core layers) on random tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import weakref
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("ZTT_DEVICE", "cpu")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_map_only  # noqa: E402

CONFIG = REPO / "launch" / "configs" / "tiny.yaml"
COMMON = ["model.vocab_size=2048", "model.exit_loss_weights=[0.1,0.1,1.0]"]
SIZES = {  # the tiny demo model, the layouts bench's mid size, a wider and longer one
    "tiny": ["model.hidden_size=128", "model.num_layers=4", "model.seq_length=128",
             "train.micro_batch_size=4"],
    "mid": ["model.hidden_size=384", "model.num_layers=6", "model.num_attention_heads=6",
            "model.num_query_groups=2", "model.seq_length=256", "train.micro_batch_size=2"],
    "wide": ["model.hidden_size=512", "model.num_layers=5", "model.num_attention_heads=8",
             "model.num_query_groups=2", "model.seq_length=512", "train.micro_batch_size=2"],
}


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the tensor storages created under this mode that are still alive; the peak."""

    def __init__(self, existing=()):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0
        # storages made before (weights, gradients): their views are no new memory
        self.existing = {t.untyped_storage().data_ptr() for t in existing}

    def _add(self, tensor):
        storage = tensor.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self.live or key in self.existing:
            return
        self.live[key] = size
        self.now += size
        self.peak = max(self.peak, self.now)

        def free(key=key, size=size):
            if self.live.pop(key, None) is not None:
                self.now -= size

        weakref.finalize(storage, free)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self._add, out)
        return out


def measure(config) -> int:
    """Peak live tensor bytes of one micro batch's forward + backward, gradients allocated."""
    from megatron_ztt.model.ztt import ZTTModel
    from megatron_ztt.parallel import runtime

    runtime.seed_everything(config.train.seed)
    model = ZTTModel(config.model)
    model.use_sequence_parallel(config.parallel.sequence_parallel)
    model.train()
    shape = (config.train.micro_batch_size, config.model.seq_length)
    tokens = torch.randint(0, config.model.vocab_size, shape)
    labels = torch.randint(0, config.model.vocab_size, shape)
    model(tokens, labels, collect_stats=False).loss.backward()  # the gradients exist from now
    mode = LiveTensorBytes([*model.parameters(), *(p.grad for p in model.parameters())])
    with mode:
        out = model(tokens, labels, collect_stats=False)
        out.loss.backward()
        del out
    return mode.peak


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="*", default=list(SIZES))
    parser.add_argument("--out", default="work/bench/plan_activation")
    args = parser.parse_args()
    from megatron_ztt.parallel import runtime
    from megatron_ztt.training.plan import load_plan_config, plan_layout

    torch.set_num_threads(1)
    rows = []
    for size in args.sizes:
        for checkpointing in (False, True):
            overrides = COMMON + SIZES[size] + [
                f"model.activation_checkpointing={str(checkpointing).lower()}"]
            config = load_plan_config(str(CONFIG), overrides)
            planned = plan_layout(config, 1, 1).per_rank[0].activation_bytes
            runtime.init_distributed(seed=config.train.seed)
            try:
                measured = measure(config)
            finally:
                runtime.shutdown_distributed()
            rows.append({"size": size, "activation_checkpointing": checkpointing,
                         "overrides": overrides, "planned_bytes": planned,
                         "measured_bytes": measured, "error": planned / measured - 1})
            print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps({"results": rows}, indent=2))
    print("| size | checkpointing | planned MiB | measured peak - static MiB | planned / measured |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {'on' if r['activation_checkpointing'] else 'off'} | "
              f"{r['planned_bytes'] / 2**20:.1f} | {r['measured_bytes'] / 2**20:.1f} | "
              f"{1 + r['error']:.3f} |")


if __name__ == "__main__":
    main()
