"""Exit signals and the depth dial: every signal gives the same per-token decisions and logits
in the training model and the export (with and without cache, with left padding), stays
causal, the length-normalised zero attention is 1 at every position under uniform attention,
``num_cycles`` below and above the trained C behaves as documented, and bad values are
refused with one line naming the setting."""

import pytest
import torch

from export_helpers import build_and_export, load_export
from model_helpers import assert_close, batch, tiny_config

SIGNALS = ["zero_attention", "zero_attention_relative", "hidden_change", "kl", "random"]
MAX_ABS_DIFF = 1e-4


@pytest.fixture(scope="module")
def pair(single_process, tmp_path_factory):
    """A training model (C = 3, varied gates and zero keys) and its export."""
    from megatron_ztt.parallel import runtime

    runtime.seed_everything(1234)
    model, config, path = build_and_export("ztt-gqa", tmp_path_factory.mktemp("signals") / "hf",
                                           tie_embeddings=False)
    return model, config, load_export(path)


def record_signals(engine, call):
    """Run ``call()`` and return the exit signal of every cycle ([tokens as the caller lays
    them out], one tensor per cycle)."""
    seen = []
    original = engine.exit_signal

    def spy(cycle, state, rule):
        signal = original(cycle, state, rule)
        seen.append(signal.clone())
        return signal

    engine.exit_signal = spy
    try:
        call()
    finally:
        del engine.exit_signal
    return seen


def never_exits(signal):
    from megatron_ztt.model.cycle_engine import EXIT_SIGNALS

    return 0.0 if EXIT_SIGNALS[signal].exits_below else float("inf")


def splitting_threshold(model, ids, signal):
    """A threshold at which some tokens stop after cycle 1 and others go on."""
    if signal == "random":
        return 0.5
    with torch.no_grad():
        first = record_signals(model.engine, lambda: model(
            ids, exit_threshold=never_exits(signal), exit_signal=signal))[0]
    return first.median().item()


@pytest.mark.parametrize("signal", SIGNALS)
def test_each_signal_gives_the_same_exits_in_training_model_and_export(pair, signal):
    from transformers import DynamicCache

    model, config, exported = pair
    ids, _ = batch(config, size=3, seed=11)
    threshold = splitting_threshold(model, ids, signal)
    options = dict(exit_threshold=threshold, exit_signal=signal)
    with torch.no_grad():
        expected = model(ids, **options)
        full = exported(ids, use_cache=False, **options)
        prefill = exported(ids, use_cache=True, **options)
        cache = DynamicCache(config=exported.config)  # token by token through the cache
        steps = [exported(ids[:, t:t + 1], cache=cache, **options) for t in range(ids.shape[1])]
    used = expected.cycles_used
    assert used.min() == 1 and used.max() > 1, f"{signal}: threshold {threshold} splits nothing"
    decoded = torch.cat([s.cycles_used for s in steps], dim=1)
    for got in (full.cycles_used, prefill.cycles_used, decoded):
        assert torch.equal(got, used), signal
    for got in (full.logits, prefill.logits, torch.cat([s.logits for s in steps], dim=1)):
        assert (got - expected.logits).abs().max().item() <= MAX_ABS_DIFF, signal


@pytest.mark.parametrize("signal", ["zero_attention_relative", "random", "hidden_change", "kl"])
def test_left_padding_keeps_each_tokens_decision(pair, signal):
    """Positions count a row's real tokens: a left-padded row decides as it does alone
    (``random`` draws per row too, so the padded row is row 0 as when alone)."""
    _, config, exported = pair
    ids, _ = batch(config, size=2, seed=4)
    short = ids[1, :10]
    pad = exported.config.pad_token_id
    padded = torch.stack([torch.cat([torch.full((6,), pad), short]), ids[0, :16]])
    mask = torch.ones_like(padded)
    mask[0, :6] = 0
    threshold = 0.5 if signal == "random" else None
    with torch.no_grad():
        if threshold is None:  # the median of the short row's own signals
            first = record_signals(exported.model.engine, lambda: exported(
                short[None], exit_threshold=never_exits(signal), exit_signal=signal))[0]
            threshold = first.median().item()
            if signal == "kl":  # between two tokens' values: a batch's rounding keeps sides
                values = first.flatten().sort().values
                middle = len(values) // 2
                threshold = 0.5 * (values[middle - 1] + values[middle]).item()
        options = dict(exit_threshold=threshold, exit_signal=signal)
        alone = exported(short[None], **options)
        together = exported(padded, attention_mask=mask, **options)
    assert alone.cycles_used.min() == 1 and alone.cycles_used.max() > 1
    assert torch.equal(together.cycles_used[0, 6:], alone.cycles_used[0])


def test_kl_signal_equals_in_training_model_and_export_and_reads_cycling_tokens(pair):
    """exit_signal=kl: the same KL per token (1e-5) in both models, with and without cache;
    after cycle 2 the tokens that left after cycle 1 are not read out (0)."""
    model, config, exported = pair
    ids, _ = batch(config, size=3, seed=12)
    threshold = splitting_threshold(model, ids, "kl")
    options = dict(exit_threshold=threshold, exit_signal="kl")
    with torch.no_grad():
        expected = record_signals(model.engine, lambda: model(ids, **options))
        got = record_signals(exported.model.engine, lambda: exported(ids, use_cache=False,
                                                                     **options))
        cycles_used = model(ids, **options).cycles_used
    assert len(expected) == len(got) == 2
    for cycle, (a, b) in enumerate(zip(expected, got)):
        # the training model lays tokens out [s, b], the export [b, s]
        assert (a.t() - b).abs().max().item() <= 1e-5, cycle
        assert (a >= -1e-6).all()  # a divergence
    left = cycles_used.t() == 1
    assert left.any() and (expected[1][left] == 0).all() and (expected[1][~left] > 0).all()


def zero_query_weights(model, training_model=False):
    """Every query becomes 0, so every attention score is 0: uniform attention."""
    with torch.no_grad():
        if training_model:  # fused [q heads, k, v] per key/value group
            config = model.config
            per_group = config.num_attention_heads // config.query_groups
            for layer in model.layers:
                weight = layer.self_attention.linear_qkv.weight
                view = weight.view(config.query_groups, per_group + 2, config.head_dim, -1)
                view[:, :per_group].zero_()
        else:
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.zero_()


def test_relative_zero_attention_is_one_at_every_position_under_uniform_attention(seeded):
    """Query i sees the zero key and i + 1 real keys; with all scores equal the zero
    attention is 1 / (i + 2), falling with i, while zero_attention_relative = A (i + 1) /
    (1 - A) is 1 everywhere."""
    from megatron_ztt.model.ztt import ZTTModel

    config = tiny_config(num_cycles=3)
    model = ZTTModel(config).eval()
    zero_query_weights(model, training_model=True)
    ids, _ = batch(config, size=2)
    positions = torch.arange(config.seq_length, dtype=torch.float32)[:, None].expand(-1, 2)
    with torch.no_grad():
        raw = record_signals(model.engine, lambda: model(
            ids, exit_threshold=float("inf"), exit_signal="zero_attention"))
        relative = record_signals(model.engine, lambda: model(
            ids, exit_threshold=float("inf"), exit_signal="zero_attention_relative"))
    assert len(raw) == len(relative) == config.num_cycles - 1
    for cycle in range(config.num_cycles - 1):  # [s, b] in the training model
        assert_close(raw[cycle], 1.0 / (positions + 2), atol=1e-5, what="raw zero attention")
        assert_close(relative[cycle], torch.ones_like(positions), atol=1e-4,
                     what="relative zero attention")
    assert raw[0][0, 0] > 2 * raw[0][-1, 0]  # the raw signal does depend on the position


def test_relative_zero_attention_is_one_with_padding_and_cache(pair):
    """The export counts the real keys a query sees with left padding and after a cache."""
    from transformers import DynamicCache

    _, config, exported = pair
    ids, _ = batch(config, size=2, seed=2)
    pad = exported.config.pad_token_id
    padded = torch.cat([torch.full((1, 5), pad), ids[1:, :11]], dim=1)
    prompts = torch.cat([ids[:1, :16], padded])
    mask = torch.ones_like(prompts)
    mask[1, :5] = 0
    state = {k: v.clone() for k, v in exported.state_dict().items()}
    zero_query_weights(exported)
    try:
        cache = DynamicCache(config=exported.config)
        options = dict(exit_threshold=float("inf"), exit_signal="zero_attention_relative")
        with torch.no_grad():
            prefill = record_signals(exported.model.engine, lambda: exported(
                prompts[:, :12], attention_mask=mask[:, :12], cache=cache, **options))
            step_mask = torch.cat([mask[:, :12], torch.ones(2, 1, dtype=mask.dtype)], dim=1)
            step = record_signals(exported.model.engine, lambda: exported(
                prompts[:, 12:13], attention_mask=step_mask, cache=cache, **options))
    finally:
        exported.load_state_dict(state)
    for signal in prefill:  # [b, s]; the padded row's real tokens
        assert_close(signal[0], torch.ones(12), atol=1e-4, what="unpadded row")
        assert_close(signal[1, 5:], torch.ones(7), atol=1e-4, what="padded row")
    for signal in step:
        assert_close(signal, torch.ones(2, 1), atol=1e-4, what="decoding step")


@pytest.mark.parametrize("signal", SIGNALS)
def test_token_exit_is_causal_with_every_signal(pair, signal):
    model, config, _ = pair
    ids, _ = batch(config, size=2, seed=5)
    threshold = splitting_threshold(model, ids, signal)
    with torch.no_grad():
        out = model(ids, exit_threshold=threshold, exit_signal=signal)
        assert (out.cycles_used == 1).any() and (out.cycles_used > 1).any()
        for t in (4, 10):
            changed = ids.clone()
            changed[:, t + 1:] = (changed[:, t + 1:] + 7) % config.vocab_size
            other = model(changed, exit_threshold=threshold, exit_signal=signal)
            assert torch.equal(other.cycles_used[:, :t + 1], out.cycles_used[:, :t + 1])
            assert_close(other.logits[:, :t + 1], out.logits[:, :t + 1], atol=1e-5,
                         what=f"{signal}: positions <= {t}")
            assert not torch.allclose(other.logits[:, t + 1:], out.logits[:, t + 1:])


def test_random_exits_at_the_asked_rate_and_follow_the_seed(seeded):
    from megatron_ztt.model.ztt import ZTTModel

    config = tiny_config(num_cycles=2, seq_length=64)
    model = ZTTModel(config).eval()
    ids, _ = batch(config, size=8)
    with torch.no_grad():
        first = model(ids, exit_threshold=0.3, exit_signal="random").cycles_used
        again = model(ids, exit_threshold=0.3, exit_signal="random").cycles_used
        model.config.exit_seed = 1
        other_seed = model(ids, exit_threshold=0.3, exit_signal="random").cycles_used
        model.config.exit_seed = 0
    assert torch.equal(first, again)
    assert not torch.equal(first, other_seed)
    rate = (first == 1).float().mean().item()  # 512 tokens, p = 0.3: sd 0.02
    assert 0.22 < rate < 0.38, rate
    assert not torch.equal(first[0], first[1])  # rows draw their own numbers


# --------------------------------------------------------------------------- depth dial
def test_depth_dial_below_and_at_the_trained_depth(pair):
    from megatron_ztt.model.ztt import ZTTModel

    model, config, _ = pair
    ids, _ = batch(config, size=2)
    with torch.no_grad():
        default = model(ids)
        assert torch.equal(model(ids, num_cycles=config.num_cycles).logits, default.logits)
        for depth in (1, 2):
            shorter = ZTTModel(tiny_config(**{**_settings(config), "num_cycles": depth})).eval()
            weights = model.state_dict()
            shorter.load_state_dict({n: t for n, t in weights.items() if n in shorter.state_dict()})
            dialled = model(ids, num_cycles=depth)
            assert torch.all(dialled.cycles_used == depth)
            assert_close(dialled.logits, shorter(ids).logits, atol=1e-5, what=f"C'={depth}")


def _settings(config):
    from dataclasses import fields

    return {f.name: getattr(config, f.name) for f in fields(config)}


@pytest.mark.parametrize("depth", [1, 5, 6])
def test_depth_dial_matches_export_with_and_without_exits(pair, depth):
    """C' != C: the training model and the export (full pass, cache prefill, decoding through
    the cache) give the same logits; with exits the same decisions too."""
    from transformers import DynamicCache

    model, config, exported = pair
    ids, _ = batch(config, size=2, seed=9)
    with torch.no_grad():
        deep = model(ids, num_cycles=depth)
        assert torch.all(deep.cycles_used == depth)
        if depth > config.num_cycles:  # the extra cycles do change the output
            assert not torch.allclose(deep.logits, model(ids).logits, atol=1e-3)
        threshold = splitting_threshold(model, ids, "zero_attention")
        with_exits = model(ids, num_cycles=depth, exit_threshold=threshold)
        for options, expected in ((dict(), deep), (dict(exit_threshold=threshold), with_exits)):
            full = exported(ids, num_cycles=depth, use_cache=False, **options)
            cache = DynamicCache(config=exported.config)
            steps = [exported(ids[:, t:t + 1], cache=cache, num_cycles=depth, **options)
                     for t in range(ids.shape[1])]
            for got in (full, exported(ids, num_cycles=depth, use_cache=True, **options)):
                assert torch.equal(got.cycles_used, expected.cycles_used)
                assert (got.logits - expected.logits).abs().max().item() <= MAX_ABS_DIFF
            assert torch.equal(torch.cat([s.cycles_used for s in steps], 1), expected.cycles_used)
            logits = torch.cat([s.logits for s in steps], 1)
            assert (logits - expected.logits).abs().max().item() <= MAX_ABS_DIFF
    if depth > 1:
        assert with_exits.cycles_used.min() == 1 and with_exits.cycles_used.max() > 1


@pytest.mark.parametrize("depth", [1, 6])
def test_generation_at_another_depth(pair, depth):
    """generate(num_cycles=C') through the cache equals generation without it, and a cache
    filled at one depth is refused at another."""
    from transformers import DynamicCache

    _, config, exported = pair
    ids, _ = batch(config, size=2, seed=1)
    greedy = dict(do_sample=False, eos_token_id=None, max_new_tokens=6, num_cycles=depth)
    with torch.no_grad():
        cached = exported.generate(ids[:, :6], use_cache=True, **greedy)
        recomputed = exported.generate(ids[:, :6], use_cache=False, **greedy)
        assert torch.equal(cached, recomputed)
        assert torch.all(exported.generation_cycles_used == depth)
        cache = DynamicCache(config=exported.config)
        exported(ids[:, :4], cache=cache, num_cycles=depth)
        with pytest.raises(ValueError, match="num_cycles"):
            exported(ids[:, 4:5], cache=cache, num_cycles=config.num_cycles)


# --------------------------------------------------------------------------- bad values
def test_bad_exit_signal_and_depth_are_refused_with_one_line(pair):
    from megatron_ztt.model.config import ConfigError
    from megatron_ztt.model.ztt import ZTTModel

    model, config, exported = pair
    ids, _ = batch(config, size=1)
    with pytest.raises(ConfigError, match=r"^model\.exit_signal: .*zero_attention") as error:
        tiny_config(exit_signal="entropy")
    assert "\n" not in str(error.value)
    for bad in (0, config.num_cycles * 2 + 1, 2.5):
        for run in (lambda: model(ids, num_cycles=bad), lambda: exported(ids, num_cycles=bad)):
            with pytest.raises(ValueError, match=r"^num_cycles must be an integer from 1 to 6"):
                run()
    for run in (lambda: model(ids, exit_threshold=0.5, exit_signal="entropy"),
                lambda: exported(ids, exit_threshold=0.5, exit_signal="entropy")):
        with pytest.raises(ValueError, match=r"^exit_signal must be one of"):
            run()
    # signals that read the zero attention need zero tokens; the others do not
    bare = ZTTModel(tiny_config(zero_token=False, gate=False)).eval()
    ids, _ = batch(bare.config, size=1)
    with pytest.raises(ValueError, match=r"exit_signal=zero_attention_relative .* no zero tokens"):
        bare(ids, exit_threshold=1.0, exit_signal="zero_attention_relative")
    with pytest.raises(ConfigError, match=r"^model\.exit_threshold: .*zero_token=true"):
        tiny_config(zero_token=False, gate=False, exit_threshold=0.5)
    tiny_config(zero_token=False, gate=False, exit_threshold=0.5, exit_signal="hidden_change")
    with torch.no_grad():
        out = bare(ids, exit_threshold=1.0, exit_signal="hidden_change", num_cycles=4)
    assert out.cycles_used.max() <= 4


@pytest.mark.parametrize("argv, message", [
    (["--num-cycles", "0"], "--num-cycles: must be an integer >= 1"),
    (["--exit-signal", "entropy"], "--exit-signal: invalid choice: 'entropy'"),
])
def test_cli_refuses_bad_signal_and_depth(argv, message, capsys):
    from megatron_ztt.cli import main

    with pytest.raises(SystemExit):
        main(["eval", "--checkpoint", "unused", *argv])
    assert message in capsys.readouterr().err
