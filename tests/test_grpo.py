"""GRPO's claims (DeepSeekMath eq. 3, R1 eqs. 1-3, DAPO / Dr. GRPO variants) and grpo.py's contract."""

import math
from dataclasses import dataclass

import pytest
import torch

from grpo import GRPO, GRPOConfig, advantages, completion_logprobs, grpo_loss, k3_kl
from model import Transformer, generate, get_config
from rewards import RewardSpec


def hand_batch():
    """ratio = [[1, 1.5], [0.5, 1]], A = [1, -1], the last token of row 1 masked."""
    old = torch.log(torch.tensor([[0.4, 0.2], [0.6, 0.3]]))
    logp = old + torch.log(torch.tensor([[1.0, 1.5], [0.5, 1.0]]))
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    return logp, old, adv, mask


# Token terms min(ratio A, clip(ratio) A): row 0: 1, min(1.5, 1.2) = 1.2; row 1: min(-0.5, -0.8) = -0.8.
@pytest.mark.parametrize("agg,expected", [
    ("grpo", -((1 + 1.2) / 2 + (-0.8) / 1) / 2),   # per-sequence mean, then mean: -0.15
    ("token", -(1 + 1.2 - 0.8) / 3),               # over the 3 real tokens
    ("dr_grpo", -(1 + 1.2 - 0.8) / (2 * 2)),       # constant normaliser G * L
])
def test_loss_equals_hand_computed_values(agg, expected):
    logp, old, adv, mask = hand_batch()
    loss, stats = grpo_loss(logp, old, adv, mask, loss_agg=agg)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats.clip_frac == pytest.approx(2 / 3)  # ratio 1.5 with A > 0 and 0.5 with A < 0


def test_kl_term_equals_hand_computed_value():
    logp, old, adv, mask = hand_batch()
    ref = logp.clone()
    ref[0, 0] = logp[0, 0] + math.log(2.0)          # pi_ref / pi = 2 on one token
    loss, stats = grpo_loss(logp, old, adv, mask, ref_logp=ref, beta=0.1, loss_agg="grpo")
    kl = 2 - math.log(2) - 1
    assert loss.item() == pytest.approx(-0.15 + 0.1 * kl / 2 / 2, abs=1e-6)
    assert stats.kl == pytest.approx(kl / 3, abs=1e-6)


def test_kl_is_nonnegative_and_zero_when_policy_equals_reference():
    torch.manual_seed(0)
    logp, ref = torch.randn(50, 7).log_softmax(-1), torch.randn(50, 7).log_softmax(-1)
    assert (k3_kl(logp, ref) >= 0).all()
    assert torch.equal(k3_kl(logp, logp), torch.zeros_like(logp))


@pytest.mark.parametrize("agg", ["grpo", "token", "dr_grpo"])
def test_first_iteration_ratio_is_one_and_gradient_is_the_policy_gradient(agg):
    torch.manual_seed(0)
    theta = torch.randn(3, 5, requires_grad=True)
    logp = theta.log_softmax(-1)
    adv = torch.tensor([0.7, -1.2, 0.4])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    loss, stats = grpo_loss(logp, logp.detach(), adv, mask, loss_agg=agg)
    assert stats.ratio_mean == 1.0 and stats.clip_frac == 0.0
    (g_loss,) = torch.autograd.grad(loss, theta, retain_graph=True)
    m = mask.float()
    weighted = adv.unsqueeze(1) * logp * m
    pg = {"grpo": (weighted.sum(1) / m.sum(1)).mean(), "token": weighted.sum() / m.sum(),
          "dr_grpo": weighted.sum() / (3 * 5)}[agg]
    (g_pg,) = torch.autograd.grad(-pg, theta)
    assert torch.allclose(g_loss, g_pg, atol=1e-6)


def test_zero_advantages_and_zero_beta_give_zero_gradient():
    theta = torch.randn(2, 4, requires_grad=True)
    logp = theta.log_softmax(-1)
    loss, _ = grpo_loss(logp, logp.detach() - 0.3, torch.zeros(2), torch.ones(2, 4, dtype=torch.bool))
    (g,) = torch.autograd.grad(loss, theta)
    assert torch.equal(g, torch.zeros_like(g))


def test_masked_tokens_contribute_nothing():
    theta = torch.randn(2, 6, requires_grad=True)
    logp = theta.log_softmax(-1)
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [0, 1, 1, 1, 0, 0]], dtype=torch.bool)
    ref = torch.randn(2, 6)
    loss, _ = grpo_loss(logp, logp.detach(), torch.tensor([1.0, -2.0]), mask, ref_logp=ref, beta=0.5)
    (g,) = torch.autograd.grad(loss, logp)
    assert (g[~mask] == 0).all() and (g[mask] != 0).all()


@pytest.mark.parametrize("ratio,adv", [(1.5, 1.0), (0.5, -1.0)])
def test_clipped_ratio_with_matching_sign_gives_no_gradient(ratio, adv):
    logp = torch.tensor([[math.log(0.3)]], requires_grad=True)
    old = logp.detach() - math.log(ratio)
    loss, stats = grpo_loss(logp, old, torch.tensor([adv]), torch.ones(1, 1, dtype=torch.bool))
    (g,) = torch.autograd.grad(loss, logp)
    assert g.item() == 0.0 and stats.clip_frac == 1.0


def test_clip_higher_widens_only_the_upper_band():
    logp = torch.tensor([[math.log(0.3)]], requires_grad=True)
    old = logp.detach() - math.log(1.25)           # ratio 1.25: clipped at 0.2, free at 0.28
    loss, _ = grpo_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 1, dtype=torch.bool), eps_high=0.28)
    (g,) = torch.autograd.grad(loss, logp)
    assert g.item() == pytest.approx(-1.25)


def test_advantages_are_group_normalised_and_dr_grpo_drops_the_std():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    a = advantages(r, 4, "group", eps=0.0)
    assert torch.allclose(a[:4], (r[:4] - 0.25) / r[:4].std())
    assert torch.equal(a[4:], torch.zeros(4))      # a group with equal rewards teaches nothing
    assert torch.allclose(advantages(r, 4, "none"), torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]))
    assert torch.allclose(advantages(r, 4, "batch", eps=0.0)[:4], (r[:4] - 0.25) / r.std())


@pytest.mark.parametrize("field,value", [("group_size", 1), ("loss_agg", "mean"), ("beta", -1.0),
                                         ("adv_scale", "max"), ("overlong_cache", 5000), ("top_p", 0.0)])
def test_invalid_grpo_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        GRPOConfig(**{field: value})


# ------------------------------------------------------------------------------------------------
# End to end: a micro model learns a verifiable toy task from rewards alone

EOS = 1


@dataclass
class ParityProblem:
    digits: list[int]

    @property
    def parity(self):
        return self.digits[-1] % 2


def parity_reward(text: str, problem: ParityProblem) -> float:
    """1 if the first answer token's id has the parity of the number (chance: 1/2)."""
    ids = [int(t) for t in text.split()] if text.strip() else []
    return float(bool(ids) and ids[0] % 2 == problem.parity)


def make_problems(gen, n):
    return [ParityProblem(torch.randint(0, 10, (int(torch.randint(1, 5, (1,), generator=gen)),),
                                        generator=gen).tolist()) for _ in range(n)]


def parity_trainer(beta=0.0, **kw):
    torch.manual_seed(0)
    model = Transformer(get_config("micro", mtp_depth=0))
    cfg = GRPOConfig(group_size=8, prompts_per_step=16, max_new_tokens=2, lr=3e-3, beta=beta, **kw)
    return GRPO(model, cfg, [RewardSpec("accuracy", parity_reward, 1.0)],
                prompt_ids=lambda p: [3] + [10 + d for d in p.digits],
                decode=lambda ids: " ".join(map(str, ids)), pad_id=0, stop_ids=(EOS,), seed=0)


def test_grpo_learns_parity_from_rewards_alone():
    # R1-Zero's KL weight. At this learning rate (1000x R1-Zero's) the run is a chaotic system: another
    # CPU's kernels round differently and give another trajectory (beta = 0.01 failed on an AVX2
    # host). Over 16 seeds, standing in for such trajectories, beta = 0.001 learned in every one
    # (mean of the last 10 steps 0.94-0.98), while beta = 0.01 and beta = 0 fell back below 0.9 in
    # 2 of 6 and 2 of 8 (with 0.01, once most groups are solved their advantages are 0 and the KL to
    # the random reference is most of the gradient; with 0, the falls followed gradient spikes).
    # A single dip is allowed for.
    trainer = parity_trainer(beta=0.001)
    gen = torch.Generator().manual_seed(0)
    history = [trainer.step(make_problems(gen, 16))["reward"] for _ in range(50)]
    assert sum(history[:3]) / 3 < 0.7
    assert sum(history[-10:]) / 10 > 0.85


def test_step_reports_the_documented_metrics():
    trainer = parity_trainer(beta=0.01, mu=2, n_minibatches=2, micro_batch_size=16)
    m = trainer.step(make_problems(torch.Generator().manual_seed(1), 16))
    for key in ("reward", "reward_std", "reward/accuracy", "accuracy", "len_mean", "len_max", "kl",
                "clip_frac", "entropy", "zero_var_frac", "rollout_s", "update_s", "grad_norm"):
        assert key in m and math.isfinite(m[key]), key


def test_reference_model_is_not_built_when_beta_is_zero():
    assert parity_trainer(beta=0.0).ref is None
    assert parity_trainer(beta=0.01).ref is not None


def test_dynamic_sampling_keeps_only_groups_with_reward_variance():
    trainer = parity_trainer(dynamic_sampling=True, max_refills=3)
    for seed in range(50):  # a batch in which some group's G rewards are all equal (about 1 in 8)
        gen = torch.Generator().manual_seed(seed)
        r, info = trainer.collect(make_problems(gen, 16), refill=lambda n, gen=gen: make_problems(gen, n))
        if info["zero_var_frac"] > 0:
            break
    assert info["zero_var_frac"] > 0
    groups = r.rewards.view(-1, 8)
    assert ((groups.max(1).values - groups.min(1).values) > 0).all()
    assert groups.shape[0] <= 16


def test_truncated_completions_are_masked_when_asked():
    trainer = parity_trainer(mask_truncated=True)
    r = trainer.rollout(make_problems(torch.Generator().manual_seed(3), 4))
    assert (~r.stopped).any()
    assert not r.mask[~r.stopped].any()


def test_reference_reset_copies_the_policy():
    trainer = parity_trainer(beta=0.01, ref_reset_every=1)
    trainer.step(make_problems(torch.Generator().manual_seed(4), 16))
    for p, q in zip(trainer.policy.parameters(), trainer.ref.parameters()):
        assert torch.equal(p, q)


# ------------------------------------------------------------------------------------------------
# Log-probs of completions that share a prompt

def test_shared_prompt_logprobs_equal_unshared():
    torch.manual_seed(0)
    model = Transformer(get_config("micro"))
    for moe in model.moe_layers():  # a non-trivial routing, as after some balancing
        moe.gate.bias.normal_(0, 0.5)
    a, b, c = [5, 9, 13, 2, 7, 1, 30], [3, 4], [60, 61, 62]
    prompts = [a, b, a, c, b, a, b]  # duplicates of different lengths, interleaved, one prompt alone
    g = generate(model, prompts, 9, pad_id=0, stop_ids=(7, 11), temperature=1.5,
                 generator=torch.Generator().manual_seed(1))
    assert (~g.mask).any() and g.mask[:, 0].all()  # some rows stopped early: padded completions too
    model.train()
    weights = torch.randn(g.tokens.shape)

    def logp_and_grads(shared):
        model.zero_grad()
        if shared:
            logp, ent = completion_logprobs(model, g.prompt_tokens, g.prompt_mask, g.tokens, g.mask, 0.7,
                                            with_entropy=True)
        else:  # the definition: every row's prompt and completion in one forward
            P = g.prompt_tokens.shape[1]
            logits = model(torch.cat([g.prompt_tokens, g.tokens], 1),
                           key_mask=torch.cat([g.prompt_mask, g.mask], 1)).logits[:, P - 1:-1] / 0.7
            logps = logits.log_softmax(-1)
            logp, ent = logps.gather(2, g.tokens.unsqueeze(2)).squeeze(2), -(logps.exp() * logps).sum(-1)
        (logp * weights * g.mask).sum().backward()
        return logp.detach(), ent, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    logp, ent, grads = logp_and_grads(shared=True)
    logp_ref, ent_ref, grads_ref = logp_and_grads(shared=False)
    m = g.mask
    assert torch.allclose(logp[m], logp_ref[m], atol=1e-6) and torch.allclose(ent[m], ent_ref[m], atol=1e-6)
    assert grads.keys() == grads_ref.keys() and len(grads) > 0
    for name, grad in grads.items():
        assert torch.allclose(grad, grads_ref[name], atol=1e-6, rtol=1e-4), name
    with torch.no_grad():  # the reference and pi_old forwards
        assert torch.allclose(completion_logprobs(model, g.prompt_tokens, g.prompt_mask, g.tokens, g.mask, 0.7)[m],
                              logp_ref[m], atol=1e-6)
