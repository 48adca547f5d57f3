"""Decoding speed of an exported ZTT against transformers' Llama of the same width and depth.

    python bench/generate_throughput.py [--hidden 512 --heads 8 --layers 4 --cycles 3 ...]

Both models have random weights, the same hidden size, FFN size, heads and key/value heads,
vocabulary and tied embeddings; Llama gets as many layers as the ZTT runs layer applications
(2 + C(L-2) for head-tail cycling), so at full depth both do the same matrix work per token.
The ZTT goes through the real path: a training ``ZTTModel`` -> ``export_hf`` -> loaded with
``AutoModelForCausalLM.from_pretrained(trust_remote_code=True)``. Greedy decoding, KV cache,
a fixed number of new tokens (no EOS stop). The runs of all models are interleaved; reported
are new tokens per second of wall-clock time (best and median of ``--repeats``) and the CPU
time this process spent per new token (median), which a busy shared machine disturbs less.

ZTT rows: no early exit (full depth), the exit check on but a threshold that never fires
(what computing the zero attention costs), and threshold 0 (every token leaves after cycle 1:
the fastest early exit can be), per sequence and per token. Per token at the median of the
cycle-1 exit signal (measured on the new tokens of a full-depth run), about half of the rows
of a decoding step leave after cycle 1, and the later cycles run on the other rows only; the
same threshold with every row computed and the leavers overwritten (the engine's
``compute_exited``, how exits ran before) shows what gathering saves.

``--zero-key-std``: draw the zero keys of the random model with this std (a fresh model's
0.02 makes the zero attention fall with the position as 1 / number of keys, the same for
every row; with larger weights (``--init-std 0.1``) and zero keys (3) it varies from token
to token, as in a trained model, and the rows of a decoding step split). Batched decoding
with early exit: ``--batch 8 --init-std 0.1 --zero-key-std 3 --no-llama``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("ZTT_DEVICE", "cpu")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=None, help="default: --heads (MHA)")
    parser.add_argument("--layers", type=int, default=4, help="distinct ZTT layers L")
    parser.add_argument("--cycles", type=int, default=3, help="ZTT cycles C")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--zero-key-std", type=float, default=None,
                        help="draw the zero keys with this std (default: the model's init)")
    parser.add_argument("--init-std", type=float, default=0.02,
                        help="std of the random weights (ZTT and Llama)")
    parser.add_argument("--no-llama", action="store_true", help="time the ZTT rows only")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    return parser.parse_args(argv)


def build_ztt(args, directory: Path):
    """A random training ZTT, exported and loaded back through transformers."""
    from transformers import AutoModelForCausalLM

    from megatron_ztt.export.hf import export_hf
    from megatron_ztt.model.config import ZTTConfig
    from megatron_ztt.model.ztt import ZTTModel
    from megatron_ztt.parallel import runtime
    from megatron_ztt.parallel.sharding import gather_full_state_dict

    runtime.init_distributed(seed=1234)
    config = ZTTConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                       num_attention_heads=args.heads, num_query_groups=args.kv_heads,
                       num_cycles=args.cycles, seq_length=args.prompt_tokens + args.new_tokens,
                       cycle_mode="head_tail", zero_token=True, gate=True,
                       init_std=args.init_std)
    model = ZTTModel(config)
    if args.zero_key_std is not None:
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for key in model.zero_token_pool.keys.values():
                key.copy_(torch.randn(key.shape, generator=generator) * args.zero_key_std)
    state = gather_full_state_dict(model)
    path = export_hf(config, state, None, directory / "ztt", "fp32")
    del state
    runtime.shutdown_distributed()
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32)
    return model.eval(), config


def build_llama(config):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.ffn_size, num_hidden_layers=config.num_applications,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.query_groups,
        rms_norm_eps=config.norm_epsilon, tie_word_embeddings=True,
        max_position_embeddings=config.seq_length, bos_token_id=1, eos_token_id=2,
        pad_token_id=3, initializer_range=config.init_std, attn_implementation="sdpa"))
    return llama.to(torch.float32).eval()


def timed_generate(model, prompt, new_tokens, **options):
    """-> (wall seconds, CPU seconds of this process)."""
    with torch.no_grad():
        wall, cpu = time.perf_counter(), time.process_time()
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt),
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, **options)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert out.shape[1] == prompt.shape[1] + new_tokens
    return wall, cpu


def median_cycle_one_signal(ztt, prompt, new_tokens):
    """Median cycle-1 exit signal of the new tokens of a full-depth run (nobody exits)."""
    engine = ztt.model.engine
    seen, original = [], engine.exit_signal

    def spy(*args):
        signal = original(*args)
        seen.append(signal)
        return signal

    engine.exit_signal = spy
    try:
        timed_generate(ztt, prompt, new_tokens, exit_threshold=1.01)
    finally:
        del engine.exit_signal
    decisions = engine.num_cycles - 1  # per forward call: after cycles 1 .. C-1, in order
    decoding = [signal for signal in seen[decisions::decisions]]  # the prompt's call left out
    return float(torch.cat([signal.flatten() for signal in decoding]).median())


def host_syncs_per_step(ztt, prompt, **options):
    """Reads of a device value on the host (aten._local_scalar_dense) in one decoding step
    of the model (after a prefill), as ``generate`` calls it (with an attention mask)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    count = [0]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            count[0] += func is torch.ops.aten._local_scalar_dense.default
            return func(*args, **(kwargs or {}))

    with torch.no_grad():
        out = ztt(prompt, attention_mask=torch.ones_like(prompt), use_cache=True, **options)
        step = out.logits[:, -1:].argmax(-1)
        mask = torch.ones(prompt.shape[0], prompt.shape[1] + 1, dtype=torch.long)
        with Count():
            ztt(step, attention_mask=mask, cache=out.past_key_values, **options)
    return count[0]


class ComputeEverything:
    """The engine computes the tokens that left too (``compute_exited``) while in use."""

    def __init__(self, ztt):
        self.engine = ztt.model.engine

    def __enter__(self):
        self.engine.compute_exited = True

    def __exit__(self, *exc):
        self.engine.compute_exited = False


def main(argv=None):
    import contextlib

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="ztt-bench-") as scratch:
        ztt, config = build_ztt(args, Path(scratch))
    llama = None if args.no_llama else build_llama(config)
    prompt = torch.randint(4, config.vocab_size, (args.batch, args.prompt_tokens),
                           generator=torch.Generator().manual_seed(0))
    median = median_cycle_one_signal(ztt, prompt, args.new_tokens)

    runs = {  # name -> (model, generate options, context)
        "llama": (llama, {}, None),
        "ztt full depth": (ztt, {}, None),
        "ztt exit check, never exits (threshold 1.01)": (ztt, {"exit_threshold": 1.01}, None),
        f"ztt per token, threshold {median:.4f} (median)": (
            ztt, {"exit_threshold": median, "exit_mode": "token"}, None),
        f"ztt per token, threshold {median:.4f}, compute everything": (
            ztt, {"exit_threshold": median, "exit_mode": "token"}, ComputeEverything),
        "ztt early exit, threshold 0, per sequence": (ztt, {"exit_threshold": 0.0,
                                                            "exit_mode": "sequence"}, None),
        "ztt early exit, threshold 0, per token": (ztt, {"exit_threshold": 0.0,
                                                         "exit_mode": "token"}, None),
    }
    if llama is None:
        del runs["llama"]
    times = {name: [] for name in runs}
    cycles, left_after_one, mixed_steps = {}, {}, {}

    def generate(model, options, context, new_tokens):
        with context(model) if context else contextlib.nullcontext():
            return timed_generate(model, prompt, new_tokens, **options)

    for model, options, context in runs.values():  # warm-up
        generate(model, options, context, min(8, args.new_tokens))
    for _ in range(args.repeats):
        for name, (model, options, context) in runs.items():
            times[name].append(generate(model, options, context, args.new_tokens))
            if model is ztt:
                used = ztt.generation_cycles_used
                cycles[name] = ztt.mean_cycles_used
                left_after_one[name] = round(float((used == 1).float().mean()), 3)
                # decoding steps whose rows split: some left after cycle 1, some ran on
                split = (used == 1).any(dim=0) & (used > 1).any(dim=0)
                mixed_steps[name] = round(float(split[1:].float().mean()), 3)
    syncs = {name: host_syncs_per_step(ztt, prompt, **options)
             for name, (model, options, context) in runs.items()
             if model is ztt and context is None}

    new_tokens = args.batch * args.new_tokens

    def speeds(name):
        walls = [wall for wall, _ in times[name]]
        cpu_ms = 1e3 * statistics.median(cpu for _, cpu in times[name]) / new_tokens
        return new_tokens / min(walls), new_tokens / statistics.median(walls), cpu_ms

    reference = "ztt full depth" if llama is None else "llama"
    llama_best, llama_median, llama_cpu = speeds(reference)
    full_best, _, full_cpu = speeds("ztt full depth")
    results = []
    print(f"d={config.hidden_size} heads={config.num_attention_heads}/{config.query_groups} "
          f"ffn={config.ffn_size} vocab={config.vocab_size} L={config.num_layers} "
          f"C={config.num_cycles} -> {config.num_applications} layer applications "
          f"(Llama: {config.num_applications} layers); batch {args.batch}, prompt "
          f"{args.prompt_tokens}, {args.new_tokens} new tokens, {args.threads} threads, "
          f"median of {args.repeats}, zero keys std {args.zero_key_std or 'init'}, "
          f"torch {torch.__version__}, load {os.getloadavg()[0]:.2f}")
    print(f"{'model':52s} {'tok/s best':>10s} {'median':>7s} {'vs ' + reference:>8s} "
          f"{'CPU ms/tok':>10s} {'vs full':>7s} {'cycles':>6s} {'left c1':>7s} {'split':>5s} "
          f"{'syncs/step':>10s}")
    for name in runs:
        best, median, cpu_ms = speeds(name)
        row = dict(model=name, tokens_per_s_best=round(best, 1),
                   tokens_per_s_median=round(median, 1),
                   speed_vs_llama=None if llama is None else round(best / llama_best, 3),
                   speed_vs_full_depth=round(best / full_best, 3),
                   cpu_ms_per_token=round(cpu_ms, 2),
                   cpu_speed_vs_llama=None if llama is None else round(llama_cpu / cpu_ms, 3),
                   cpu_speed_vs_full_depth=round(full_cpu / cpu_ms, 3),
                   mean_cycles=cycles.get(name), left_after_cycle_1=left_after_one.get(name),
                   decoding_steps_with_split_rows=mixed_steps.get(name),
                   host_syncs_per_step=syncs.get(name))
        results.append(row)
        shown = "" if row["mean_cycles"] is None else f"{row['mean_cycles']:.2f}"
        left = "" if name not in left_after_one else f"{left_after_one[name]:.2f}"
        split = "" if name not in mixed_steps else f"{mixed_steps[name]:.2f}"
        print(f"{name:52s} {best:10.1f} {median:7.1f} {best / llama_best:7.2f}x "
              f"{cpu_ms:10.2f} {full_cpu / cpu_ms:6.2f}x {shown:>6s} {left:>7s} {split:>5s} "
              f"{syncs.get(name, ''):>10}")
    if args.json:
        args.json.write_text(json.dumps(dict(
            args={k: str(v) for k, v in vars(args).items()},
            omp_num_threads=os.environ.get("OMP_NUM_THREADS"), median_cycle_1_signal=median,
            load_average=os.getloadavg()[0],
            results=results), indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
