"""Export from a tensor-parallel layout: TP=2 shards merge into exactly the TP=1 export, and the
exported model's logits equal the TP=2 training model's."""

import json

import pytest
import torch

from distributed import run_distributed
from export_helpers import (load_export, safetensors_tensors, vary_small_parameters,
                            variant_config)
from model_helpers import batch

TP_VARIANTS = ["ztt-gqa", "ztt-mha-untied-layernorm-gelu", "basic-cycles"]


def _tensor_parallel_worker(rank, weights):
    """Load the TP=1 weights into a TP=2 model; return its gathered state and its logits."""
    from megatron_ztt.model.ztt import ZTTModel
    from megatron_ztt.parallel.sharding import gather_full_state_dict, load_full_state_dict

    results = {}
    for name in TP_VARIANTS:
        config = variant_config(name)
        model = ZTTModel(config).eval()
        load_full_state_dict(model, weights[name])
        ids, _ = batch(config, size=3)
        with torch.no_grad():
            logits = model(ids).logits
        results[name] = dict(state=gather_full_state_dict(model), logits=logits)
    return results


@pytest.mark.slow
def test_tensor_parallel_export_equals_single_rank_export(seeded, tmp_path):
    from megatron_ztt.export.hf import export_hf
    from megatron_ztt.model.ztt import ZTTModel
    from megatron_ztt.parallel.sharding import gather_full_state_dict

    single = {}
    for name in TP_VARIANTS:
        model = ZTTModel(variant_config(name))
        vary_small_parameters(model)
        single[name] = gather_full_state_dict(model)
    ranks = run_distributed(_tensor_parallel_worker, world_size=2, tensor_parallel=2,
                            args=(single,))

    for name in TP_VARIANTS:
        config = variant_config(name)
        one = export_hf(config, single[name], None, tmp_path / f"{name}-tp1", "fp32")
        for rank, result in enumerate(r[name] for r in ranks):
            two = export_hf(config, result["state"], None, tmp_path / f"{name}-tp2-rank{rank}",
                            "fp32")
            tensors_one, tensors_two = safetensors_tensors(one), safetensors_tensors(two)
            assert tensors_one.keys() == tensors_two.keys()
            for tensor_name, tensor in tensors_one.items():
                assert torch.equal(tensor, tensors_two[tensor_name]), f"{name}: {tensor_name}"
            assert (json.loads((one / "config.json").read_text())
                    == json.loads((two / "config.json").read_text()))

            ids, _ = batch(config, size=3)
            with torch.no_grad():
                exported = load_export(two)(ids).logits
            diff = (exported - result["logits"]).abs().max().item()
            assert diff <= 1e-4, f"{name} rank {rank}: max abs diff {diff}"
