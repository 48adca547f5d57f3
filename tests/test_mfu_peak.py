"""The MFU denominator: a configured number wins; ``auto`` is the table's dense bf16 peak of
a known accelerator on CUDA and the measured matmul peak (a second at most) on a CPU."""

import time

import pytest
import torch

from megatron_ztt.config import load_config
from megatron_ztt.model.config import ConfigError
from megatron_ztt.parallel.runtime import known_peak_flops
from megatron_ztt.training.metrics import peak_flops_per_device


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H200", 989e12), ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA GH200 480GB", 989e12), ("NVIDIA L40S", 362e12),
    ("NVIDIA L4", 121e12), ("Some Future Accelerator", None)])
def test_known_accelerators_have_their_dense_bf16_peak(name, peak):
    assert known_peak_flops(name) == peak


def test_a_configured_peak_wins():
    assert peak_flops_per_device(2.5e12, torch.float32) == (2.5e12,
                                                            "logging.peak_flops_per_device")


def test_auto_on_the_cpu_measures_the_matmul_peak_within_a_second(monkeypatch):
    monkeypatch.setenv("ZTT_DEVICE", "cpu")
    start = time.perf_counter()
    peak, source = peak_flops_per_device("auto", torch.float32)
    assert time.perf_counter() - start < 1.0
    assert 1e8 < peak < 1e14  # a CPU core: some GFLOP/s, never a data-centre GPU
    assert source.startswith("auto:") and "measured float32 matmul peak" in source


def _config(*overrides):
    return load_config(None, ["data.blend=[x]", "data.tokenizer=missing.model", *overrides])


def test_the_setting_is_auto_by_default_and_takes_numbers():
    assert _config().logging.peak_flops_per_device == "auto"
    assert _config("logging.peak_flops_per_device=1e12").logging.peak_flops_per_device == 1e12
    assert _config("logging.peak_flops_per_device=9.89e14").logging.peak_flops_per_device == 9.89e14


@pytest.mark.parametrize("value", ["fast", "0", "-1e12", "nan"])
def test_a_bad_peak_fails_naming_the_setting(value):
    with pytest.raises(ConfigError, match="logging.peak_flops_per_device: must be auto or a finite number"):
        _config(f"logging.peak_flops_per_device={value}")
