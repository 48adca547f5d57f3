"""bf16 circular pipeline, C=4 cycles x 8 micro batches, PP=2: the shared block's 32 gradient
contributions per parameter add up in fp32 (``engines.Fp32GradientSums``), so the gradient
DeepSpeed receives is within one bf16 rounding of the exact sum of the contributions; summed
in bf16 (the hooks removed, as on main) it is several times further off."""

import sys
from pathlib import Path

import pytest

from distributed import run_distributed

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))


@pytest.mark.slow
def test_the_shared_block_gradient_sums_in_fp32(sample_data, tmp_path):
    from grad_accum_precision import measure

    prefix, tokenizer = sample_data
    result = run_distributed(measure, world_size=2, pipeline_parallel=2,
                             args=(prefix, tokenizer, str(tmp_path), 4, 8))[0]
    errors = result["relative_error"]
    print(f"bf16 shared-block gradient error vs the exact sum: {errors}")
    # one rounding to bf16 (8 bits of mantissa): at most 2^-9 per entry, ~1e-3 in norm
    assert errors["after"] < 2.5e-3, errors
    assert errors["before"] > 2 * errors["after"], errors


def test_fp32_sums_of_many_backward_calls_round_once():
    import torch

    from megatron_ztt.training.engines import Fp32GradientSums

    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.ones(256, dtype=torch.bfloat16))
    inputs = [torch.randn(256).to(torch.bfloat16) for _ in range(64)]
    exact = sum(x.double() for x in inputs)

    def error():
        for x in inputs:  # one backward call each, as the pipeline's virtual stages
            (weight * x).sum().backward()
        grad, weight.grad = weight.grad.double(), None
        return ((grad - exact).norm() / exact.norm()).item()

    plain = error()
    sums = Fp32GradientSums([weight])
    for x in inputs:
        (weight * x).sum().backward()
        assert weight.grad is None  # moved into the fp32 sum
    sums.write_grads()
    assert weight.grad.dtype == torch.bfloat16
    after = ((weight.grad.double() - exact).norm() / exact.norm()).item()
    assert after < 3e-3 < plain, (after, plain)


def test_deepspeed_sums_micro_batches_in_fp32_where_it_can():
    from megatron_ztt.config import load_config
    from megatron_ztt.training.optimizer import deepspeed_config

    def data_types(*overrides):
        config = load_config(None, ["data.blend=[x]", "data.tokenizer=missing.model",
                                    "train.global_batch_size=8", *overrides])
        return deepspeed_config(config, world_size=2).get("data_types")

    fp32 = {"grad_accum_dtype": "fp32"}
    assert data_types("train.precision=bf16", "parallel.zero_stage=2") == fp32
    assert data_types("train.precision=bf16", "parallel.zero_stage=3") == fp32
    assert data_types("train.precision=bf16", "parallel.zero_stage=1") is None
    assert data_types("train.precision=fp32", "parallel.zero_stage=2") is None
    assert data_types("train.precision=bf16", "parallel.pipeline=2") is None  # sums itself
