"""Validation with early exit through the circular pipeline (PP=2 on gloo processes): the
same per-token exit decisions and logits as the training model (and so as the export,
tests/test_exit_signals.py) on the same weights, for every exit signal, with a cycle that
spans the stage boundary."""

import pytest
import torch

from distributed import run_distributed
from export_helpers import vary_small_parameters
from model_helpers import batch, tiny_config
from test_exit_signals import SIGNALS, splitting_threshold

MICRO_BATCHES, MICRO_BATCH = 2, 2


def _ring_evaluation(rank, config, state, ids, rules):
    """Each rule's (logits [b, s, vocab], cycles used [b, s]) from the last rank."""
    from megatron_ztt.model.layers import gather_logits
    from megatron_ztt.parallel import runtime
    from megatron_ztt.parallel.circular import CircularStage, evaluation_schedule
    from megatron_ztt.parallel.sharding import load_full_state_dict

    module = CircularStage(config, rank, 2).eval()
    load_full_state_dict(module, state, strict=False)
    outputs = []

    def keep_logits(output, target):  # the loss function sees each micro batch's final state
        final = output[0] if isinstance(output, tuple) else output
        outputs.append(gather_logits(module.logits_shard(final), config.vocab_size))
        return final.sum() * 0

    results = {}
    schedules = {}
    for rule in rules:
        exits = rule is not None
        if exits not in schedules:
            schedules[exits] = evaluation_schedule(module, MICRO_BATCHES, MICRO_BATCH, keep_logits,
                                                   runtime.current_device(), exits)
        module.start_evaluation(*(rule or (None,)))
        outputs.clear()
        target = torch.arange(MICRO_BATCHES)
        with torch.no_grad():
            schedules[exits].eval(*((ids,) if rank == 0 else ()), target=target,
                                  return_outputs=False)
        if module.is_last:
            used = torch.cat(module.cycles_used) if exits else None
            results[rule] = (torch.cat(outputs), used)
    return results


@pytest.mark.slow
def test_pipeline_validation_exits_like_the_training_model(seeded):
    from megatron_ztt.model.ztt import ZTTModel
    from megatron_ztt.parallel.sharding import gather_full_state_dict

    # 2 middle layers: each cycle runs layer 2 on rank 0 and layer 3 (and the gate) on rank 1
    config = tiny_config(num_cycles=3, num_layers=4)
    model = ZTTModel(config).eval()
    vary_small_parameters(model)
    ids, _ = batch(config, size=MICRO_BATCHES * MICRO_BATCH, seed=3)
    rules, expected = [None], {}
    with torch.no_grad():
        expected[None] = (model(ids).logits, None)
        for signal in SIGNALS:
            threshold = splitting_threshold(model, ids[:MICRO_BATCH], signal)
            rule = (threshold, "token", signal)
            rules.append(rule)
            # the ring evaluates micro batch by micro batch, as the training engine does
            parts = [model(ids[i:i + MICRO_BATCH], exit_threshold=threshold, exit_signal=signal)
                     for i in range(0, len(ids), MICRO_BATCH)]
            expected[rule] = (torch.cat([p.logits for p in parts]),
                              torch.cat([p.cycles_used for p in parts]))
    results = run_distributed(_ring_evaluation, world_size=2, pipeline_parallel=2,
                              args=(config, gather_full_state_dict(model), ids, rules))[1]
    for rule in rules:
        logits, used = results[rule]
        want_logits, want_used = expected[rule]
        if rule is not None:
            assert want_used.min() == 1 and want_used.max() > 1, rule
            assert torch.equal(used, want_used), rule
        assert (logits - want_logits).abs().max().item() <= 1e-4, rule
