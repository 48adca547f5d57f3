"""What travels between the circular pipeline's virtual stages (``carried_shapes``, the
shapes the stages are built with; hop v is what virtual stage v sends to v + 1): each hop carries the hidden state, plus the open
cycle's input on the hops inside a cycle when a gate reads it; the states of the exit losses
stay on the last rank, which computes those losses (``CircularStage.attach_exit_loss``).
One process, no spawn: the stages of both ranks are only built."""

import pytest

from model_helpers import tiny_config


def _hidden_sized_per_hop(config, size, training=True, exits=False):
    from megatron_ztt.parallel.circular import CircularStage, carried_shapes

    shapes = [carried_shapes(CircularStage(config, rank, size), 2, training, exits)
              for rank in range(size)]
    hops = [shapes[v % size][v // size][1] for v in range(config.num_cycles * size - 1)]
    hidden = (config.seq_length, 2, config.hidden_size)
    return [sum(tuple(t.shape) == hidden for t in hop) for hop in hops], hops


@pytest.mark.parametrize("gate, want", [(True, [2, 1, 2, 1, 2, 1, 2]),
                                        (False, [1, 1, 1, 1, 1, 1, 1])])
def test_hops_carry_the_hidden_and_the_gates_input_not_the_exit_states(seeded, gate, want):
    # C=4, P=2, every cycle's exit loss weighted: before, the kept exit states travelled
    # around the ring too (2, 2, 3, 3, 4, 4, 5 with the gate)
    config = tiny_config(num_cycles=4, num_layers=6, gate=gate,
                         exit_loss_weights=[0.1, 0.2, 0.3, 1.0])
    counts, hops = _hidden_sized_per_hop(config, 2)
    assert counts == want
    assert all(len(hop) == n for hop, n in zip(hops, counts))  # nothing else travels
    # validation sends the same; with an exit rule the exit record ([s, b, 3]) joins, and
    # the cycle input travels inside every cycle (the tokens that left keep it)
    assert _hidden_sized_per_hop(config, 2, training=False)[0] == want
    counts, hops = _hidden_sized_per_hop(config, 2, training=False, exits=True)
    assert counts == [2, 1, 2, 1, 2, 1, 2]
    assert all(tuple(hop[-1].shape) == (config.seq_length, 2, 3) for hop in hops)


def test_hops_inside_a_cycle_over_four_ranks(seeded):
    # P=4: the three hops inside each cycle carry its input to the gate on the last rank
    config = tiny_config(num_cycles=2, num_layers=6, exit_loss_weights=[0.5, 1.0])
    assert _hidden_sized_per_hop(config, 4)[0] == [2, 2, 2, 1, 2, 2, 2]
