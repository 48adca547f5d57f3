"""Early exit really skips compute: after a token leaves, no layer application computes it.

The reference is the engine's ``compute_exited`` path (every token computed in every cycle,
the ones that left overwritten afterwards, as before tokens were gathered): exit decisions,
logits and cache contents must be the same, and the layers must see only the tokens still
cycling."""

import contextlib
import math

import pytest
import torch

from export_helpers import build_and_export, load_export
from model_helpers import assert_close, batch, tiny_config
from megatron_ztt.model.ztt import ZTTModel

GREEDY = dict(do_sample=False, eos_token_id=None)


def first_cycle_signals(engine, forward) -> torch.Tensor:
    """Every token's cycle-1 exit signal, read with a threshold that never fires."""
    seen = []
    original = engine.exit_signal

    def spy(*args):
        signal = original(*args)
        seen.append(signal.detach().clone())
        return signal

    engine.exit_signal = spy
    try:
        with torch.no_grad():
            forward(math.inf)
    finally:
        engine.exit_signal = original
    return seen[0]


def splitting_threshold(signals: torch.Tensor, quantile: float = 0.5) -> float:
    """Halfway between two neighbouring signal values near ``quantile``: the decisions do not
    hinge on the last bits of a float."""
    values = torch.unique(signals.float().flatten()).sort().values
    i = min(max(int(quantile * len(values)), 1), len(values) - 1)
    return float(values[i - 1] + values[i]) / 2


def record_block_shapes(layers):
    """Hooks that log (rows, tokens) of every layer application's input."""
    shapes = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        shapes.append(tuple(hidden.shape[:2]))

    return shapes, [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]


def expected_blocks(plan, cycles_used: torch.Tensor):
    """(rows, tokens) each application should compute: the row-wise padded block of the
    tokens still cycling ([batch, seq] layout), all tokens outside the cycles, nothing once
    every token has left."""
    total = tuple(cycles_used.shape)
    blocks = []
    for app in plan:
        if app.cycle is None:
            blocks.append(total)
            continue
        active = cycles_used > app.cycle
        if bool(active.all()):
            blocks.append(total)
        elif bool(active.any()):
            counts = active.sum(dim=1)
            blocks.append((int((counts > 0).sum()), int(counts.max())))
    return blocks


@contextlib.contextmanager
def reference(engine):
    """The engine computes every token (``compute_exited``) inside the block."""
    engine.compute_exited = True
    try:
        yield
    finally:
        engine.compute_exited = False


# --------------------------------------------------------------------------- training model
def test_training_model_computes_only_cycling_tokens(seeded):
    config = tiny_config(num_cycles=3, seq_length=16)
    model = ZTTModel(config).eval()
    ids, _ = batch(config, size=3, seed=5)
    threshold = splitting_threshold(first_cycle_signals(
        model.engine, lambda t: model(ids, exit_threshold=t)), 0.4)
    shapes, hooks = record_block_shapes(model.layers)
    try:
        with torch.no_grad():
            out = model(ids, exit_threshold=threshold)
            skipped_shapes = list(shapes)
            with reference(model.engine):
                expected = model(ids, exit_threshold=threshold)
    finally:
        for hook in hooks:
            hook.remove()
    used = out.cycles_used
    assert (used == 1).any() and (used > 1).any()
    assert torch.equal(used, expected.cycles_used)
    assert_close(out.logits, expected.logits, atol=1e-5, what="logits")
    # megatron-core layers take [s, b, h]: the blocks are (tokens, rows)
    assert [(s, b) for b, s in expected_blocks(model.plan, used)] == skipped_shapes
    computed = sum(s * b for s, b in skipped_shapes)
    assert computed < len(model.plan) * ids.numel()


def test_training_model_one_row_computes_exactly_the_cycling_tokens(seeded):
    config = tiny_config(num_cycles=3, seq_length=16)
    model = ZTTModel(config).eval()
    ids, _ = batch(config, size=1, seed=2)
    threshold = splitting_threshold(first_cycle_signals(
        model.engine, lambda t: model(ids, exit_threshold=t)))
    shapes, hooks = record_block_shapes(model.layers)
    try:
        with torch.no_grad():
            out = model(ids, exit_threshold=threshold)
    finally:
        for hook in hooks:
            hook.remove()
    computed = [s * b for s, b in shapes]
    active = [ids.numel() if app.cycle is None else int((out.cycles_used > app.cycle).sum())
              for app in model.plan]
    assert computed == [n for n in active if n > 0]
    assert 0 < active[-2] < ids.numel()


# --------------------------------------------------------------------------- export
@pytest.fixture(scope="module")
def exported(single_process, tmp_path_factory):
    from megatron_ztt.parallel import runtime

    runtime.seed_everything(1234)
    _, config, path = build_and_export("ztt-gqa", tmp_path_factory.mktemp("exit") / "export",
                                       tie_embeddings=False)
    return load_export(path), config


def export_signals(model, ids):
    """[batch, seq] cycle-1 exit signals of the export."""
    return first_cycle_signals(model.model.engine,
                               lambda t: model(ids, use_cache=False, exit_threshold=t))


def export_threshold(model, ids, quantile=0.5):
    return splitting_threshold(export_signals(model, ids), quantile)


def assert_same_cache(got, expected):
    assert len(got.layers) == len(expected.layers)
    for index, (a, b) in enumerate(zip(got.layers, expected.layers)):
        assert_close(a.keys, b.keys, atol=1e-5, what=f"cache keys {index}")
        assert_close(a.values, b.values, atol=1e-5, what=f"cache values {index}")


@pytest.mark.parametrize("size", [1, 3])
def test_export_prefill_computes_only_cycling_tokens(exported, size):
    model, config = exported
    ids, _ = batch(config, size=size, seed=4)
    threshold = export_threshold(model, ids)
    shapes, hooks = record_block_shapes(model.model.layers)
    try:
        with torch.no_grad():
            out = model(ids, use_cache=True, exit_threshold=threshold)
            skipped_shapes = list(shapes)
            with reference(model.model.engine):
                expected = model(ids, use_cache=True, exit_threshold=threshold)
    finally:
        for hook in hooks:
            hook.remove()
    assert (out.cycles_used == 1).any() and (out.cycles_used > 1).any()
    assert torch.equal(out.cycles_used, expected.cycles_used)
    assert_close(out.logits, expected.logits, atol=1e-5, what="logits")
    assert_same_cache(out.past_key_values, expected.past_key_values)
    assert skipped_shapes == expected_blocks(model.model.plan, out.cycles_used)


def test_export_batched_decoding_computes_only_cycling_rows(exported):
    """Batch 8, one new token per row and step: each cycle runs on the rows still cycling;
    logits, exits and the cache (exited rows hold their last computed cycle's key/values)
    equal the compute-everything reference."""
    model, config = exported
    ids, _ = batch(config, size=8, seed=6)
    prompt, steps = ids[:, :6], ids[:, 6:12]
    # a random model's zero attention falls with the position (~ 1 / keys), so each step
    # gets a threshold that splits its rows (the rule holds per call)
    signals = export_signals(model, ids[:, :12])
    thresholds = [splitting_threshold(signals[:, 6 + t]) for t in range(steps.shape[1])]
    threshold = splitting_threshold(signals[:, :6])
    engine = model.model.engine

    def decode(record=None):
        with torch.no_grad():
            out = model(prompt, use_cache=True, exit_threshold=threshold)
            cache, results = out.past_key_values, []
            for t in range(steps.shape[1]):
                if record is not None:
                    record.clear()
                out = model(steps[:, t:t + 1], cache=cache, exit_threshold=thresholds[t])
                results.append((out.logits, out.cycles_used,
                                list(record) if record is not None else None))
        return results, cache

    shapes, hooks = record_block_shapes(model.model.layers)
    try:
        got, cache = decode(shapes)
    finally:
        for hook in hooks:
            hook.remove()
    with reference(engine):
        expected, expected_cache = decode()
    mixed_steps = 0
    for (logits, used, blocks), (ref_logits, ref_used, _) in zip(got, expected):
        assert torch.equal(used, ref_used)
        assert_close(logits, ref_logits, atol=1e-5, what="decoding logits")
        assert blocks == expected_blocks(model.model.plan, used)
        mixed_steps += bool((used == 1).any() and (used > 1).any())
    assert mixed_steps == steps.shape[1]
    assert_same_cache(cache, expected_cache)


def test_export_token_exit_is_causal(exported):
    """With tokens leaving at different cycles, the export's logits at positions <= t do not
    depend on the tokens after t (the training model's: test_model_structure)."""
    model, config = exported
    ids, _ = batch(config, size=2, seed=5)
    threshold = export_threshold(model, ids)
    with torch.no_grad():
        out = model(ids, use_cache=False, exit_threshold=threshold)
        assert (out.cycles_used == 1).any() and (out.cycles_used > 1).any()
        for t in (3, 8, 12):
            changed = ids.clone()
            changed[:, t + 1:] = (changed[:, t + 1:] + 7) % config.vocab_size
            other = model(changed, use_cache=False, exit_threshold=threshold)
            assert torch.equal(other.cycles_used[:, :t + 1], out.cycles_used[:, :t + 1])
            assert_close(other.logits[:, :t + 1], out.logits[:, :t + 1], atol=1e-5,
                         what=f"positions <= {t}")


def test_batch_of_eight_generates_as_each_row_alone(exported):
    """Per-token exit decides on each row's own tokens: batching rows changes nothing."""
    model, config = exported
    ids, _ = batch(config, size=8, seed=8)
    prompt = ids[:, :5]
    threshold = export_threshold(model, ids)
    with torch.no_grad():
        together = model.generate(prompt, max_new_tokens=8, exit_threshold=threshold, **GREEDY)
        together_cycles = model.generation_cycles_used
        for row in range(prompt.shape[0]):
            alone = model.generate(prompt[row:row + 1], max_new_tokens=8,
                                   exit_threshold=threshold, **GREEDY)
            assert torch.equal(alone[0], together[row]), f"row {row}"
            assert torch.equal(model.generation_cycles_used[0], together_cycles[row])
    assert (together_cycles == 1).any() and (together_cycles > 1).any()


# --------------------------------------------------------------------------- no zero token
def whole_row_threshold(signals: torch.Tensor, exits_below: bool) -> float:
    """A threshold at which one row's tokens all leave after cycle 1 and some others stay:
    just past the row whose signals are nearest to leaving (signals [b, s])."""
    per_row = signals.amax(dim=1) if exits_below else signals.amin(dim=1)
    edge = float(per_row.min() if exits_below else per_row.max())
    values = torch.unique(signals.float().flatten()).sort().values
    beyond = values[values > edge] if exits_below else values[values < edge]
    other = float(beyond[0] if exits_below else beyond[-1])
    return (edge + other) / 2


@pytest.mark.parametrize("signal", ["hidden_change", "random"])
def test_no_zero_token_exits_match_the_reference_with_whole_rows_leaving(
        single_process, tmp_path, signal):
    """zero_token=false at batch 4, some rows leaving entirely after cycle 1: the training
    model, the export (with and without cache) and the compute-everything reference agree."""
    from megatron_ztt.parallel import runtime

    runtime.seed_everything(7)
    model, config, path = build_and_export("ztt-gqa", tmp_path / "hf", tie_embeddings=False,
                                           zero_token=False, seq_length=8)
    exported = load_export(path)
    ids, _ = batch(config, size=4, seed=3)
    if signal == "random":  # one draw per token: a high exit probability empties some rows
        threshold = 0.8
    else:
        from megatron_ztt.model.cycle_engine import EXIT_SIGNALS

        signals = first_cycle_signals(model.engine, lambda t: model(
            ids, exit_threshold=0.0, exit_signal=signal))
        threshold = whole_row_threshold(signals.transpose(0, 1), EXIT_SIGNALS[signal].exits_below)
    options = dict(exit_threshold=threshold, exit_signal=signal)
    with torch.no_grad():
        with reference(model.engine):
            expected = model(ids, **options)
        got = model(ids, **options)
        full = exported(ids, use_cache=False, **options)
        cached = exported(ids, use_cache=True, **options)
    used = expected.cycles_used
    rows_left = (used == 1).all(dim=1)
    assert rows_left.any() and not rows_left.all() and (used > 1).any(), used
    for name, out in (("training model", got), ("export", full), ("export cached", cached)):
        assert torch.equal(out.cycles_used, used), name
        assert_close(out.logits, expected.logits, atol=1e-5, what=name)


# --------------------------------------------------------------------------- host syncs
class HostSyncs:
    """Counts reads of a device value on the host (``aten._local_scalar_dense``: ``.item()``,
    ``bool(t)``, ``int(t)``), each a stall of the device's queue on a GPU."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten._local_scalar_dense.default:
                    counter.count += 1
                return func(*args, **(kwargs or {}))

        self.count, self._mode = 0, Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)


def test_at_most_one_host_sync_per_cycle(exported, seeded):
    """Exits decide on the device: a forward (and a decoding step) reads at most one number
    per cycle after the first on the host (the size of the block to gather), none per layer;
    none at all without exits."""
    model, config = exported
    ids, _ = batch(config, size=4, seed=4)
    threshold = export_threshold(model, ids)
    cycles = model.config.num_cycles
    with torch.no_grad():
        with HostSyncs() as plain:
            model(ids, use_cache=False)
        with HostSyncs() as prefill:
            out = model(ids[:, :-1], use_cache=True, exit_threshold=threshold)
        with HostSyncs() as step:
            model(ids[:, -1:], cache=out.past_key_values, exit_threshold=threshold)
    assert plain.count == 0
    assert 1 <= prefill.count <= cycles - 1, prefill.count
    assert 1 <= step.count <= cycles - 1, step.count
    training = ZTTModel(tiny_config(num_cycles=3, seq_length=16)).eval()
    ids, _ = batch(training.config, size=3, seed=5)
    with torch.no_grad(), HostSyncs() as forward:
        training(ids, exit_threshold=0.3)
    assert 1 <= forward.count <= 2, forward.count
