"""Forward+backward step time: ZTT (L=4, C=3: 8 layer applications) against a plain
megatron-core transformer of 8 layers and the same width, in one run.

    python bench/model_step_time.py [--hidden 256 --seq 256 --batch 4 --steps 10]

The baseline is megatron-core's ``TransformerBlock`` (local layer spec, SDPA causal core
attention: megatron-core's own attention kernel needs CUDA) between the same embedding and
output layer. Prints a JSON report; ``ratio`` = ZTT median step time / baseline's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def build_models(args):
    from megatron.core.transformer.transformer_block import TransformerBlock

    from megatron_ztt.model.config import ZTTConfig
    from megatron_ztt.model.layers import (OutputHead, TokenEmbedding, language_model_loss,
                                           layer_spec, rotary_embedding, transformer_config)
    from megatron_ztt.model.ztt import ZTTModel

    common = dict(vocab_size=args.vocab, hidden_size=args.hidden, num_attention_heads=args.heads,
                  seq_length=args.seq)
    ztt = ZTTModel(ZTTConfig(num_layers=4, num_cycles=3, cycle_mode="head_tail",
                             zero_token=True, gate=True, **common))
    htc = ZTTModel(ZTTConfig(num_layers=4, num_cycles=3, cycle_mode="head_tail",
                             zero_token=False, gate=False, **common))
    plain_config = ZTTConfig(num_layers=8, num_cycles=1, cycle_mode="vanilla", zero_token=False,
                             gate=False, **common)

    class PlainMegatronTransformer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = TokenEmbedding(plain_config)
            self.block = TransformerBlock(transformer_config(plain_config),
                                          layer_spec(plain_config), post_layer_norm=False)
            self.output_head = OutputHead(plain_config)

        def forward(self, ids, labels):
            rope = rotary_embedding(plain_config, ids.shape[1], ids.device)
            hidden = self.block(self.embedding(ids), attention_mask=None, rotary_pos_emb=rope)
            return language_model_loss(
                self.output_head(hidden, embedding_weight=self.embedding.weight), labels)

    return {
        "megatron_8_layers": (PlainMegatronTransformer(), lambda m, x, y: m(x, y)),
        "ztt_L4_C3": (ztt, lambda m, x, y: m(x, y, collect_stats=False).loss),
        "ztt_L4_C3_with_stats": (ztt, lambda m, x, y: m(x, y, collect_stats=True).loss),
        "head_tail_L4_C3": (htc, lambda m, x, y: m(x, y, collect_stats=False).loss),
    }


def time_steps(model, step, ids, labels, steps, warmup):
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        loss = step(model, ids, labels)
        loss.backward()
        model.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3,
                        help="models are timed in turn, this many rounds, to even out drift")
    parser.add_argument("--out", help="also write the JSON report here")
    args = parser.parse_args()

    from megatron_ztt.parallel import runtime

    runtime.init_distributed(seed=0)
    models = build_models(args)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    labels = torch.randint(0, args.vocab, (args.batch, args.seq))
    times = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, (model, step) in models.items():
            times[name] += time_steps(model, step, ids, labels, args.steps, args.warmup)
    medians = {name: statistics.median(t) for name, t in times.items()}
    base = medians["megatron_8_layers"]
    report = {
        "settings": vars(args) | {"threads": torch.get_num_threads()},
        "median_step_seconds": medians,
        "ratio_vs_megatron": {name: m / base for name, m in medians.items()},
        "ratio": medians["ztt_L4_C3"] / base,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    runtime.shutdown_distributed()


if __name__ == "__main__":
    main()
