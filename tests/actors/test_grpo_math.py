"""GRPO maths: hand-computed examples, vectorised == per-sample loop, degenerate groups."""
from __future__ import annotations

import math

import pytest
import torch

from actors import grpo_math as gm


# ---------------------------------------------------------------- advantages

def test_grpo_advantages_hand_computed():
    # group 0: rewards 1, 0, 0, 1 -> mean 0.5, unbiased std sqrt(1/3) -> +-0.8660
    # group 1: rewards 2, 2 (zero variance) -> 0, 0
    # group 2: a single sample -> 0
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 5.0])
    g = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    adv = gm.get_adv_est("grpo")(r, g)
    a = 0.5 / math.sqrt(1 / 3)
    torch.testing.assert_close(adv, torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0]), atol=1e-5, rtol=0)
    assert torch.isfinite(adv).all()


def test_grpo_no_std_and_rloo_hand_computed():
    r = torch.tensor([3.0, 1.0, 2.0, 7.0])
    g = torch.tensor([0, 0, 0, 1])
    torch.testing.assert_close(gm.get_adv_est("grpo_no_std")(r, g), torch.tensor([1.0, -1.0, 0.0, 0.0]))
    # rloo: 3 - mean(1, 2) = 1.5 ; 1 - mean(3, 2) = -1.5 ; 2 - mean(3, 1) = 0 ; singleton 0
    torch.testing.assert_close(gm.get_adv_est("rloo")(r, g), torch.tensor([1.5, -1.5, 0.0, 0.0]))


@pytest.mark.parametrize("name", ["grpo", "grpo_no_std", "rloo"])
def test_advantages_vectorised_equals_loop(name):
    torch.manual_seed(0)
    g = torch.tensor([0] * 5 + [1] * 3 + [2] * 1 + [3] * 4 + [4] * 2)
    r = torch.randint(0, 3, (len(g),)).float()
    r[13:15] = 1.0  # group 4 zero variance
    got = gm.get_adv_est(name)(r, g)
    want = torch.zeros_like(r)
    for gid in g.unique():
        idx = (g == gid).nonzero().flatten().tolist()
        vals = [float(r[i]) for i in idx]
        k = len(vals)
        mean = sum(vals) / k
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (k - 1)) if k > 1 else 0.0
        for i in idx:
            if k < 2:
                want[i] = 0.0
            elif name == "grpo":
                want[i] = 0.0 if std == 0 else (float(r[i]) - mean) / (std + 1e-6)
            elif name == "grpo_no_std":
                want[i] = float(r[i]) - mean
            else:
                want[i] = float(r[i]) - (sum(vals) - float(r[i])) / (k - 1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_groups_with_variance():
    r = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5, 3.0])
    g = torch.tensor([0, 0, 1, 1, 2, 2, 3])
    assert gm.groups_with_variance(r, g).tolist() == [False, True, False, False]


def test_registry_rejects_unknown_and_duplicates():
    with pytest.raises(KeyError, match="registered"):
        gm.get_policy_loss("nope")
    with pytest.raises(ValueError, match="already registered"):
        gm.register_policy_loss("clip")(lambda *a: None)


# ---------------------------------------------------------------- policy losses

def test_clip_loss_hand_computed():
    # one sequence, three tokens; eps_low 0.2, eps_high 0.28 (DAPO)
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 0.7, 1.1]]))  # ratios 1.5, 0.7, 1.1
    mask = torch.ones(1, 3)
    p = gm.LossParams(eps_low=0.2, eps_high=0.28)
    # A = +1: min(r, clip(r)) = 1.28, 0.7, 1.1 -> loss -1.28, -0.7, -1.1 ; clipped: token 0
    loss, m = gm.get_policy_loss("clip")(logp, old, torch.tensor([1.0]), mask, p)
    torch.testing.assert_close(loss, torch.tensor([[-1.28, -0.7, -1.1]]))
    assert m["clip_frac"].item() == pytest.approx(1 / 3)
    assert m["clip_frac_high"].item() == pytest.approx(1 / 3)
    # A = -1: min(-r, -clip(r)) = -1.5, -0.8, -1.1 -> loss 1.5, 0.8, 1.1 ; clipped: token 1
    loss, m = gm.get_policy_loss("clip")(logp, old, torch.tensor([-1.0]), mask, p)
    torch.testing.assert_close(loss, torch.tensor([[1.5, 0.8, 1.1]]))
    assert m["clip_frac"].item() == pytest.approx(1 / 3)
    assert m["clip_frac_low"].item() == pytest.approx(1 / 3)


def test_clip_loss_gradient_zero_where_clipped():
    old = torch.zeros(1, 2)
    logp = torch.log(torch.tensor([[1.5, 1.1]])).requires_grad_(True)
    loss, _ = gm.get_policy_loss("clip")(logp, old, torch.tensor([1.0]), torch.ones(1, 2), gm.LossParams())
    loss.sum().backward()
    # d(-r)/dlogp = -r for the unclipped token; 0 for the clipped one
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -1.1]]))


def test_gspo_hand_computed():
    # sequence 0: log-ratios 0.1, 0.3 (mean 0.2, s = e^0.2 = 1.2214); seq 1: -0.4 (1 token) + pad
    old = torch.zeros(2, 2)
    logp = torch.tensor([[0.1, 0.3], [-0.4, 9.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    p = gm.LossParams(eps_low=0.3, eps_high=0.1)
    loss, m = gm.get_policy_loss("gspo")(logp, old, torch.tensor([2.0, -1.0]), mask, p)
    s0, s1 = math.exp(0.2), math.exp(-0.4)
    # seq 0: A=2, s0=1.2214 > 1.1 -> clipped to 1.1 -> -2.2 per token
    # seq 1: A=-1, s1=0.670 < 0.7 -> min(-0.670, -0.7) = -0.7 -> loss 0.7 (clipped)
    torch.testing.assert_close(loss.detach(), torch.tensor([[-2.2, -2.2], [0.7, 0.0]]))
    assert m["clip_frac"].item() == pytest.approx(1.0)
    # unclipped example: gradient of the seq-mean-token-mean loss w.r.t. logp_t is -A * s / |y|
    logp2 = torch.tensor([[0.02, 0.04]], requires_grad=True)
    loss2, _ = gm.get_policy_loss("gspo")(logp2, torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2), p)
    gm.get_loss_agg("seq-mean-token-mean")(loss2, torch.ones(1, 2)).backward()
    s = math.exp(0.03)
    torch.testing.assert_close(logp2.grad, torch.tensor([[-s / 2, -s / 2]]))
    _ = s0, s1


def test_reinforce_hand_computed():
    # ratio e^0.5 = 1.6487 and e^-1 = 0.3679, no clipping: loss = -ratio * A ; padding gives 0
    logp = torch.tensor([[0.5, -1.0, 7.0]])
    loss, m = gm.get_policy_loss("reinforce")(logp, torch.zeros(1, 3), torch.tensor([2.0]),
                                              torch.tensor([[1.0, 1.0, 0.0]]), gm.LossParams())
    torch.testing.assert_close(loss, torch.tensor([[-2 * math.exp(0.5), -2 * math.exp(-1.0), 0.0]]))
    assert m["clip_frac"].item() == 0.0


@pytest.mark.parametrize("name", ["clip", "gspo", "reinforce"])
def test_policy_loss_vectorised_equals_loop(name):
    torch.manual_seed(1)
    B, T = 5, 7
    logp = -torch.rand(B, T) * 3
    old = logp + 0.3 * torch.randn(B, T)
    adv = torch.randn(B)
    lengths = [7, 3, 1, 5, 6]
    mask = torch.zeros(B, T)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1.0
    p = gm.LossParams(eps_low=0.2, eps_high=0.28)
    got, _ = gm.get_policy_loss(name)(logp, old, adv, mask, p)
    for b in range(B):
        n = lengths[b]
        seq_log_ratio = sum(float(logp[b, t] - old[b, t]) for t in range(n)) / n
        for t in range(T):
            if t >= n:
                assert got[b, t].item() == 0.0
                continue
            r = math.exp(seq_log_ratio) if name == "gspo" else math.exp(float(logp[b, t] - old[b, t]))
            a = float(adv[b])
            if name == "reinforce":
                want = -r * a
            else:
                want = -min(r * a, min(max(r, 1 - p.eps_low), 1 + p.eps_high) * a)
            assert got[b, t].item() == pytest.approx(want, rel=1e-5, abs=1e-6)


# ---------------------------------------------------------------- KL

def test_kl_estimators_hand_computed():
    logp = torch.tensor([math.log(0.5)])
    ref = torch.tensor([math.log(0.25)])
    d = math.log(0.25) - math.log(0.5)  # log(ref / pi) = -log 2
    assert gm.get_kl_estimator("k1")(logp, ref).item() == pytest.approx(math.log(2))
    assert gm.get_kl_estimator("k2")(logp, ref).item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert gm.get_kl_estimator("k3")(logp, ref).item() == pytest.approx(math.exp(d) - d - 1)


def test_kl_estimators_match_true_kl_in_expectation():
    """k1 and k3 are unbiased estimators of KL(pi || ref) under samples of pi."""
    torch.manual_seed(0)
    pi = torch.softmax(torch.randn(6), -1)
    ref = torch.softmax(pi.log() + 0.3 * torch.randn(6), -1)
    true_kl = (pi * (pi.log() - ref.log())).sum().item()
    x = torch.multinomial(pi, 400_000, replacement=True)
    lp, lr = pi.log()[x], ref.log()[x]
    assert gm.kl_k1(lp, lr).mean().item() == pytest.approx(true_kl, abs=3e-3)
    assert gm.kl_k3(lp, lr).mean().item() == pytest.approx(true_kl, abs=3e-3)
    assert (gm.kl_k3(lp, lr) >= 0).all() and (gm.kl_k2(lp, lr) >= 0).all()


# ---------------------------------------------------------------- aggregation

def test_aggregations_hand_computed():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    # token-mean: (1+2+3+4)/4 = 2.5 ; seq-mean-token-mean: (2 + 4)/2 = 3 ; Dr GRPO: 10/(2*8)
    assert gm.get_loss_agg("token-mean")(loss, mask).item() == pytest.approx(2.5)
    assert gm.get_loss_agg("seq-mean-token-mean")(loss, mask).item() == pytest.approx(3.0)
    assert gm.get_loss_agg("seq-mean-token-sum-norm")(loss, mask, max_len=8).item() == pytest.approx(10 / 16)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_aggregation_split_with_global_normalisers_equals_whole(agg):
    """Micro-batches / ranks with global normalisers sum to the loss of the whole batch."""
    torch.manual_seed(0)
    loss = torch.randn(6, 5)
    mask = (torch.rand(6, 5) > 0.3).float()
    mask[:, 0] = 1.0
    fn = gm.get_loss_agg(agg)
    whole = fn(loss, mask, max_len=5)
    parts = sum(fn(loss[i:i + 2], mask[i:i + 2], num_tokens=mask.sum(), num_seqs=6, max_len=5)
                for i in range(0, 6, 2))
    assert parts.item() == pytest.approx(whole.item(), rel=1e-6)


def test_grpo_loss_combines_policy_kl_and_aggregation():
    logp = torch.tensor([[-1.0, -2.0]])
    old = logp.clone()
    ref = torch.tensor([[-1.5, -2.0]])
    mask = torch.ones(1, 2)
    loss, m = gm.grpo_loss(logp, old, torch.tensor([1.0]), mask, ref_logp=ref, kl_coef=0.1,
                           kl_estimator="k1", loss_agg="token-mean")
    # policy part: -1 per token ; kl k1: 0.5, 0 -> mean loss = (-1 + 0.05 - 1 + 0) / 2
    assert loss.item() == pytest.approx((-1 + 0.05 - 1) / 2)
    assert m["kl"].item() == pytest.approx(0.25)
    assert m["clip_frac"].item() == 0.0


def test_importance_sampling_weights_by_hand():
    """pi_old / pi_rollout per token and per sequence, truncated or masked at the cap (2)."""
    import math

    old = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, 0.0]])
    rollout = torch.tensor([[-1.0, -2.0, -0.5], [-2.5, -2.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    # token ratios: [1, e, e^-0.5], [e^0.5, e^0.5, (masked)]
    w, m = gm.is_weights(old, rollout, mask, "token_truncate", 2.0)
    torch.testing.assert_close(w, torch.tensor([[1.0, 2.0, math.exp(-0.5)], [math.exp(0.5), math.exp(0.5), 0.0]]))
    assert float(m["is_clip_frac"]) == pytest.approx(1 / 5)
    assert float(m["is_weight_mean"]) == pytest.approx((1 + 2 + math.exp(-0.5) + 2 * math.exp(0.5)) / 5, rel=1e-6)
    w, _ = gm.is_weights(old, rollout, mask, "token_mask", 2.0)
    assert w.tolist() == [[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]]
    # sequence ratios: e^(0 + 1 - 0.5) = e^0.5 (under the cap), e^(0.5 + 0.5) = e (over it)
    w, m = gm.is_weights(old, rollout, mask, "sequence_truncate", 2.0)
    torch.testing.assert_close(w, torch.tensor([[math.exp(0.5)] * 3, [2.0, 2.0, 0.0]]))
    w, m = gm.is_weights(old, rollout, mask, "sequence_mask", 2.0)
    assert w.tolist() == [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]] and float(m["is_clip_frac"]) == pytest.approx(2 / 5)
    assert gm.is_weights(old, rollout, mask, "off", 2.0) == (None, {})
    # the weight multiplies the policy term only, and is not differentiated
    logp = old.clone().requires_grad_(True)
    adv = torch.tensor([1.0, -1.0])
    w, _ = gm.is_weights(logp, rollout, mask, "token_truncate", 2.0)
    plain, _ = gm.grpo_loss(logp, logp.detach(), adv, mask)
    weighted, _ = gm.grpo_loss(logp, logp.detach(), adv, mask, is_weight=w)
    (g_plain,) = torch.autograd.grad(plain, logp)
    (g_w,) = torch.autograd.grad(weighted, logp)
    torch.testing.assert_close(g_w, g_plain * w)
