"""Zero-token attention against a plain softmax reference, forward and backward."""

import math

import pytest
import torch

from megatron_ztt.model.cycle_engine import with_zero_key, zero_key_attention
from model_helpers import assert_close


def reference(query, key, value, zero_key):
    """softmax over [k_z; K] with a zero value for k_z, written out in full."""
    b, heads, s, d = query.shape
    groups = key.shape[1]
    key = key.repeat_interleave(heads // groups, dim=1)
    value = value.repeat_interleave(heads // groups, dim=1)
    zk = zero_key.repeat_interleave(heads // groups, dim=0)  # [heads, d]
    scores = query @ key.transpose(-1, -2) / math.sqrt(d)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    zero_scores = (query * zk[None, :, None, :]).sum(-1, keepdim=True) / math.sqrt(d)
    probs = torch.softmax(torch.cat([zero_scores, scores], dim=-1), dim=-1)
    values = torch.cat([torch.zeros(b, heads, 1, d), value], dim=2)
    return probs @ values, probs[..., 0]


@pytest.mark.parametrize("heads,groups", [(4, 4), (4, 2), (6, 1)])
def test_matches_reference_forward_and_backward(heads, groups):
    torch.manual_seed(0)
    b, s, d = 2, 12, 8
    tensors = [torch.randn(b, heads, s, d), torch.randn(b, groups, s, d),
               torch.randn(b, groups, s, d), torch.randn(groups, d)]
    ours = [t.clone().requires_grad_() for t in tensors]
    ref = [t.clone().requires_grad_() for t in tensors]

    query, key, value, zero_key = ours
    out, probs = zero_key_attention(query, *with_zero_key(key, value, zero_key),
                                    1 / math.sqrt(d), zero_token=True, causal=True,
                                    zero_attention=True)
    ref_out, ref_probs = reference(*ref)
    assert_close(out, ref_out, atol=1e-5, what="output")
    assert_close(probs, ref_probs, atol=1e-6, what="zero attention")

    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    (ref_out * upstream).sum().backward()
    for name, a, r in zip(["query", "key", "value", "zero_key"], ours, ref):
        assert_close(a.grad, r.grad, atol=1e-5, what=f"grad {name}")
    # the zero key does receive a gradient (it shapes every softmax)
    assert ours[3].grad.abs().sum() > 0


def test_zero_token_adds_nothing_but_rescales():
    """The zero key only takes probability mass away: out = (1 - a) * plain attention."""
    torch.manual_seed(1)
    b, heads, s, d = 1, 2, 10, 4
    q, k, v = torch.randn(b, heads, s, d), torch.randn(b, heads, s, d), torch.randn(b, heads, s, d)
    zk = torch.randn(heads, d)
    out, a = zero_key_attention(q, *with_zero_key(k, v, zk), 1 / math.sqrt(d), zero_token=True,
                                causal=True, zero_attention=True)
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert_close(out, (1 - a)[..., None] * plain, atol=1e-5)
    assert ((a > 0) & (a < 1)).all()


@pytest.mark.parametrize("masked", [False, True])
def test_fused_and_plain_log_sum_exp_paths_agree(masked):
    """The zero attention is read from the attention's log-sum-exp: the fused CPU kernel and
    the plain path (other devices) give the same output and lse, with a mask or causal."""
    from megatron_ztt.model.cycle_engine import attention_with_lse

    torch.manual_seed(2)
    q, k, v = torch.randn(2, 4, 7, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    mask = torch.rand(2, 1, 7, 9) > 0.4 if masked else None
    if masked:
        mask[..., 0] = True  # every query sees the zero key
    else:
        q = torch.randn(2, 4, 9, 8)
    results = [attention_with_lse(q, k, v, 0.3, mask, not masked, 0.0, fused=f)
               for f in (True, False)]
    assert_close(results[0][0], results[1][0], atol=1e-5, what="output")
    assert_close(results[0][1], results[1][1], atol=1e-5, what="lse")
