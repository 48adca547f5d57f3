"""Cycling, weight sharing, the variants and early exit, on one process."""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_ztt.model.cycle_engine import application_plan
from megatron_ztt.model.ztt import ZTTModel
from model_helpers import assert_close, batch, tiny_config


def count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("mode", ["basic", "head_tail"])
def test_parameters_do_not_grow_with_cycles(seeded, mode):
    """Layer weights are shared; only the per-application zero keys and per-cycle gates grow."""
    plain = [count(ZTTModel(tiny_config(cycle_mode=mode, num_cycles=c, zero_token=False,
                                        gate=False))) for c in (1, 2, 5)]
    assert plain[0] == plain[1] == plain[2]
    for cycles in (1, 2, 5):
        config = tiny_config(cycle_mode=mode, num_cycles=cycles)
        extra = (config.num_applications * config.query_groups * config.head_dim
                 + cycles * (config.hidden_size + 1))
        assert count(ZTTModel(config)) == plain[0] + extra


def test_plan_counts_applications():
    config = tiny_config(num_layers=5, num_cycles=3)
    plan = application_plan(config)
    assert len(plan) == 2 + 3 * 3 == config.num_applications
    assert [a.name for a in plan][:2] == ["head", "cycle1_layer2"]
    assert plan[-1].name == "tail"
    basic = application_plan(tiny_config(cycle_mode="basic", num_layers=3, num_cycles=2))
    assert [a.layer for a in basic] == [0, 1, 2, 0, 1, 2]


class UnrolledZTT(ZTTModel):
    """The same model with C independent copies of the middle layers (no sharing)."""

    def unroll(self):
        from megatron_ztt.model.layers import build_transformer_layer

        self.copies = torch.nn.ModuleList()
        for _ in range(self.config.num_cycles):
            layers = torch.nn.ModuleList(build_transformer_layer(self.config, i)
                                         for i in range(self.config.num_layers))
            layers.load_state_dict(self.layers.state_dict())
            self.copies.append(layers)

    use_copies = False

    def run_application(self, app, *args):
        if app.cycle is None or not self.use_copies:
            return super().run_application(app, *args)
        shared = self.layers
        self.layers = self.copies[app.cycle]
        try:
            return super().run_application(app, *args)
        finally:
            self.layers = shared


def test_shared_gradient_is_sum_over_cycle_copies(seeded):
    config = tiny_config(num_cycles=3, exit_loss_weights=[0.3, 0.3, 1.0])
    model = UnrolledZTT(config)
    model.unroll()
    ids, labels = batch(config)

    shared_loss = model(ids, labels).loss
    shared_loss.backward()
    shared_grads = {n: p.grad.clone() for n, p in model.layers.named_parameters()}
    model.zero_grad()

    model.use_copies = True
    unrolled_loss = model(ids, labels).loss
    unrolled_loss.backward()
    assert_close(shared_loss.detach(), unrolled_loss.detach(), atol=1e-6)
    for name, grad in shared_grads.items():
        layer = int(name.split(".")[0])
        if layer in config.cycled_layers:
            per_copy = [copy_.get_parameter(name).grad for copy_ in model.copies]
            assert not torch.allclose(per_copy[0], grad)  # one copy alone is not the answer
            total = sum(per_copy)
        else:
            total = model.layers.get_parameter(name).grad
        assert_close(grad, total, atol=1e-6, what=name)


def test_without_zero_token_and_gate_equals_head_tail_cycling(seeded):
    """The model's forward equals head, C x middle, tail written out by hand."""
    config = tiny_config(num_layers=5, num_cycles=3, zero_token=False, gate=False)
    model = ZTTModel(config)
    ids, labels = batch(config)
    out = model(ids, labels, return_logits=True)

    from megatron_ztt.model.layers import rotary_embedding

    rope = rotary_embedding(config, ids.shape[1], ids.device)
    layers = model.layers

    def run(layer, h):
        return layer(h, attention_mask=None, rotary_pos_emb=rope)[0]

    h = model.embedding(ids)
    h = run(layers[0], h)
    for _ in range(3):
        for middle in layers[1:4]:
            h = run(middle, h)
    h = run(layers[4], h)
    logits = model.output_head(h, embedding_weight=model.embedding.weight).transpose(0, 1)
    assert_close(out.logits, logits[..., :config.vocab_size], atol=1e-5, what="logits")
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    assert_close(out.lm_loss, expected, atol=1e-5)


def test_open_gate_and_distant_zero_key_approach_plain_cycling(seeded):
    """Gate fully open (huge bias) is exactly no gate."""
    config = tiny_config(zero_token=False, gate=True, gate_bias_init=60.0)
    gated = ZTTModel(config)
    plain = ZTTModel(tiny_config(zero_token=False, gate=False))
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if "gates" not in k})
    ids, _ = batch(config)
    assert_close(gated(ids).logits, plain(ids).logits, atol=1e-6)


def test_vanilla_is_a_plain_megatron_transformer(seeded):
    """C=1 vanilla equals megatron-core's TransformerBlock of L layers with the same weights."""
    from megatron.core.transformer.transformer_block import TransformerBlock

    from megatron_ztt.model.layers import layer_spec, rotary_embedding, transformer_config

    config = tiny_config(cycle_mode="vanilla", num_cycles=1, zero_token=False, gate=False)
    model = ZTTModel(config)
    megatron_config = transformer_config(config)
    megatron_config.num_layers = config.num_layers
    block = TransformerBlock(megatron_config, layer_spec(config), post_layer_norm=False)
    block.layers.load_state_dict(model.layers.state_dict())
    ids, _ = batch(config)
    rope = rotary_embedding(config, ids.shape[1], ids.device)
    hidden = block(model.embedding(ids), attention_mask=None, rotary_pos_emb=rope)
    logits = model.output_head(hidden, embedding_weight=model.embedding.weight).transpose(0, 1)
    assert_close(model(ids).logits, logits[..., :config.vocab_size], atol=1e-5)


def test_exit_thresholds(seeded):
    config = tiny_config(num_cycles=3)
    model = ZTTModel(config).eval()
    ids, _ = batch(config, size=3)
    with torch.no_grad():
        first = model(ids, exit_threshold=0.0)
        assert torch.all(first.cycles_used == 1) and first.cycles_used.shape == ids.shape
        full = model(ids, exit_threshold=1.01)
        assert torch.all(full.cycles_used == 3)
        assert_close(full.logits, model(ids).logits, atol=0)


class ScriptedExit(ZTTModel):
    """Exits row i after cycle ``exit_after[i]``, whatever the zero attention says, so that the
    exit plumbing can be checked for every exit cycle (threshold 0.5)."""

    exit_after: list = []

    def forward(self, *args, **kwargs):
        self.cycles_seen = 0
        engine = self.engine

        def scripted_signal(zero_sum):  # [s, b]
            self.cycles_seen += 1
            rows = torch.tensor([1.0 if e == self.cycles_seen else 0.0 for e in self.exit_after])
            return rows[None, :].expand_as(zero_sum)

        engine.zero_attention_mean = scripted_signal
        try:
            return super().forward(*args, **kwargs)
        finally:
            del engine.zero_attention_mean


@pytest.mark.parametrize("exit_after", [[1, 1], [2, 2], [2, 1, 3, 1]])
def test_exit_after_k_cycles_equals_a_k_cycle_model(seeded, exit_after):
    model = ScriptedExit(tiny_config(num_cycles=3)).eval()
    model.exit_after = exit_after
    weights = model.state_dict()
    short = {}
    for k in set(exit_after):
        short[k] = ZTTModel(tiny_config(num_cycles=k)).eval()
        short[k].load_state_dict({n: t for n, t in weights.items() if n in short[k].state_dict()})
    ids, _ = batch(model.config, size=len(exit_after))
    with torch.no_grad():
        out = model(ids, exit_threshold=0.5)
        assert out.cycles_used[:, 0].tolist() == exit_after
        for row, k in enumerate(exit_after):
            assert_close(out.logits[row], short[k](ids[row:row + 1]).logits[0], atol=1e-5,
                         what=f"row {row} (exit after cycle {k})")


def _first_cycle_signal(model, ids):
    """Per token: the exit signal of cycle 1 (what a threshold is compared with)."""
    seen = []
    original = model.engine.zero_attention_mean

    def spy(zero_sum):
        signal = original(zero_sum)
        seen.append(signal.transpose(0, 1).clone())
        return signal

    model.engine.zero_attention_mean = spy
    try:
        model(ids, exit_threshold=math.inf)
    finally:
        del model.engine.zero_attention_mean
    return seen[0]


def test_token_exit_is_causal(seeded):
    """With tokens leaving at several cycles, logits at positions <= t do not depend on the
    tokens after t: the decision reads only the token's own (causal) zero attention, and a
    token that left serves later tokens with its last computed key/values."""
    config = tiny_config(num_cycles=3, seq_length=16)
    model = ZTTModel(config).eval()
    ids, _ = batch(config, size=2, seed=5)
    with torch.no_grad():
        threshold = _first_cycle_signal(model, ids).median().item()
        out = model(ids, exit_threshold=threshold)
        assert (out.cycles_used == 1).any() and (out.cycles_used > 1).any()
        for t in (3, 8, 12):
            changed = ids.clone()
            changed[:, t + 1:] = (changed[:, t + 1:] + 7) % config.vocab_size
            other = model(changed, exit_threshold=threshold)
            assert torch.equal(other.cycles_used[:, :t + 1], out.cycles_used[:, :t + 1])
            assert_close(other.logits[:, :t + 1], out.logits[:, :t + 1], atol=1e-5,
                         what=f"positions <= {t}")
            assert not torch.allclose(other.logits[:, t + 1:], out.logits[:, t + 1:])


def test_per_sequence_exit_on_real_zero_attention(seeded):
    """exit_mode=sequence: each row's decision and logits do not depend on the other rows."""
    config = tiny_config(num_cycles=3)
    model = ZTTModel(config).eval()
    ids, _ = batch(config, size=4, seed=3)
    with torch.no_grad():
        first_cycle = [model(ids[i:i + 1]).zero_attention_by_cycle(model.plan)[1].item()
                       for i in range(4)]
        threshold = sorted(first_cycle)[2]  # two rows at or above it, two below
        mixed = model(ids, exit_threshold=threshold, exit_mode="sequence")
        for i in range(4):
            alone = model(ids[i:i + 1], exit_threshold=threshold, exit_mode="sequence")
            assert torch.equal(mixed.cycles_used[i], alone.cycles_used[0])
            assert bool((alone.cycles_used[0] == 1).all()) == (first_cycle[i] >= threshold - 1e-7)
            assert_close(mixed.logits[i], alone.logits[0], atol=1e-5, what=f"row {i}")
        assert mixed.cycles_used[:, 0].tolist().count(1) == 2


def test_exit_losses_are_weighted(seeded):
    config = tiny_config(num_cycles=3, exit_loss_weights=[0.5, 0.0, 2.0])
    out = ZTTModel(config)(*batch(config))
    assert sorted(out.exit_losses) == [1, 3]
    assert_close(out.loss, 0.5 * out.exit_losses[1] + 2.0 * out.exit_losses[3], atol=1e-6)
    assert out.lm_loss is out.exit_losses[3]


def test_activation_checkpointing_replays_attention_dropout(seeded):
    """The recompute in backward draws the forward's dropout masks (megatron-core's RNG
    tracker is restored for it), so the gradients equal those without checkpointing."""
    from megatron_ztt.parallel import runtime

    config = tiny_config(attention_dropout=0.3, hidden_dropout=0.1,
                         exit_loss_weights=[0.2, 0.3, 1.0])
    model = ZTTModel(config).train()
    ids, labels = batch(config)

    def gradients(checkpointing):
        model.config.activation_checkpointing = checkpointing
        model.zero_grad()
        runtime.seed_everything(99)
        loss = model(ids, labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    plain_loss, plain = gradients(False)
    ckpt_loss, checkpointed = gradients(True)
    assert_close(ckpt_loss, plain_loss, atol=0)
    for name, grad in plain.items():
        assert_close(checkpointed[name], grad, atol=1e-6, what=name)
    runtime.seed_everything(100)  # another seed: other masks, so dropout really is on
    assert not torch.allclose(model(ids, labels).loss.detach(), plain_loss)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_output_loss_equals_loss_of_full_logits(seeded, monkeypatch, tied, masked):
    """The chunked output layer + cross entropy (``OutputHead.loss``, several chunks here)
    gives the losses and gradients of megatron-core's cross entropy on the whole logits."""
    from megatron_ztt.model import layers

    monkeypatch.setattr(layers, "OUTPUT_CHUNK_ELEMENTS", 7 * 200)  # 7 tokens a chunk, ragged
    config = tiny_config(tie_embeddings=tied, exit_loss_weights=[0.3, 0.5, 1.0])
    model = ZTTModel(config)
    ids, labels = batch(config, size=3)
    mask = (torch.rand(labels.shape) > 0.3).float() if masked else None

    def run():
        out = model(ids, labels, loss_mask=mask, collect_stats=False)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return out, grads

    chunked, chunked_grads = run()
    monkeypatch.setattr(ZTTModel, "loss_of", lambda self, h, y, m, denominator=None:
                        layers.language_model_loss(self.logits_shard(h), y, m))
    full, full_grads = run()
    assert sorted(chunked.exit_losses) == sorted(full.exit_losses) == [1, 2, 3]
    for cycle, loss in full.exit_losses.items():
        assert_close(chunked.exit_losses[cycle], loss, atol=0, rtol=1e-6, what=f"cycle {cycle}")
    assert_close(chunked.loss, full.loss, atol=0, rtol=1e-6, what="objective")
    assert chunked_grads.keys() == full_grads.keys()
    assert ("output_head.output_layer.weight" in full_grads) != tied
    for name, grad in full_grads.items():
        assert_close(chunked_grads[name], grad, atol=1e-7, rtol=1e-5, what=name)
    with torch.no_grad():  # evaluation: no gradients computed, the same loss
        assert_close(model(ids, labels, loss_mask=mask).loss, full.loss, atol=0, rtol=1e-6)
