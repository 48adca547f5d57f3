"""model.exit_objective=next_cycle_gain: the exit head learns whether the next cycle lowers a
token's loss; its loss reaches the exit head's weight and bias only (the language-model weights'
gradients are those of the exit losses alone), exit_signal=trained reads it in the training
model and the export alike, the settings are validated, and the head is checkpointed."""

import pytest
import torch

from model_helpers import assert_close, batch, tiny_config

WEIGHTS = [0.3, 0.3, 1.0]


def _model(**overrides):
    from megatron_ztt.model.ztt import ZTTModel

    options = dict(exit_loss_weights=WEIGHTS, exit_objective="next_cycle_gain")
    options.update(overrides)
    return ZTTModel(tiny_config(**options)).train()


def _grads(model, ids, labels, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels, **kwargs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_objective_gradient_reaches_only_the_exit_head(seeded, fraction):
    from megatron_ztt.model.ztt import ZTTModel

    light = _model(exit_objective_weight=0.1, exit_loss_fraction=fraction)
    heavy = _model(exit_objective_weight=10.0, exit_loss_fraction=fraction)
    plain = ZTTModel(tiny_config(exit_loss_weights=WEIGHTS, exit_loss_fraction=fraction)).train()
    heavy.load_state_dict(light.state_dict())
    plain.load_state_dict({k: v for k, v in light.state_dict().items()
                           if not k.startswith("exit_head.")})
    ids, labels = batch(light.config, size=3)
    out_light, g_light = _grads(light, ids, labels, exit_loss_seed=3)
    out_heavy, g_heavy = _grads(heavy, ids, labels, exit_loss_seed=3)
    _, g_plain = _grads(plain, ids, labels, exit_loss_seed=3)
    assert out_light.exit_objective > 0
    assert_close(out_light.exit_objective, out_heavy.exit_objective, atol=0, rtol=0)
    assert_close(out_light.loss - 0.1 * out_light.exit_objective,
                 out_heavy.loss - 10.0 * out_heavy.exit_objective, atol=1e-6)
    head = {"exit_head.weight", "exit_head.bias"}
    assert head <= set(g_light)
    # (the bias's alone can be 0: at the initial zero logits it is the count of targets
    # below one half minus the count above, which some draws balance)
    assert sum(g_light[name].abs().sum() for name in head) > 0
    for name in head:  # the head's gradient scales with its weight
        assert_close(g_heavy[name], 100.0 * g_light[name], atol=1e-6, what=name)
    for name, grad in g_light.items():
        if name in head:
            continue
        # bit for bit: the objective adds nothing to a language-model weight's gradient
        assert torch.equal(grad, g_heavy[name]), name
        # and against the model without the objective (which skips the zero attention's
        # log-sum-exp path: same math, other rounding)
        assert_close(grad, g_plain[name], atol=1e-6, what=name)


def test_targets_follow_the_margin(seeded):
    """A margin no loss gain reaches makes every target 0: the optimum is p -> 0, so a step on
    the head alone lowers every prediction."""
    model = _model(exit_objective_margin=1e6, exit_objective_weight=1.0)
    ids, labels = batch(model.config)
    out, grads = _grads(model, ids, labels)
    assert_close(out.exit_objective, torch.tensor(0.6931472), atol=1e-5)  # log 2 at p = 0.5
    assert grads["exit_head.bias"].gt(0).all()  # descending lowers the bias: p falls


def test_trained_signal_equals_in_training_model_and_export(single_process, tmp_path):
    from export_helpers import load_export
    from megatron_ztt.parallel import runtime

    from export_helpers import variant_config, vary_small_parameters
    from megatron_ztt.export.hf import export_hf
    from megatron_ztt.model.ztt import ZTTModel
    from megatron_ztt.parallel.sharding import gather_full_state_dict

    runtime.seed_everything(1234)
    config = variant_config("ztt-gqa", tie_embeddings=False, exit_loss_weights=WEIGHTS,
                            exit_objective="next_cycle_gain")
    model = ZTTModel(config).eval()
    vary_small_parameters(model)
    _trained_head(model)
    exported = load_export(export_hf(config, gather_full_state_dict(model), None,
                                     tmp_path / "hf", "fp32"))
    assert torch.equal(exported.model.exit_head.weight, model.exit_head.weight)
    ids, _ = batch(config, size=3, seed=11)
    with torch.no_grad():
        seen = []
        original = model.engine.exit_signal
        model.engine.exit_signal = lambda c, st, r: seen.append(original(c, st, r)) or seen[-1]
        model(ids, exit_threshold=0.0, exit_signal="trained")
        del model.engine.exit_signal
        threshold = seen[0].median().item() + 1e-6
        options = dict(exit_threshold=threshold, exit_signal="trained")
        expected = model(ids, **options)
        got = exported(ids, use_cache=False, **options)
    assert expected.cycles_used.min() == 1 and expected.cycles_used.max() > 1
    assert torch.equal(got.cycles_used, expected.cycles_used)
    assert (got.logits - expected.logits).abs().max().item() <= 1e-4


def _trained_head(model):
    with torch.no_grad():  # a head that depends on the features
        model.exit_head.weight.copy_(torch.tensor([[1.0, -0.5, 0.3, 0.8], [0.5, 0.2, -0.1, 1.0]]))
        model.exit_head.bias.fill_(0.2)


@pytest.mark.parametrize("overrides, message", [
    (dict(exit_objective="learned"), "model.exit_objective: must be one of none, next_cycle_gain"),
    (dict(exit_objective="next_cycle_gain", exit_loss_weights=[0.0, 0.3, 1.0]),
     "model.exit_objective: .*exit_loss_weights must be positive"),
    (dict(exit_objective="next_cycle_gain", exit_loss_weights=WEIGHTS, zero_token=False),
     "model.exit_objective: .*zero_token=true"),
    (dict(exit_objective="next_cycle_gain", exit_loss_weights=WEIGHTS, exit_objective_weight=0),
     "model.exit_objective_weight: must be > 0"),
    (dict(exit_objective_margin=-1.0), "model.exit_objective_margin: must be a finite number >= 0"),
    (dict(exit_signal="trained"), "model.exit_signal: trained reads the exit head"),
])
def test_settings_are_validated(overrides, message):
    from megatron_ztt.model.config import ConfigError

    with pytest.raises(ConfigError, match="^" + message):
        tiny_config(**overrides)
    config = tiny_config(exit_loss_weights=WEIGHTS, exit_objective="next_cycle_gain")
    with pytest.raises(ConfigError, match="exit_objective=next_cycle_gain is built for one"):
        config.check_parallel_layout(1, 2)


@pytest.mark.slow
def test_exit_head_is_checkpointed_and_resumed(sample_data, tmp_path):
    from distributed import run_distributed

    run_distributed(_train_save_resume, world_size=1, args=(sample_data, str(tmp_path)))


def _train_save_resume(rank, data, root):
    from megatron_ztt.training.engines import build_engine
    from test_pipeline_variants import BASE, EXITS, _global_batch
    from train_helpers import micro_config

    overrides = [*BASE, EXITS, "model.exit_objective=next_cycle_gain",
                 "model.exit_objective_weight=1.0", "train.lr=0.05"]
    config = micro_config(data, f"{root}/a", *overrides)
    engine = build_engine(config)
    engine.train()
    result = engine.train_step(iter(_global_batch(config)), 1, collect_stats=False)
    assert result.losses["exit objective"] > 0
    trained = engine.full_state_dict()
    assert trained["exit_head.bias"].abs().sum() > 0  # the step moved the head
    from megatron_ztt.checkpoint import tag_for
    from megatron_ztt.training import checkpoint as ckpt
    from megatron_ztt.training.train import layout_of

    ckpt.save(engine, config, ckpt.TrainingState(iteration=1), layout_of(config), {})
    ckpt.wait_for_pending_save()
    other = build_engine(micro_config(data, f"{root}/b", *overrides))
    ckpt.load(other, config.checkpoint_dir, tag_for(1), layout_of(config))
    restored = other.full_state_dict()
    for name in ("exit_head.weight", "exit_head.bias"):
        assert torch.equal(restored[name], trained[name]), name
