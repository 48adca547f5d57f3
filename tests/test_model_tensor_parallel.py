"""TP=2 against TP=1 with the same weights: loss, logits, gathered gradients, early exit."""

import pytest
import torch

from distributed import run_distributed
from model_helpers import assert_close, batch, tiny_config

CONFIGS = {
    "mha": dict(num_attention_heads=4, num_query_groups=None, exit_loss_weights=[0.2, 0.3, 1.0]),
    "gqa": dict(num_attention_heads=4, num_query_groups=2),
    "basic-gelu-untied": dict(cycle_mode="basic", num_layers=2, activation="gelu",
                              tie_embeddings=False, num_query_groups=2),
}


def _worker(rank, weights, thresholds):
    from megatron_ztt.model.ztt import ZTTModel
    from megatron_ztt.parallel.sharding import (gather_full_grads, gather_full_state_dict,
                                                load_full_state_dict)

    results = {}
    for name, overrides in CONFIGS.items():
        config = tiny_config(**overrides)
        model = ZTTModel(config)
        if weights is None:
            full = gather_full_state_dict(model)
        else:
            full = weights[name]
            load_full_state_dict(model, full)
        ids, labels = batch(config, size=3)
        out = model(ids, labels, return_logits=True)
        out.loss.backward()
        model.eval()
        with torch.no_grad():
            threshold = thresholds.get(name, 0.5)
            exited = model(ids, exit_threshold=threshold) if config.zero_token else None
        results[name] = dict(
            weights=full, loss=out.loss.detach(), logits=out.logits.detach(),
            grads=gather_full_grads(model), zero_attention=out.zero_attention, gate=out.gate,
            exit_cycles=None if exited is None else exited.cycles_used,
            exit_logits=None if exited is None else exited.logits,
            first_cycle=out.zero_attention_by_cycle(model.plan)[1].item())
    return results


@pytest.mark.slow
def test_tensor_parallel_matches_single_rank():
    (single,) = run_distributed(_worker, world_size=1, args=(None, {}))
    weights = {name: r["weights"] for name, r in single.items()}
    # thresholds that make some (not necessarily all) sequences leave after cycle 1
    thresholds = {name: r["first_cycle"] for name, r in single.items()}
    (single,) = run_distributed(_worker, world_size=1, args=(weights, thresholds))
    ranks = run_distributed(_worker, world_size=2, tensor_parallel=2, args=(weights, thresholds))
    for name in CONFIGS:
        ref = single[name]
        for rank, result in enumerate(ranks):
            got = result[name]
            where = f"{name} rank {rank}"
            assert_close(got["loss"], ref["loss"], atol=1e-5, what=f"{where} loss")
            assert_close(got["logits"], ref["logits"], atol=1e-5, what=f"{where} logits")
            assert got["grads"].keys() == ref["grads"].keys()
            for param, grad in ref["grads"].items():
                assert_close(got["grads"][param], grad, atol=1e-5, rtol=1e-3,
                             what=f"{where} grad {param}")
            for app, value in ref["zero_attention"].items():
                assert_close(got["zero_attention"][app], value, atol=1e-6, what=f"{where} {app}")
            if ref["exit_cycles"] is not None:
                assert torch.equal(got["exit_cycles"], ref["exit_cycles"]), where
                assert_close(got["exit_logits"], ref["exit_logits"], atol=1e-5, what=where)
