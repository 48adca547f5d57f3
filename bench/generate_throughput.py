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
the fastest early exit can be), per sequence and per token.
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
                       cycle_mode="head_tail", zero_token=True, gate=True)
    state = gather_full_state_dict(ZTTModel(config))
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
        pad_token_id=3, attn_implementation="sdpa"))
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


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="ztt-bench-") as scratch:
        ztt, config = build_ztt(args, Path(scratch))
    llama = build_llama(config)
    prompt = torch.randint(4, config.vocab_size, (args.batch, args.prompt_tokens),
                           generator=torch.Generator().manual_seed(0))

    runs = {  # name -> (model, generate options)
        "llama": (llama, {}),
        "ztt full depth": (ztt, {}),
        "ztt exit check, never exits (threshold 1.01)": (ztt, {"exit_threshold": 1.01}),
        "ztt early exit, threshold 0, per sequence": (ztt, {"exit_threshold": 0.0,
                                                            "exit_mode": "sequence"}),
        "ztt early exit, threshold 0, per token": (ztt, {"exit_threshold": 0.0,
                                                         "exit_mode": "token"}),
    }
    times = {name: [] for name in runs}
    cycles = {}
    for model, options in runs.values():  # warm-up
        timed_generate(model, prompt, min(8, args.new_tokens), **options)
    for _ in range(args.repeats):
        for name, (model, options) in runs.items():
            times[name].append(timed_generate(model, prompt, args.new_tokens, **options))
            if model is ztt:
                cycles[name] = ztt.mean_cycles_used

    new_tokens = args.batch * args.new_tokens

    def speeds(name):
        walls = [wall for wall, _ in times[name]]
        cpu_ms = 1e3 * statistics.median(cpu for _, cpu in times[name]) / new_tokens
        return new_tokens / min(walls), new_tokens / statistics.median(walls), cpu_ms

    llama_best, llama_median, llama_cpu = speeds("llama")
    results = []
    print(f"d={config.hidden_size} heads={config.num_attention_heads}/{config.query_groups} "
          f"ffn={config.ffn_size} vocab={config.vocab_size} L={config.num_layers} "
          f"C={config.num_cycles} -> {config.num_applications} layer applications "
          f"(Llama: {config.num_applications} layers); batch {args.batch}, prompt "
          f"{args.prompt_tokens}, {args.new_tokens} new tokens, {args.threads} threads, "
          f"median of {args.repeats}, torch {torch.__version__}")
    print(f"{'model':46s} {'tok/s best':>10s} {'median':>7s} {'vs llama':>8s} "
          f"{'CPU ms/tok':>10s} {'vs llama':>8s} {'cycles/tok':>10s}")
    for name in runs:
        best, median, cpu_ms = speeds(name)
        row = dict(model=name, tokens_per_s_best=round(best, 1),
                   tokens_per_s_median=round(median, 1), speed_vs_llama=round(best / llama_best, 3),
                   cpu_ms_per_token=round(cpu_ms, 2), cpu_speed_vs_llama=round(llama_cpu / cpu_ms, 3),
                   mean_cycles=cycles.get(name))
        results.append(row)
        shown = "" if row["mean_cycles"] is None else f"{row['mean_cycles']:.2f}"
        print(f"{name:46s} {best:10.1f} {median:7.1f} {row['speed_vs_llama']:7.2f}x "
              f"{cpu_ms:10.2f} {row['cpu_speed_vs_llama']:7.2f}x {shown:>10s}")
    if args.json:
        args.json.write_text(json.dumps(dict(args={k: str(v) for k, v in vars(args).items()},
                                             results=results), indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
