"""model.exit_loss_fraction: the intermediate exit losses on a random subset of positions.

The subset's losses equal the full-position computation read at those positions (the tail
run on the chosen queries only is exact, forward and backward), the estimate is unbiased, the
positions are reproducible from the step's seed, and the circular pipeline computes what one
process does.
"""

import pytest
import torch

from megatron_ztt.model.config import ConfigError
from megatron_ztt.model.exit_losses import ExitLossPositions
from megatron_ztt.model.ztt import ZTTModel
from model_helpers import assert_close, batch, tiny_config

WEIGHTS = [0.3, 0.3, 1.0]


def _pair(fraction):
    """A model at ``fraction`` and one at 1.0 with the same weights."""
    sub = ZTTModel(tiny_config(exit_loss_weights=WEIGHTS, exit_loss_fraction=fraction))
    full = ZTTModel(tiny_config(exit_loss_weights=WEIGHTS))
    full.load_state_dict(sub.state_dict())
    return sub.train(), full.train()


def _reference_exit_losses(full, ids, labels, chosen, mask=None, denominator=None):
    """Every position through the tail, then the exit losses read at ``chosen``'s."""
    kept = {}
    original = full.loss_of

    def loss_of(hidden, lab, msk, den):
        if lab is labels:  # an exit state (or the final one): keep the full-position tensor
            kept.setdefault("states", []).append(hidden)
        return original(hidden, lab, msk, den)

    full.loss_of = loss_of
    out = full(ids, labels, loss_mask=mask, loss_denominator=denominator)
    full.loss_of = original
    final, *exits = kept["states"]  # [final, exit 1, exit 2]
    losses = [chosen.loss(original, chosen.gather(h), labels, mask, denominator)
              for h in [*exits, final]]
    return out, losses  # the exits' estimates, then the subset's estimate of the final loss


@pytest.mark.parametrize("masked", [False, True])
def test_subset_losses_equal_full_computation_at_the_positions(seeded, masked):
    sub, full = _pair(0.25)
    ids, labels = batch(sub.config, size=3)
    mask = None
    if masked:
        mask = torch.ones_like(labels, dtype=torch.float32)
        mask[:, :5] = 0
    denominator = torch.tensor(40.0)
    chosen = ExitLossPositions(11, 0.25, ids.shape[1], ids.shape[0], ids.device)
    assert chosen.positions.shape == (3, 4)  # round(0.25 * 16)
    out = sub(ids, labels, loss_mask=mask, loss_denominator=denominator, exit_loss_seed=11)
    ref, ref_losses = _reference_exit_losses(full, ids, labels, chosen, mask, denominator)
    assert_close(out.exit_losses[3], ref.exit_losses[3], atol=1e-6, what="final loss")
    for cycle, expected in zip((1, 2), ref_losses):
        assert_close(out.exit_losses[cycle], expected, atol=1e-6, what=f"exit {cycle}")
        assert not torch.allclose(out.exit_losses[cycle], ref.exit_losses[cycle], atol=1e-4)
    # the gradients too: the objective built from the reference's pieces, with the control
    # variate (the exits' weight times the final loss minus its subset estimate)
    final = ref.exit_losses[3]
    objective = (0.3 * ref_losses[0] + 0.3 * ref_losses[1] + final
                 + 0.6 * (final - ref_losses[2]))
    assert_close(out.loss, objective, atol=1e-6, what="objective")
    objective.backward()
    out.loss.backward()
    for (name, p), q in zip(sub.named_parameters(), full.parameters()):
        assert_close(p.grad, q.grad, atol=1e-6, what=name)


@pytest.mark.parametrize("fraction", [0.5, 0.3])  # 0.3: 5 strata of 3 or 4 of 16 positions
def test_subset_estimate_is_unbiased(seeded, fraction):
    """The mean over many draws (seeds) of the subset's estimate is the full loss."""
    sub, full = _pair(fraction)
    ids, labels = batch(sub.config, size=2)
    with torch.no_grad():
        reference = full(ids, labels).exit_losses[1]
        draws = torch.stack([sub(ids, labels, exit_loss_seed=s).exit_losses[1]
                             for s in range(300)])
    spread = draws.std() / 300 ** 0.5
    assert draws.std() > 1e-3  # the subsets differ
    assert abs(draws.mean() - reference) < 4 * spread, (draws.mean(), reference, spread)


def test_objective_is_unbiased_with_less_noise_than_without_the_control_variate(seeded):
    """The objective with the control variate averages to the full objective over draws, and
    spreads less than the plain subset estimate (0.3 L_1 + 0.3 L_2 + L_3 from the subset)
    on a model whose cycles change the state little (gates nearly shut after cycle 1, as a
    trained ZTT's, docs/RESULTS.md)."""
    sub, full = _pair(0.25)
    with torch.no_grad():
        for model in (sub, full):
            for cycle in ("1", "2"):
                model.gates[cycle].bias.fill_(-3.0)
    ids, labels = batch(sub.config, size=2)
    with torch.no_grad():
        reference = full(ids, labels).loss
        draws = [sub(ids, labels, exit_loss_seed=s) for s in range(200)]
    with_variate = torch.stack([d.loss for d in draws])
    plain = torch.stack([0.3 * d.exit_losses[1] + 0.3 * d.exit_losses[2] + d.exit_losses[3]
                         for d in draws])
    spread = with_variate.std() / 200 ** 0.5
    assert abs(with_variate.mean() - reference) < 4 * spread, (with_variate.mean(), reference)
    assert with_variate.std() < 0.5 * plain.std(), (with_variate.std(), plain.std())


def test_positions_are_reproducible_and_shared_by_the_exits(seeded):
    a = ExitLossPositions(5, 0.3, 16, 4, "cpu").positions
    assert torch.equal(a, ExitLossPositions(5, 0.3, 16, 4, "cpu").positions)
    assert not torch.equal(a, ExitLossPositions(6, 0.3, 16, 4, "cpu").positions)
    assert (a.diff(dim=1) > 0).all() and a.shape == (4, 5)
    bounds = torch.tensor([0, 3, 6, 9, 12, 16])  # one position in each of 5 strata
    assert ((a >= bounds[:-1]) & (a < bounds[1:])).all()
    assert not torch.equal(a[0], a[1])  # rows draw their own
    sub, _ = _pair(0.3)
    ids, labels = batch(sub.config)
    torch.manual_seed(3)
    first = sub(ids, labels).loss
    torch.manual_seed(3)  # without a seed the model draws it from the default generator
    assert torch.equal(first, sub(ids, labels).loss)


def test_fraction_one_is_the_full_computation(seeded):
    sub, full = _pair(1.0)
    ids, labels = batch(sub.config)
    assert torch.equal(sub(ids, labels).loss, full(ids, labels).loss)


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, float("nan"), "half"])
def test_fraction_is_validated(bad):
    with pytest.raises(ConfigError, match="^model.exit_loss_fraction: .*in \\(0, 1\\]"):
        tiny_config(exit_loss_fraction=bad)


def _train_one_step(rank, data, root, layout):
    from megatron_ztt.training.engines import build_engine
    from test_pipeline_variants import BASE, EXITS, _capture_gradients, _global_batch
    from train_helpers import micro_config

    config = micro_config(data, root, *BASE, EXITS, "model.exit_loss_fraction=0.25", *layout)
    engine = build_engine(config)
    captured = _capture_gradients(engine)
    engine.train()
    torch.manual_seed(99)  # the step's exit-loss positions come from the default generator
    result = engine.train_step(iter(_global_batch(config)), 1, collect_stats=False)
    return {"losses": {k: float(v) for k, v in result.losses.items()},
            "grads": engine.gather_to_full(captured)}


@pytest.mark.slow
def test_circular_pipeline_matches_one_process(sample_data, tmp_path):
    from distributed import run_distributed

    one = run_distributed(_train_one_step, world_size=1,
                          args=(sample_data, str(tmp_path / "pp1"), []))[0]
    ring = run_distributed(_train_one_step, world_size=2, pipeline_parallel=2,
                           args=(sample_data, str(tmp_path / "pp2"),
                                 ["parallel.pipeline=2"]))[-1]
    assert sorted(ring["losses"]) == sorted(one["losses"])
    for name, value in one["losses"].items():
        assert abs(ring["losses"][name] - value) < 1e-5, (name, ring["losses"][name], value)
    assert sorted(ring["grads"]) == sorted(one["grads"])
    for name, grad in one["grads"].items():
        assert torch.allclose(ring["grads"][name], grad, atol=1e-6, rtol=1e-4), name
