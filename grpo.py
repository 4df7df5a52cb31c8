"""Group Relative Policy Optimization: rollouts, group-relative advantages, the clipped objective with KL.

Implements DeepSeekMath (arXiv 2402.03300) eq. 3, the form R1 (arXiv 2501.12948) eqs. 1-3 uses:
  ratio_{i,t} = pi_theta(o_{i,t}) / pi_old(o_{i,t})                      (token importance ratio)
  A_i = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + eps)                   (R1 eq. 3, `advantages`)
  L = -agg_{i,t}[ min(ratio A_i, clip(ratio, 1-eps_low, 1+eps_high) A_i) - beta KL_{i,t} ]
  KL_{i,t} = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1                  (k3 estimator, R1 eq. 2)
Variants are options, not copies: aggregation "grpo" (per-sequence mean, then mean), "token"
(DAPO: over all tokens of the batch) and "dr_grpo" (constant normaliser); advantage scaling by the
group std, the batch std or none (Dr. GRPO); DAPO's clip-higher (eps_high), dynamic sampling,
overlong masking and soft overlong penalty; mu inner updates over minibatches with real importance
ratios; periodic reset of the reference to the policy (R1 resets it every 400 steps).
Choices: the std is the sample std plus eps = 1e-4 (as TRL); log-probs are of softmax(logits / T),
the policy the sampler draws from; MTP and the sequence balance loss are not used in RL, while the
router biases keep balancing the load after every optimizer step; a question's G rows share one
forward of its prompt, in sampling and in the log-prob forwards (the same values and gradients).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

import parallel
from model import KVCache, Transformer, generate
from rewards import RewardSpec, compute_rewards, overlong_penalty


@dataclass
class GRPOConfig:
    group_size: int = 16              # G, completions per question (R1-Zero: 16)
    prompts_per_step: int = 32        # questions per rollout (R1-Zero: 32, so 512 completions)
    max_new_tokens: int = 1024        # completion budget per sample
    temperature: float = 1.0          # sampling temperature; log-probs use the same T
    top_p: float = 1.0
    top_k: int = 0
    lr: float = 3e-6                  # R1-Zero
    weight_decay: float = 0.0
    beta: float = 0.001               # KL weight (R1-Zero 0.001); 0 = no reference model at all
    eps_low: float = 0.2              # clip range below 1
    eps_high: float = 0.2             # clip range above 1 (DAPO clip-higher: 0.28)
    loss_agg: str = "grpo"            # "grpo" | "token" | "dr_grpo"
    adv_scale: str = "group"          # "group" std | "batch" std | "none" (Dr. GRPO)
    adv_eps: float = 1e-4
    mu: int = 1                       # inner epochs over each rollout
    n_minibatches: int = 1            # optimizer steps per inner epoch (R1-Zero: 16)
    micro_batch_size: int = 0         # sequences per forward for gradient accumulation (0 = whole minibatch)
    max_grad_norm: float = 1.0
    dynamic_sampling: bool = False    # DAPO: drop groups whose rewards are all equal, refill the batch
    max_refills: int = 3              # bounded resampling rounds for dynamic sampling
    mask_truncated: bool = False      # DAPO overlong filtering: no loss on completions that hit the budget
    overlong_cache: int = 0           # DAPO soft overlong penalty zone in tokens (0 = off)
    overlong_weight: float = 1.0
    ref_reset_every: int = 0          # copy the policy into the reference every N steps (0 = never)

    def __post_init__(self):
        checks = {
            "group_size": self.group_size >= 2, "prompts_per_step": self.prompts_per_step >= 1,
            "max_new_tokens": self.max_new_tokens >= 1, "temperature": self.temperature > 0,
            "top_p": 0 < self.top_p <= 1, "top_k": self.top_k >= 0, "lr": self.lr > 0,
            "beta": self.beta >= 0, "eps_low": 0 <= self.eps_low < 1, "eps_high": self.eps_high >= 0,
            "loss_agg": self.loss_agg in ("grpo", "token", "dr_grpo"),
            "adv_scale": self.adv_scale in ("group", "batch", "none"), "adv_eps": self.adv_eps >= 0,
            "mu": self.mu >= 1, "n_minibatches": self.n_minibatches >= 1,
            "micro_batch_size": self.micro_batch_size >= 0, "max_grad_norm": self.max_grad_norm > 0,
            "max_refills": self.max_refills >= 0,
            "overlong_cache": 0 <= self.overlong_cache < self.max_new_tokens,
            "ref_reset_every": self.ref_reset_every >= 0, "weight_decay": self.weight_decay >= 0,
        }
        for name, ok in checks.items():
            value = getattr(self, name)
            if not ok or (isinstance(value, float) and not math.isfinite(value)):
                raise ValueError(f"GRPOConfig.{name} has an invalid value: {value!r}")


# -------------------------------------------------------------------------------------------------
# Advantages and the loss

def advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """A_i = (r_i - group mean) / (std + eps): rewards (N,) laid out group by group -> (N,)."""
    r = rewards.view(-1, group_size)                                        # (n_groups, G)
    centred = r - r.mean(dim=1, keepdim=True)
    if scale == "group":
        std = r.std(dim=1, keepdim=True)
    elif scale == "batch":
        std = rewards.std().expand(r.shape[0], 1)
    elif scale == "none":
        return centred.flatten()
    else:
        raise ValueError(f"advantage scale must be 'group', 'batch' or 'none', got {scale!r}")
    # A group with equal rewards has nothing to teach: its advantage is 0, also when eps is 0.
    return torch.where(std > 0, centred / (std + eps), torch.zeros_like(centred)).flatten()


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """KL_{i,t} = pi_ref/pi - log(pi_ref/pi) - 1 >= 0, zero exactly when the two agree."""
    log_ratio = ref_logp - logp
    return log_ratio.exp() - log_ratio - 1


@dataclass
class LossStats:
    kl: float = 0.0
    clip_frac: float = 0.0
    ratio_mean: float = 1.0


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, *,
              ref_logp: torch.Tensor | None = None, beta: float = 0.0, eps_low: float = 0.2,
              eps_high: float = 0.2, loss_agg: str = "grpo", n_seqs: int | None = None,
              n_tokens: int | None = None, max_len: int | None = None):
    """The clipped surrogate with k3 KL, aggregated as `loss_agg` says. Returns (loss, LossStats).

    logp, old_logp, ref_logp, mask: (B, T); adv: (B,). The normalisers n_seqs / n_tokens default to
    this batch's; pass the whole minibatch's when accumulating gradients over micro-batches.
    "dr_grpo" divides the token sum by n_seqs * max_len (a constant, default T).
    """
    mask = mask.float()
    ratio = torch.exp(logp - old_logp)
    A = adv.unsqueeze(1)                                                     # A_i, the same for every token
    surrogate = torch.min(ratio * A, ratio.clamp(1 - eps_low, 1 + eps_high) * A)
    per_token = -surrogate
    kl = None
    if ref_logp is not None and beta > 0:
        kl = k3_kl(logp, ref_logp)
        per_token = per_token + beta * kl
    n_seqs = logp.shape[0] if n_seqs is None else n_seqs
    if loss_agg == "grpo":      # 1/G sum_i 1/|o_i| sum_t
        loss = ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).sum() / n_seqs
    elif loss_agg == "token":   # 1/sum|o_i| sum_i sum_t
        n_tokens = mask.sum().clamp(min=1) if n_tokens is None else (n_tokens if n_tokens > 0 else 1)
        loss = (per_token * mask).sum() / n_tokens
    elif loss_agg == "dr_grpo":  # 1/(G L) sum_i sum_t
        loss = (per_token * mask).sum() / (n_seqs * (max_len or logp.shape[1]))
    else:
        raise ValueError(f"loss_agg must be 'grpo', 'token' or 'dr_grpo', got {loss_agg!r}")
    with torch.no_grad():
        denom = mask.sum().clamp(min=1)
        clipped = ((ratio < 1 - eps_low) & (A < 0)) | ((ratio > 1 + eps_high) & (A > 0))
        stats = LossStats(kl=float((kl * mask).sum() / denom) if kl is not None else 0.0,
                          clip_frac=float((clipped.float() * mask).sum() / denom),
                          ratio_mean=float((ratio * mask).sum() / denom))
    return loss, stats


def completion_logprobs(model: Transformer, prompt_tokens, prompt_mask, tokens, mask, temperature: float,
                        with_entropy: bool = False):
    """log pi(o_t | q, o_<t) of each completion token under softmax(logits / T): (B, N) [, entropy (B, N)].

    Rows with the same prompt (G per question in GRPO) run it once: its latent cache, indexed out to
    each row, serves the completions, whose logits follow at start_pos = P. The values and gradients
    are those of running each row whole (indexing is differentiable: each row's gradient flows back to
    the one shared prompt forward), for about a G-th of the prompt's work. One difference: in training
    mode the router load (`MoE.expert_load`) counts a shared prompt's tokens once, not G times; the
    bias rule balances the tokens the experts actually compute, and a question's G copies are one input.
    """
    P, N = prompt_tokens.shape[1], tokens.shape[1]
    distinct, rows = torch.unique(torch.cat([prompt_tokens, prompt_mask.long()], dim=1), dim=0,
                                  return_inverse=True)                       # (D, 2P), (B,)
    if not parallel.any_rank(len(distinct) < len(rows), prompt_tokens.device):  # nothing to share: one forward
        full = torch.cat([prompt_tokens, tokens], dim=1)                     # (B, P + N)
        key_mask = torch.cat([prompt_mask, mask], dim=1)
        logits = model(full, key_mask=key_mask).logits[:, P - 1:-1]          # (B, N, V)
    else:
        prompt_cache = model.new_cache(len(distinct), P)
        logits = model(distinct[:, :P], key_mask=distinct[:, P:].bool(),
                       cache=prompt_cache).logits[:, -1:][rows]              # predicts o_1: (B, 1, V)
        if N > 1:  # o_N is only a target, never an input
            cache = [KVCache(F.pad(c.latent[rows], (0, 0, 0, N - 1)), c.kv_lora_rank)
                     for c in prompt_cache]                                  # (B, P + N - 1, d_c + d_R)
            key_mask = torch.cat([prompt_mask, mask[:, :-1]], dim=1)
            # Absorbed attention: N - 1 queries against P + N - 1 cached latents, where expanding every
            # latent to per-head keys and values (the naive path) costs more than it saves.
            rest = model(tokens[:, :-1], key_mask=key_mask, cache=cache, start_pos=P,
                         attn_impl="absorbed").logits                        # (B, N - 1, V)
            logits = torch.cat([logits, rest], dim=1)                        # (B, N, V)
    logps = (logits.float() / temperature).log_softmax(dim=-1)
    logp = logps.gather(2, tokens.unsqueeze(2)).squeeze(2)
    if not with_entropy:
        return logp
    with torch.no_grad():  # a metric only: no autograd graph over (B, N, V) on the update's hot path
        entropy = -(logps.exp() * logps).sum(dim=-1)
    return logp, entropy


# -------------------------------------------------------------------------------------------------
# Rollouts and the step

@dataclass
class Rollout:
    problems: list                    # one per sequence, group by group
    prompt_tokens: torch.Tensor       # (N, P) left-padded
    prompt_mask: torch.Tensor         # (N, P)
    tokens: torch.Tensor              # (N, C)
    mask: torch.Tensor                # (N, C) loss mask
    stopped: torch.Tensor             # (N,) ended by a stop token
    sample_logprobs: torch.Tensor     # (N, C) from the sampler
    lengths: torch.Tensor             # (N,) tokens generated, stop token included
    texts: list[str]
    rewards: torch.Tensor             # (N,)
    components: dict[str, list[float]] = field(default_factory=dict)


def _pad_cat(tensors: Sequence[torch.Tensor], value, left: bool) -> torch.Tensor:
    width = max(t.shape[1] for t in tensors)
    out = []
    for t in tensors:
        pad = (width - t.shape[1], 0) if left else (0, width - t.shape[1])
        out.append(F.pad(t, pad, value=value))
    return torch.cat(out, dim=0)


def merge_rollouts(parts: Sequence[Rollout], pad_id: int) -> Rollout:
    """Concatenate rollouts with different prompt/completion widths (left-pad prompts, right-pad completions)."""
    if len(parts) == 1:
        return parts[0]
    comps = {k: sum((p.components[k] for p in parts), []) for k in parts[0].components}
    return Rollout(sum((p.problems for p in parts), []),
                   _pad_cat([p.prompt_tokens for p in parts], pad_id, True),
                   _pad_cat([p.prompt_mask for p in parts], False, True),
                   _pad_cat([p.tokens for p in parts], pad_id, False),
                   _pad_cat([p.mask for p in parts], False, False),
                   torch.cat([p.stopped for p in parts]),
                   _pad_cat([p.sample_logprobs for p in parts], 0.0, False),
                   torch.cat([p.lengths for p in parts]), sum((p.texts for p in parts), []),
                   torch.cat([p.rewards for p in parts]), comps)


def select_groups(r: Rollout, groups: Sequence[int], G: int) -> Rollout:
    idx = torch.tensor([g * G + j for g in groups for j in range(G)], dtype=torch.long)
    return Rollout([r.problems[i] for i in idx.tolist()], r.prompt_tokens[idx], r.prompt_mask[idx],
                   r.tokens[idx], r.mask[idx], r.stopped[idx], r.sample_logprobs[idx],
                   r.lengths[idx], [r.texts[i] for i in idx.tolist()], r.rewards[idx],
                   {k: [v[i] for i in idx.tolist()] for k, v in r.components.items()})


class GRPO:
    """One object that owns the policy's RL loop: `step(problems)` = rollout, reward, advantage, update.

    prompt_ids(problem) -> token ids of the prompt; decode(ids) -> completion text for the rewards;
    rewards: RewardSpec list from rewards.py (or any objects with name, fn(text, problem), weight).
    Data parallel (under torchrun, with an FSDP2-sharded policy): each rank passes `step` its own
    questions (the same number on every rank) and rolls them out; advantages stay within groups, so
    only the loss normalisers, the batch std option and the metrics combine ranks.
    make_reference() builds an empty model like the policy (FSDP modules cannot be deep-copied).
    """

    def __init__(self, policy: Transformer, cfg: GRPOConfig, rewards: Sequence[RewardSpec], *,
                 prompt_ids: Callable[[Any], list[int]], decode: Callable[[list[int]], str],
                 pad_id: int, stop_ids: Sequence[int], optimizer: torch.optim.Optimizer | None = None,
                 seed: int = 0, make_reference: Callable[[], Transformer] | None = None, world_size: int = 1):
        self.policy, self.cfg, self.rewards = policy, cfg, list(rewards)
        self.prompt_ids, self.decode = prompt_ids, decode
        self.pad_id, self.stop_ids = pad_id, tuple(stop_ids)
        self.world_size = world_size
        if cfg.dynamic_sampling and world_size > 1:
            # each rank would refill a different number of times and keep a different number of
            # groups: FSDP's collectives and the loss normalisers need the same on every rank
            raise ValueError("dynamic_sampling is not supported under torchrun (world size > 1) yet")
        self.optimizer = optimizer or torch.optim.AdamW(policy.parameters(), lr=cfg.lr, fused=True,
                                                        weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
        self.ref = self._frozen_copy(make_reference) if cfg.beta > 0 else None
        self.generator = torch.Generator(device=policy.embed.weight.device).manual_seed(seed)
        self.step_count = 0

    def _frozen_copy(self, make_reference=None) -> Transformer:
        if make_reference is None:
            ref = copy.deepcopy(self.policy)
        else:
            ref = make_reference()
            ref.load_state_dict(self.policy.state_dict())
        ref.eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        return ref

    # -- rollout ---------------------------------------------------------------------------------
    def rollout(self, problems: Sequence) -> Rollout:
        cfg, G = self.cfg, self.cfg.group_size
        expanded = [p for p in problems for _ in range(G)]
        prompts = [self.prompt_ids(p) for p in expanded]
        with parallel.rollout_mode(self.policy) as sync_stop:
            gen = generate(self.policy, prompts, cfg.max_new_tokens, pad_id=self.pad_id, stop_ids=self.stop_ids,
                           temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                           generator=self.generator, sync_stop=sync_stop)
        texts = []
        for row, n, stopped in zip(gen.tokens.tolist(), gen.lengths.tolist(), gen.stopped.tolist()):
            ids = row[:n - 1] if stopped else row[:n]   # the stop token is not part of the text
            texts.append(self.decode(ids))
        total, components = compute_rewards(texts, expanded, self.rewards)
        rewards = torch.tensor(total, dtype=torch.float32)
        lengths = gen.lengths
        if cfg.overlong_cache > 0:
            pen = [overlong_penalty(int(n), cfg.max_new_tokens, cfg.overlong_cache) for n in lengths.tolist()]
            components["overlong"] = pen
            rewards = rewards + cfg.overlong_weight * torch.tensor(pen)
        mask = gen.mask.clone()
        if cfg.mask_truncated:
            mask[~gen.stopped] = False
        return Rollout(expanded, gen.prompt_tokens, gen.prompt_mask, gen.tokens, mask, gen.stopped,
                       gen.logprobs, lengths, texts, rewards, components)

    def collect(self, problems: Sequence, refill: Callable[[int], Sequence] | None = None) -> tuple[Rollout, dict]:
        """Roll out; with dynamic sampling keep only groups with reward variance, refilling up to max_refills."""
        cfg, G = self.cfg, self.cfg.group_size
        r = self.rollout(problems)
        info = {"zero_var_frac": self._zero_var(r).float().mean().item(), "refills": 0}
        if not cfg.dynamic_sampling:
            return r, info
        kept = [r]
        n_kept = int((~self._zero_var(r)).sum())
        while n_kept < len(problems) and refill is not None and info["refills"] < cfg.max_refills:
            more = self.rollout(refill(len(problems) - n_kept))
            info["refills"] += 1
            kept.append(more)
            n_kept += int((~self._zero_var(more)).sum())
        merged = merge_rollouts(kept, self.pad_id)
        good = (~self._zero_var(merged)).nonzero().flatten().tolist()[:len(problems)]
        if not good:  # nothing informative: keep the original batch, whose advantages are all zero
            return r, info
        return select_groups(merged, good, G), info

    def _zero_var(self, r: Rollout) -> torch.Tensor:
        g = r.rewards.view(-1, self.cfg.group_size)
        return (g.max(dim=1).values - g.min(dim=1).values) < 1e-8

    # -- update ----------------------------------------------------------------------------------
    def update(self, r: Rollout, adv: torch.Tensor) -> dict:
        cfg, policy = self.cfg, self.policy
        N = adv.shape[0]
        adv = adv.to(r.tokens.device)  # rewards are computed on the CPU
        policy.train()
        with torch.no_grad():
            def logprobs(model):  # in micro-batches too: (micro, N, V) logits at a time, not (rollout, N, V)
                parts = torch.arange(N, device=r.tokens.device).split(cfg.micro_batch_size or N)
                return torch.cat([completion_logprobs(model, r.prompt_tokens[i], r.prompt_mask[i], r.tokens[i],
                                                      r.mask[i], cfg.temperature) for i in parts])
            ref_logp = logprobs(self.ref) if self.ref is not None else None
            # pi_old: the policy as it sampled. With one update per rollout the current log-probs
            # (detached) are exactly that; otherwise recompute them once before the first update.
            on_policy = cfg.mu == 1 and cfg.n_minibatches == 1
            old_logp = None if on_policy else logprobs(policy)
        sums = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "entropy": 0.0, "grad_norm": 0.0}
        n_updates = 0
        gen = torch.Generator().manual_seed(self.step_count)
        for _ in range(cfg.mu):
            order = torch.randperm(N, generator=gen) if cfg.n_minibatches > 1 else torch.arange(N)
            for mb in order.chunk(cfg.n_minibatches):
                self.optimizer.zero_grad(set_to_none=True)
                # the whole minibatch's tokens over all ranks; x W undoes FSDP's gradient average
                n_tokens = max(int(parallel.all_reduce_sum(r.mask[mb].sum())), 1) / self.world_size
                micro = cfg.micro_batch_size or len(mb)
                for idx in mb.split(micro):
                    logp, ent = completion_logprobs(policy, r.prompt_tokens[idx], r.prompt_mask[idx],
                                                    r.tokens[idx], r.mask[idx], cfg.temperature, with_entropy=True)
                    old = logp.detach() if old_logp is None else old_logp[idx]
                    loss, st = grpo_loss(logp, old, adv[idx], r.mask[idx],
                                         ref_logp=None if ref_logp is None else ref_logp[idx], beta=cfg.beta,
                                         eps_low=cfg.eps_low, eps_high=cfg.eps_high, loss_agg=cfg.loss_agg,
                                         n_seqs=len(mb), n_tokens=n_tokens, max_len=cfg.max_new_tokens)
                    loss.backward()
                    share = len(idx) / len(mb)
                    m = r.mask[idx].float()
                    sums["loss"] += loss.item()
                    sums["kl"] += st.kl * share
                    sums["clip_frac"] += st.clip_frac * share
                    sums["entropy"] += float((ent * m).sum() / m.sum().clamp(min=1)) * share
                sums["grad_norm"] += parallel.clip_grad_norm_(policy, cfg.max_grad_norm)
                self.optimizer.step()
                policy.update_router_biases()
                n_updates += 1
        return {k: v / n_updates for k, v in sums.items()}

    def step(self, problems: Sequence, refill: Callable[[int], Sequence] | None = None) -> dict:
        """One GRPO step on a batch of questions. Returns the step's metrics."""
        cfg = self.cfg
        t0 = time.perf_counter()
        r, info = self.collect(problems, refill)
        t1 = time.perf_counter()
        if cfg.adv_scale == "batch" and self.world_size > 1:  # the std of the whole batch, all ranks
            everyone = torch.tensor(parallel.all_gather_list(r.rewards.tolist()))
            std = everyone.std() if len(everyone) > 1 else everyone.new_zeros(())
            centred = advantages(r.rewards, cfg.group_size, "none")
            adv = centred / (std + cfg.adv_eps) if std > 0 else torch.zeros_like(centred)
        else:
            adv = advantages(r.rewards, cfg.group_size, cfg.adv_scale, cfg.adv_eps)
        upd = self.update(r, adv)
        t2 = time.perf_counter()
        self.step_count += 1
        if self.ref is not None and cfg.ref_reset_every and self.step_count % cfg.ref_reset_every == 0:
            self.ref.load_state_dict(self.policy.state_dict())
        # metrics of the whole batch: every rank's sequences (the identity in one process)
        rewards = torch.tensor(parallel.all_gather_list(r.rewards.tolist()))
        lengths = torch.tensor(parallel.all_gather_list(r.lengths.tolist()), dtype=torch.float32)
        truncated = sum(parallel.all_gather_list((~r.stopped).tolist()))
        components = {k: parallel.all_gather_list(v) for k, v in r.components.items()}
        means = parallel.all_reduce_sum(torch.tensor([upd[k] for k in upd] + [info["zero_var_frac"]],
                                                     dtype=torch.float64)) / self.world_size
        upd = {k: float(v) for k, v in zip(upd, means)} | {"grad_norm": upd["grad_norm"]}
        metrics = {
            "step": self.step_count,
            "reward": rewards.mean().item(), "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
            **{f"reward/{k}": sum(v) / len(v) for k, v in components.items()},
            "len_mean": lengths.mean().item(), "len_max": lengths.max().item(),
            "truncated_frac": truncated / len(lengths),
            **{k: v for k, v in upd.items()},
            "zero_var_frac": float(means[-1]), "refills": info["refills"],
            "rollout_s": t1 - t0, "update_s": t2 - t1,
            "rollout_tokens": int(lengths.sum()), "update_tokens": int(lengths.sum()) * cfg.mu,
        }
        for name in ("accuracy", "format", "language"):
            if name in components:
                metrics[name] = sum(components[name]) / len(components[name])
        return metrics
