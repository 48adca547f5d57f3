"""The model on a CUDA device (``cuda`` marker; tests/check_device.py picks the device):
fp32 forward and gradients equal the CPU's, a few bf16 DeepSpeed steps lower the loss, the
Hugging Face export gives the training model's logits and generates.

Without CUDA and without ``ZTT_CHECK_DEVICE`` these skip; ``bench/gpu_check.sh`` runs them
(``--cpu``: on the CPU, where the parity is trivial but training, export and generation run).
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from check_device import check_device
from conftest import REPO
from export_helpers import build_and_export, load_export, vary_small_parameters
from model_helpers import batch, tiny_config

pytestmark = pytest.mark.cuda
DEVICE = check_device()  # without CUDA and without ZTT_CHECK_DEVICE: the module is skipped

GREEDY = dict(do_sample=False, eos_token_id=None)  # fixed length: no early stop on EOS
EXPORT_MAX_ABS_DIFF = 1e-4


@pytest.fixture(scope="module")
def device():
    return DEVICE


def _close(got, expected, what, rtol=1e-4, atol=1e-5):
    """Equal up to ``rtol`` of the tensor's largest magnitude (plus ``atol``)."""
    got, expected = got.detach().float().cpu(), expected.detach().float().cpu()
    assert got.shape == expected.shape, f"{what}: {tuple(got.shape)} != {tuple(expected.shape)}"
    diff = (got - expected).abs().max().item()
    bound = rtol * expected.abs().max().item() + atol
    assert diff <= bound, f"{what}: max abs diff {diff:.3g} > {bound:.3g}"


def test_fp32_forward_and_gradients_match_the_cpu(device, seeded):
    from megatron_ztt.model.ztt import ZTTModel

    config = tiny_config(seq_length=32, exit_loss_weights=[0.3, 0.3, 1.0])
    reference = ZTTModel(config)
    vary_small_parameters(reference)  # gates and zero keys away from their initial values
    model = ZTTModel(config)
    model.load_state_dict(reference.state_dict())
    model.to(device)
    assert next(model.parameters()).device.type == device.type
    ids, labels = batch(config, size=3)

    outputs = {}
    for name, m, x, y in (("cpu", reference, ids, labels),
                          ("device", model, ids.to(device), labels.to(device))):
        m.train()
        out = m(x, y, return_logits=True)
        out.loss.backward()
        outputs[name] = out
    cpu, dev = outputs["cpu"], outputs["device"]
    assert dev.loss.device.type == device.type
    _close(dev.loss, cpu.loss, "loss")
    for cycle in cpu.exit_losses:
        _close(dev.exit_losses[cycle], cpu.exit_losses[cycle], f"exit loss {cycle}")
    _close(dev.logits, cpu.logits, "logits")
    for key in cpu.zero_attention:
        _close(dev.zero_attention[key], cpu.zero_attention[key], f"zero attention {key}")
    for cycle in cpu.gate:
        _close(dev.gate[cycle], cpu.gate[cycle], f"gate {cycle}")
    gradients = dict(model.named_parameters())
    checked = 0
    for name, param in reference.named_parameters():
        assert param.grad is not None and gradients[name].grad is not None, name
        _close(gradients[name].grad, param.grad, f"gradient of {name}", rtol=1e-3, atol=1e-7)
        checked += 1
    assert checked == len(gradients)

    # inference with early exit: the same sequences leave after the same cycles
    reference.eval()
    model.eval()
    with torch.no_grad():
        threshold = reference(ids).zero_attention_by_cycle(reference.plan)[1].item()
        expected = reference(ids, exit_threshold=threshold)
        got = model(ids.to(device), exit_threshold=threshold)
    assert torch.equal(got.cycles_used.cpu(), expected.cycles_used)
    _close(got.logits, expected.logits, "early-exit logits")


TRAIN = """
import json, sys
from megatron_ztt.parallel import runtime
from megatron_ztt.training.train import train
from train_helpers import micro_config

data, run_dir, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
iters = 8
result = train(micro_config(data, run_dir, "train.precision=bf16", f"train.train_iters={iters}",
                            f"train.lr_decay_iters={iters}", "logging.interval=1"))
with open(run_dir + "/status.json") as f:
    status = json.load(f)
with open(out, "w") as f:
    json.dump({"losses": result.losses, "skipped": result.skipped_steps, "status": status,
               "device": str(runtime.current_device())}, f)
runtime.shutdown_distributed()
"""


def test_bf16_deepspeed_steps_lower_the_loss(device, sample_data, tmp_path):
    """A real training run (DeepSpeed, ZeRO-1, bf16) in a process whose runtime uses the
    checked device."""
    env = dict(os.environ, ZTT_DEVICE=device.type, DS_ACCELERATOR=device.type,
               PYTHONUNBUFFERED="1")
    for launcher_variable in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(launcher_variable, None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"),
                                         env.get("PYTHONPATH", "")])
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "-c", TRAIN, json.dumps(list(sample_data)),
                           str(tmp_path / "run"), str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    losses = {int(k): v for k, v in result["losses"].items()}
    assert result["device"].split(":")[0] == device.type
    assert sorted(losses) == list(range(1, 9))
    assert all(math.isfinite(v) for v in losses.values()), losses
    assert result["skipped"] == 0
    assert losses[8] < losses[1] - 0.1, f"the loss should fall: {losses}"
    assert result["status"]["state"] == "completed"


def test_export_gives_the_training_logits_on_the_device(device, seeded, tmp_path):
    model, config, path = build_and_export("ztt-gqa", tmp_path / "export")
    exported = load_export(path).to(device)
    ids, _ = batch(config, size=4)
    with torch.no_grad():
        expected = model(ids).logits  # the training model, on the CPU
        for use_cache in (False, True):
            got = exported(ids.to(device), use_cache=use_cache).logits
            assert got.device.type == device.type
            diff = (got.cpu() - expected).abs().max().item()
            assert diff <= EXPORT_MAX_ABS_DIFF, f"use_cache={use_cache}: max abs diff {diff}"
        threshold = model(ids).zero_attention_by_cycle(model.plan)[1].item()
        expected = model(ids, exit_threshold=threshold)  # per token, as the export
        got = exported(ids.to(device), exit_threshold=threshold)
    assert expected.cycles_used.min() == 1 and expected.cycles_used.max() > 1
    assert torch.equal(got.cycles_used.cpu(), expected.cycles_used)
    assert (got.logits.cpu() - expected.logits).abs().max().item() <= EXPORT_MAX_ABS_DIFF

    # a bf16 export runs in bf16 on the device, close to the fp32 model
    from megatron_ztt.export.hf import export_hf
    from megatron_ztt.parallel.sharding import gather_full_state_dict

    bf16_path = export_hf(config, gather_full_state_dict(model), None, tmp_path / "export_bf16",
                          "bf16")
    exported = load_export(bf16_path, dtype="auto").to(device)
    assert exported.dtype == torch.bfloat16
    with torch.no_grad():
        got = exported(ids.to(device)).logits.float().cpu()
        expected = model(ids).logits
    assert (got - expected).abs().max().item() < 0.1 * expected.abs().max().item()


def _first_difference(a: torch.Tensor, b: torch.Tensor):
    rows, cols = torch.nonzero(a != b, as_tuple=True)
    return (rows[0].item(), cols.min().item()) if len(rows) else None


def test_generation_on_the_device(device, seeded, tmp_path):
    # untied embeddings: a random model then produces varied greedy continuations
    _, config, path = build_and_export("ztt-gqa", tmp_path / "export", tie_embeddings=False)
    on_cpu, on_device = load_export(path), load_export(path).to(device)
    prompt = batch(config, size=2, seed=7)[0][:, :6]
    new = 16
    with torch.no_grad():
        cached = on_device.generate(prompt.to(device), max_new_tokens=new, use_cache=True,
                                    **GREEDY)
        recomputed = on_device.generate(prompt.to(device), max_new_tokens=new, use_cache=False,
                                        **GREEDY)
        reference = on_cpu.generate(prompt, max_new_tokens=new, **GREEDY)
    assert cached.shape == (2, prompt.shape[1] + new) and cached.device.type == device.type
    assert all(len(set(row[prompt.shape[1]:].tolist())) >= 6 for row in cached.cpu())
    assert torch.equal(cached, recomputed)
    mismatch = _first_difference(cached.cpu(), reference)
    if mismatch is not None:
        # greedy decoding may only part ways at a near tie of the two best logits
        row, col = mismatch
        with torch.no_grad():
            logits = on_cpu(reference[row:row + 1, :col]).logits[0, -1]
        top = logits.topk(2).values
        assert (top[0] - top[1]).item() < 1e-3, (
            f"generation on {device} differs from the CPU's at sequence {row}, position {col} "
            f"without a near tie: {cached.cpu()[row].tolist()} vs {reference[row].tolist()}")

    # early exit while generating: threshold 0 leaves after one cycle, above 1 runs them all
    with torch.no_grad():
        for threshold, cycles in ((0.0, 1), (1.01, config.num_cycles)):
            on_device.generate(prompt.to(device), max_new_tokens=8, exit_threshold=threshold,
                               exit_mode="token", **GREEDY)
            assert torch.all(on_device.generation_cycles_used == cycles)
