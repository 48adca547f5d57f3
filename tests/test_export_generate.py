"""Generation with the exported model: the KV cache changes nothing, padding changes nothing,
early exit runs the cycles it says it runs, and ``ztt generate`` prints text and cycles."""

import math

import pytest
import torch

from export_helpers import build_and_export, load_export, train_sentencepiece
from model_helpers import batch

GREEDY = dict(do_sample=False, eos_token_id=None)  # fixed length: no early stop on EOS
# A random model with tied embeddings mostly predicts its input token again; untied ones
# produce varied greedy continuations, so that a wrong cache shows up in the tokens.
VARIED = dict(tie_embeddings=False)


@pytest.fixture(scope="module")
def exported(single_process, tmp_path_factory):
    """The ZTT variant (head-tail cycling, zero tokens, gate, GQA) with a tokenizer."""
    from megatron_ztt.parallel import runtime

    runtime.seed_everything(1234)
    directory = tmp_path_factory.mktemp("generate")
    tokenizer_model = train_sentencepiece(directory)
    model, config, path = build_and_export("ztt-gqa", directory / "export", tokenizer_model,
                                           **VARIED)
    return load_export(path), config, path


def prompts(config, size=2, length=6):
    ids, _ = batch(config, size=size, seed=7)
    return ids[:, :length]


@pytest.mark.parametrize("name", ["ztt-gqa", "head-tail-no-zero-token"])
def test_greedy_generation_with_cache_equals_without(seeded, tmp_path, name):
    _, config, path = build_and_export(name, tmp_path / "export", **VARIED)
    model = load_export(path)
    ids = prompts(config)
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=16, use_cache=True, **GREEDY)
        recomputed = model.generate(ids, max_new_tokens=16, use_cache=False, **GREEDY)
    assert cached.shape == (2, ids.shape[1] + 16)
    assert all(len(set(row[ids.shape[1]:].tolist())) >= 8 for row in cached)
    assert torch.equal(cached, recomputed)


def test_left_padding_changes_nothing(exported):
    model, config, _ = exported
    long_prompt, short_prompt = prompts(config, length=9)
    short_prompt = short_prompt[:5]
    pad = model.config.pad_token_id
    padded = torch.stack([long_prompt, torch.cat([torch.full((4,), pad), short_prompt])])
    mask = torch.ones_like(padded)
    mask[1, :4] = 0
    with torch.no_grad():
        together = model.generate(padded, attention_mask=mask, max_new_tokens=10, **GREEDY)
        together_no_cache = model.generate(padded, attention_mask=mask, max_new_tokens=10,
                                           use_cache=False, **GREEDY)
        alone = [model.generate(p[None], max_new_tokens=10, **GREEDY)[0]
                 for p in (long_prompt, short_prompt)]
    assert len(set(together[1, 9:].tolist())) >= 5
    assert torch.equal(together, together_no_cache)
    assert torch.equal(together[0, 9:], alone[0][9:])
    assert torch.equal(together[1, 9:], alone[1][5:])


@pytest.mark.parametrize("mode", ["sequence", "token"])
def test_exit_threshold_zero_uses_one_cycle_and_above_one_all(exported, mode):
    model, config, _ = exported
    ids = prompts(config)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=8, exit_threshold=0.0, exit_mode=mode, **GREEDY)
        assert model.generation_cycles_used.shape == (2, 8)
        assert torch.all(model.generation_cycles_used == 1)
        assert model.mean_cycles_used == 1.0
        model.generate(ids, max_new_tokens=8, exit_threshold=1.01, exit_mode=mode, **GREEDY)
        assert torch.all(model.generation_cycles_used == config.num_cycles)
        assert model.mean_cycles_used == config.num_cycles


def test_config_threshold_is_the_default_and_a_call_overrides_it(seeded, tmp_path):
    _, config, path = build_and_export("ztt-gqa", tmp_path / "export", exit_threshold=0.0,
                                       **VARIED)
    model = load_export(path)
    assert model.config.exit_threshold == 0.0
    ids = prompts(config, size=1)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, **GREEDY)
        assert model.mean_cycles_used == 1.0
        model.generate(ids, max_new_tokens=4, exit_threshold=math.inf, **GREEDY)
        assert model.mean_cycles_used == config.num_cycles


def test_early_exit_skips_the_middle_layers(exported):
    """One decoding step with threshold 0 runs each middle layer once, not once per cycle."""
    model, config, _ = exported
    calls = {i: 0 for i in range(config.num_layers)}
    hooks = [layer.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, layer in enumerate(model.model.layers)]
    try:
        ids = prompts(config, size=1)
        with torch.no_grad():
            prefill = model(ids, use_cache=True, exit_threshold=0.0)
            for i in calls:
                calls[i] = 0
            model(ids[:, -1:], cache=prefill.cache, exit_threshold=0.0)
            assert calls == {0: 1, 1: 1, 2: 1, 3: 1}
            model(ids[:, -1:], cache=prefill.cache, exit_threshold=None)
            assert calls == {0: 2, 1: 1 + config.num_cycles, 2: 1 + config.num_cycles, 3: 2}
    finally:
        for hook in hooks:
            hook.remove()


def _token_exit_threshold(model, ids):
    """A threshold between the tokens' cycle-1 zero attention values: some tokens stop early."""
    with torch.no_grad():
        for threshold in torch.linspace(0.05, 0.6, 23).tolist():
            cycles = model(ids, use_cache=False, exit_threshold=threshold,
                           exit_mode="token").cycles_used
            if (cycles == 1).float().mean() > 0.2 and (cycles == 3).float().mean() > 0.2:
                return threshold
    raise AssertionError("no threshold splits the tokens; the test model is degenerate")


def test_token_exit_with_cache_equals_recomputation(exported):
    """Per-token exit: decoding token by token through the cache (skipped cycles' key/values
    filled from the last computed cycle) gives the logits and cycles of one full pass."""
    from transformers import DynamicCache

    model, config, _ = exported
    ids, _ = batch(config, size=2, seed=3)
    threshold = _token_exit_threshold(model, ids)
    with torch.no_grad():
        full = model(ids, use_cache=False, exit_threshold=threshold, exit_mode="token")
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, t:t + 1], cache=cache, exit_threshold=threshold, exit_mode="token")
                 for t in range(ids.shape[1])]
    assert torch.equal(torch.cat([s.cycles_used for s in steps], dim=1), full.cycles_used)
    logits = torch.cat([s.logits for s in steps], dim=1)
    assert (logits - full.logits).abs().max().item() <= 1e-4

    # The cache holds, for every skipped cycle, the key/values of the token's last cycle.
    plan = model.model.plan
    entry = {(app.layer, app.cycle): cache.layers[app.index] for app in plan
             if app.cycle is not None}
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1]):
            used = int(full.cycles_used[b, t])
            for layer in config.cycled_layers:
                last = entry[(layer, used - 1)]
                for cycle in range(used, config.num_cycles):
                    skipped = entry[(layer, cycle)]
                    # row 0 of every cache layer is the zero key: token t is row t + 1
                    assert torch.equal(skipped.keys[b, :, t + 1], last.keys[b, :, t + 1])
                    assert torch.equal(skipped.values[b, :, t + 1], last.values[b, :, t + 1])


def test_cli_generate_prints_continuation_and_cycles(exported, capsys):
    from megatron_ztt.cli import main

    _, config, path = exported
    code = main(["generate", "--model", str(path), "--prompt", "Dorothy lived in the midst",
                 "--max-new-tokens", "6", "--exit-threshold", "0"])
    out, err = capsys.readouterr()
    assert code == 0
    assert out.strip()
    assert f"mean cycles used: 1.00 of {config.num_cycles}" in err


def test_cli_sampling_with_top_p_and_repetition_penalty_is_reproducible(exported, capsys):
    from megatron_ztt.cli import main

    _, _, path = exported
    sample = ["generate", "--model", str(path), "--prompt", "Dorothy lived in the midst",
              "--max-new-tokens", "12", "--temperature", "0.8", "--top-p", "0.9",
              "--repetition-penalty", "1.3"]
    outputs = []
    for seed in (7, 7, 8):
        assert main(sample + ["--seed", str(seed)]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] != outputs[2]
    assert main(sample + ["--repetition-penalty", "0"]) == 1
    assert capsys.readouterr().err == (
        "ztt generate: error: --repetition-penalty must be a finite number > 0 (1 is no penalty), "
        "got 0.0\n")


def test_repetition_penalty_keeps_greedy_decoding_off_tokens_already_seen(exported):
    from megatron_ztt.inference.generate import generate_text, load

    _, _, path = exported
    model, tokenizer = load(path)
    prompt = "Dorothy lived"
    seen = set(tokenizer(prompt)["input_ids"])
    plain, _ = generate_text(model, tokenizer, prompt, max_new_tokens=10)
    penalised, _ = generate_text(model, tokenizer, prompt, max_new_tokens=10,
                                 repetition_penalty=1e9)
    assert plain != penalised
    # a huge penalty leaves a seen token only when no unseen one scores above zero
    new = tokenizer(penalised, add_special_tokens=False)["input_ids"]
    assert len(set(new)) >= len(new) - 1 and len(set(new) & seen) <= 1, (new, seen)


def test_cli_generate_from_a_checkpoint_exports_first(exported, tmp_path, capsys, monkeypatch):
    """A training checkpoint goes through the same export (into a temporary directory)."""
    from megatron_ztt.cli import main
    from megatron_ztt.export import hf as hf_export
    from megatron_ztt.model.ztt import ZTTModel
    from megatron_ztt.parallel.sharding import gather_full_state_dict

    _, config, path = exported
    tokenizer_model = next(path.parent.glob("*.model"))
    state = gather_full_state_dict(ZTTModel(config))
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    monkeypatch.setattr(hf_export, "load_checkpoint_state",
                        lambda where: (config, state, str(tokenizer_model)))
    code = main(["generate", "--model", str(checkpoint), "--prompt", "The Wizard",
                 "--max-new-tokens", "4", "--exit-threshold", "2"])
    out, err = capsys.readouterr()
    assert code == 0 and out.strip()
    assert f"mean cycles used: {config.num_cycles:.2f}" in err
    assert list(checkpoint.iterdir()) == []  # nothing written next to the checkpoint


def test_cli_generate_reports_a_missing_model(tmp_path, capsys):
    from megatron_ztt.cli import main

    code = main(["generate", "--model", str(tmp_path / "absent"), "--prompt", "x"])
    assert code == 1
    assert "absent" in capsys.readouterr().err


def test_cli_generate_refuses_early_exit_without_zero_tokens(seeded, tmp_path, capsys):
    from megatron_ztt.cli import main

    _, _, path = build_and_export("head-tail-no-zero-token", tmp_path / "export",
                                  train_sentencepiece(tmp_path))
    code = main(["generate", "--model", str(path), "--prompt", "x", "--max-new-tokens", "2",
                 "--exit-threshold", "0.5"])
    assert code == 1
    assert "zero tokens" in capsys.readouterr().err


def test_cli_generate_refuses_an_empty_prompt_and_cuts_one_beyond_the_context(exported,
                                                                             capsys):
    from megatron_ztt.cli import main
    from megatron_ztt.inference.generate import fit_prompt

    model, config, path = exported
    assert main(["generate", "--model", str(path), "--prompt", ""]) == 1
    err = capsys.readouterr().err
    assert "the prompt is empty" in err and "Traceback" not in err
    with pytest.raises(ValueError, match="the prompt is empty"):
        fit_prompt(torch.zeros(1, 0, dtype=torch.long), 4, config.seq_length)

    long_prompt = "Dorothy lived in the midst of the great Kansas prairies " * 4
    code = main(["generate", "--model", str(path), "--prompt", long_prompt,
                 "--max-new-tokens", "4"])
    out, err = capsys.readouterr()
    assert code == 0 and out.strip()
    room = config.seq_length - 4
    assert (f"exceeds the model's context of {config.seq_length}: using its last {room} "
            f"tokens") in err
    assert "Token indices sequence length" not in err  # no second, transformers warning
    assert main(["generate", "--model", str(path), "--prompt", "x",
                 "--max-new-tokens", str(config.seq_length)]) == 1
    assert "leaves no room for the prompt" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["generate", "eval"])
@pytest.mark.parametrize("value", ["-1", "nan", "NaN", "-inf", "x"])
def test_exit_threshold_must_be_a_number_at_least_zero(command, value, capsys):
    from megatron_ztt.cli import main

    args = (["generate", "--model", "m", "--prompt", "p"] if command == "generate"
            else ["eval", "--checkpoint", "c"])
    with pytest.raises(SystemExit) as exit_info:
        main(args + [f"--exit-threshold={value}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--exit-threshold: must be a" in err and repr(value) in err


def test_exit_threshold_inf_only_for_generate():
    from megatron_ztt.config import exit_threshold_arg

    assert exit_threshold_arg(allow_inf=True)("inf") == math.inf
    assert exit_threshold_arg()("0.25") == 0.25 and exit_threshold_arg()("0") == 0.0
    with pytest.raises(Exception, match="finite"):
        exit_threshold_arg()("inf")
