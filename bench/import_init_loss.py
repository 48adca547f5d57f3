"""Loss at step 0 of `ztt import-hf` imports, for each way of initialising ZTT's new parts.

    OMP_NUM_THREADS=1 python bench/import_init_loss.py [--steps 300] \
        [--out docs/results/import_init_loss.md]

A pretrained model is needed, and nothing is downloaded: the script first trains a tiny
Llama (LlamaForCausalLM, byte-level vocabulary of 256, 6 layers, hidden 64) on the bundled
sample books with plain torch, saves it with save_pretrained, and then imports it with
every option set below. Each import is loaded into the training model (TP=1) and evaluated
on the same held-out bytes (the last 10% of every book); the table gives the loss and its
change against the source model, which the no-zero-token C=1 import reproduces exactly.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SEQ = 64
# (label, import options): C, zero token, gate, zero-key init, gate init
VARIANTS = [
    ("C=1, no zero token, no gate", dict(num_cycles=1, zero_token=False, gate=False)),
    ("C=1, zero keys zeros, no gate", dict(num_cycles=1, zero_key_init="zeros", gate=False)),
    ("C=1, no zero token, gate open", dict(num_cycles=1, zero_token=False)),
    ("C=1, zero keys zeros, gate open", dict(num_cycles=1, zero_key_init="zeros")),
    ("C=1, zero keys normal, gate open", dict(num_cycles=1, zero_key_init="normal")),
    ("C=2, no zero token, no gate", dict(num_cycles=2, zero_token=False, gate=False)),
    ("C=2, zero keys zeros, gate open", dict(num_cycles=2, zero_key_init="zeros")),
    ("C=2, zero keys normal, gate open", dict(num_cycles=2, zero_key_init="normal")),
    ("C=2, zero keys zeros, gate closed-after-first",
     dict(num_cycles=2, zero_key_init="zeros", gate_init="closed-after-first")),
    ("C=2, zero keys normal, gate closed-after-first",
     dict(num_cycles=2, zero_key_init="normal", gate_init="closed-after-first")),
    ("C=3, zero keys zeros, gate open", dict(num_cycles=3, zero_key_init="zeros")),
    ("C=3, zero keys zeros, gate closed-after-first",
     dict(num_cycles=3, zero_key_init="zeros", gate_init="closed-after-first")),
]


def byte_splits():
    """Training and held-out bytes of the sample books (last 10% of each book held out)."""
    train, held = [], []
    for book in sorted((REPO / "data" / "sample").glob("*.txt")):
        data = torch.tensor(list(book.read_bytes()), dtype=torch.long)
        cut = int(len(data) * 0.9)
        train.append(data[:cut])
        held.append(data[cut:])
    return torch.cat(train), torch.cat(held)


def windows(data, count, generator):
    starts = torch.randint(0, len(data) - SEQ - 1, (count,), generator=generator)
    chunk = torch.stack([data[s:s + SEQ + 1] for s in starts.tolist()])
    return chunk[:, :-1], chunk[:, 1:]


def train_source(directory: Path, steps: int, train_bytes) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
        tie_word_embeddings=True))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    generator = torch.Generator().manual_seed(0)
    for step in range(steps):
        ids, labels = windows(train_bytes, 16, generator)
        logits = model(ids).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"  source step {step}: train loss {loss.item():.3f}", flush=True)
    model.save_pretrained(directory)


@torch.no_grad()
def held_out_loss(checkpoint: str, batches) -> float:
    from megatron_ztt.checkpoint import load_trained
    from megatron_ztt.model.ztt import ZTTModel
    from megatron_ztt.parallel.sharding import load_full_state_dict

    trained = load_trained(checkpoint)
    model = ZTTModel(trained.model_config).eval()
    load_full_state_dict(model, trained.state)
    losses = [model(ids, labels).lm_loss.item() for ids, labels in batches]
    return sum(losses) / len(losses)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps of the source")
    parser.add_argument("--batches", type=int, default=8, help="held-out batches of 16 x 64")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args()

    from megatron_ztt.parallel import runtime
    from megatron_ztt.pretrained.import_hf import ImportOptions, import_hf

    runtime.init_distributed(seed=1234)
    train_bytes, held_bytes = byte_splits()
    generator = torch.Generator().manual_seed(1)
    batches = [windows(held_bytes, 16, generator) for _ in range(args.batches)]
    start = time.time()
    with tempfile.TemporaryDirectory() as root:
        source = Path(root) / "tiny-llama"
        train_source(source, args.steps, train_bytes)
        rows = []
        for i, (label, options) in enumerate(VARIANTS):
            out = str(Path(root) / f"import{i}")
            import_hf(out, model_dir=str(source), options=ImportOptions(**options),
                      log=lambda message: None)
            rows.append((label, held_out_loss(out, batches)))
    reference = rows[0][1]
    lines = ["| import | held-out loss | change vs source |", "|---|---|---|"]
    lines += [f"| {label} | {loss:.4f} | {loss - reference:+.4f} |" for label, loss in rows]
    table = "\n".join(lines)
    print(table)
    print(f"(source: tiny Llama, {args.steps} steps; {args.batches} held-out batches of 16 x "
          f"{SEQ} bytes; {time.time() - start:.0f} s)")
    if args.out:
        Path(args.out).write_text(table + "\n")
    assert all(math.isfinite(loss) for _, loss in rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
