"""The DeepSeek-V3 transformer (the architecture of DeepSeek-V3 and DeepSeek-R1), for training and sampling.

Implements, with equation numbers of the DeepSeek-V3 technical report (arXiv 2412.19437):
- Multi-head Latent Attention, eqs. 1-11: low-rank query (wq_a, q_norm, wq_b) and key-value latent
  (wkv_a, kv_norm, wkv_b), decoupled RoPE with one k_pe shared by all heads, YaRN frequencies and
  the mscale^2 softmax temperature. Two paths that compute the same function: "naive" materialises
  K and V, "absorbed" folds wkv_b into the query and the output so that every head attends to one
  shared latent key and the cache holds only the normalised latent and the rotated k_pe
  (kv_lora_rank + qk_rope_head_dim per token). Training takes whichever costs fewer FLOPs
  (`absorbed_training_pays`): naive for `full`, absorbed for `tiny`, whose latent is as wide as a
  head. On CPU in fp32 attention runs as `BlockedAttention` (blocks of queries against only the keys
  they can see, probabilities kept for the backward); on GPUs, in half precision and beyond a size
  limit, in SDPA's fused kernels.
- DeepSeekMoE, eqs. 12-16: shared + routed SwiGLU experts, sigmoid (V3) or softmax (V2) affinities,
  group-limited top-k, auxiliary-loss-free balancing by a per-expert bias that changes the choice of
  experts but not their weights (eqs. 16, 17 and the bias update rule), the complementary
  sequence-wise balance loss (eqs. 17-20). The routed experts' weights are stacked (N_r, ., .)
  tensors, run densely for a few tokens and grouped by expert for many.
- Multi-Token Prediction, eqs. 21-25: D sequential modules sharing the embedding and the head.
- The loss: next-token (and MTP) cross-entropy; when the caller keeps no logits, on CPU, the head and
  the loss run a chunk of rows at a time with their gradients made in the forward
  (`LinearCrossEntropy`), so the (tokens, vocabulary) logits never exist whole.
- Sampling with the latent cache: each distinct prompt prefilled once; for small models the decode
  step runs on weights multiplied out once per `generate` call (`Transformer.fold`: W^UK into the
  query, W^UV into the output, norm weights into the next matrix, router + all experts as one
  product in and one out), the same function with about half the matrix products.
Deliberate choices: the router bias is a config switch rather than keyed on `dim`; YaRN is applied
whenever rope_factor > 1 (the official code silently skips it for max_seq_len <= 4096); the sampler
returns log-probs of the temperature-scaled policy before top-k/top-p truncation, which is the
distribution GRPO's importance ratio refers to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn.functional as F
from torch import nn


# -------------------------------------------------------------------------------------------------
# Configuration

@dataclass
class ModelConfig:
    """Every hyperparameter of the architecture. Names follow the official `ModelArgs`."""

    vocab_size: int = 129280           # tokens in the vocabulary
    dim: int = 7168                    # model width D
    inter_dim: int = 18432             # hidden width of the dense SwiGLU FFN of the leading layers
    moe_inter_dim: int = 2048          # hidden width of one routed or shared expert
    n_layers: int = 61                 # transformer blocks (without MTP)
    n_dense_layers: int = 3            # leading blocks with a dense FFN instead of MoE
    n_heads: int = 128                 # attention heads n_h
    # DeepSeekMoE
    n_routed_experts: int = 256        # N_r
    n_shared_experts: int = 1          # N_s, fused into one SwiGLU of width N_s * moe_inter_dim
    n_activated_experts: int = 8       # K_r, routed experts per token
    n_expert_groups: int = 8           # groups for group-limited routing (1 = no limit)
    n_limited_groups: int = 4          # groups a token may route to (topk_group)
    score_func: str = "sigmoid"        # "sigmoid" (V3) or "softmax" (V2)
    route_scale: float = 2.5           # routed_scaling_factor applied to routed expert weights
    use_router_bias: bool = True       # aux-loss-free balancing bias b_i (V3); V2 has none
    bias_update_speed: float = 0.001   # gamma of the bias update
    balance_loss_alpha: float = 0.0001  # alpha of the sequence-wise balance loss (0 disables)
    # Multi-head Latent Attention
    q_lora_rank: int = 1536            # d_c' of the query latent; 0 = one direct wq (V2-Lite)
    kv_lora_rank: int = 512            # d_c of the key-value latent
    qk_nope_head_dim: int = 128        # d_h, per-head query/key part without position
    qk_rope_head_dim: int = 64         # d_h^R, decoupled RoPE part (one k_pe shared by all heads)
    v_head_dim: int = 128              # per-head value width
    # RoPE and YaRN
    max_seq_len: int = 163840          # longest sequence the rope tables cover
    original_seq_len: int = 4096       # pretraining context that YaRN extends
    rope_theta: float = 10000.0
    rope_factor: float = 40.0          # YaRN scale s; 1 = plain RoPE
    beta_fast: int = 32
    beta_slow: int = 1
    mscale: float = 1.0                # YaRN attention temperature coefficient
    # Multi-Token Prediction
    mtp_depth: int = 1                 # D, number of MTP modules (0 = none)
    mtp_lambda: float = 0.3            # lambda, weight of the MTP loss
    # misc
    norm_eps: float = 1e-6
    init_std: float = 0.006            # std of the normal initialisation (V3 paper)

    def __post_init__(self):
        positive = ["vocab_size", "dim", "inter_dim", "moe_inter_dim", "n_layers", "n_heads",
                    "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                    "max_seq_len", "original_seq_len", "n_expert_groups", "n_limited_groups"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        non_negative = ["n_dense_layers", "n_routed_experts", "n_shared_experts",
                        "n_activated_experts", "q_lora_rank", "mtp_depth"]
        for name in non_negative:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"ModelConfig.{name} must be a non-negative int, got {value!r}")
        for name in ["rope_theta", "rope_factor", "route_scale", "norm_eps", "init_std", "mscale"]:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive finite number, got {value!r}")
        for name in ["bias_update_speed", "balance_loss_alpha", "mtp_lambda"]:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"ModelConfig.{name} must be a non-negative number, got {value!r}")
        if self.n_dense_layers > self.n_layers:
            raise ValueError(f"ModelConfig.n_dense_layers ({self.n_dense_layers}) exceeds "
                             f"n_layers ({self.n_layers})")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"ModelConfig.qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        if self.score_func not in ("sigmoid", "softmax"):
            raise ValueError(f"ModelConfig.score_func must be 'sigmoid' or 'softmax', "
                             f"got {self.score_func!r}")
        if self.beta_fast <= self.beta_slow or self.beta_slow <= 0:
            raise ValueError(f"ModelConfig.beta_fast must exceed beta_slow > 0, "
                             f"got {self.beta_fast} and {self.beta_slow}")
        if self.has_moe:
            if self.n_routed_experts == 0:
                raise ValueError("ModelConfig.n_routed_experts must be positive when there are "
                                 "MoE layers (n_dense_layers < n_layers or mtp_depth > 0)")
            if not 0 < self.n_activated_experts <= self.n_routed_experts:
                raise ValueError(f"ModelConfig.n_activated_experts must be in [1, n_routed_experts="
                                 f"{self.n_routed_experts}], got {self.n_activated_experts}")
            if self.n_routed_experts % self.n_expert_groups:
                raise ValueError(f"ModelConfig.n_expert_groups ({self.n_expert_groups}) must divide "
                                 f"n_routed_experts ({self.n_routed_experts})")
            if self.n_limited_groups > self.n_expert_groups:
                raise ValueError(f"ModelConfig.n_limited_groups ({self.n_limited_groups}) exceeds "
                                 f"n_expert_groups ({self.n_expert_groups})")
            per_group = self.n_routed_experts // self.n_expert_groups
            if self.n_activated_experts > self.n_limited_groups * per_group:
                raise ValueError(f"ModelConfig.n_activated_experts ({self.n_activated_experts}) exceeds "
                                 f"the {self.n_limited_groups * per_group} experts of the kept groups")
            if self.score_func == "sigmoid" and self.n_expert_groups > 1 and per_group < 2:
                raise ValueError("ModelConfig.n_expert_groups: sigmoid routing scores a group by its "
                                 "top-2 experts, so each group needs at least 2 experts")

    @property
    def has_moe(self) -> bool:
        return self.n_dense_layers < self.n_layers or self.mtp_depth > 0

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_h + d_h^R), times mscale^2 under YaRN (the whole YaRN temperature lives here)."""
        scale = self.qk_head_dim ** -0.5
        if self.rope_factor > 1:
            m = 0.1 * self.mscale * math.log(self.rope_factor) + 1.0
            scale = scale * m * m
        return scale


PRESETS: dict[str, dict] = {
    # DeepSeek-V3 / R1, 671B total, 37B active.
    "full": dict(),
    # DeepSeek-V2, 236B: softmax routing, no router bias, 2 shared experts.
    "236B": dict(vocab_size=102400, dim=5120, inter_dim=12288, moe_inter_dim=1536, n_layers=60,
                 n_dense_layers=1, n_routed_experts=160, n_shared_experts=2, n_activated_experts=6,
                 n_expert_groups=8, n_limited_groups=3, score_func="softmax", route_scale=16.0,
                 use_router_bias=False, balance_loss_alpha=0.0, mtp_depth=0),
    # DeepSeek-V2-Lite, 16B: as V2 with a direct wq (no q_lora) and no expert groups.
    "16B": dict(vocab_size=102400, dim=2048, inter_dim=10944, moe_inter_dim=1408, n_layers=27,
                n_dense_layers=1, n_heads=16, n_routed_experts=64, n_shared_experts=2,
                n_activated_experts=6, n_expert_groups=1, n_limited_groups=1, score_func="softmax",
                route_scale=1.0, use_router_bias=False, balance_loss_alpha=0.0, q_lora_rank=0,
                mscale=0.707, mtp_depth=0),
    # About 1.6M parameters (2M with MTP): trains on a 2-core CPU in minutes and keeps every V3 feature
    # (MLA with q_lora, sigmoid group-limited routing with bias, shared expert, MTP, YaRN).
    "tiny": dict(vocab_size=1024, dim=128, inter_dim=384, moe_inter_dim=96, n_layers=4,
                 n_dense_layers=1, n_heads=4, n_routed_experts=8, n_shared_experts=1,
                 n_activated_experts=2, n_expert_groups=2, n_limited_groups=1, route_scale=1.0,
                 balance_loss_alpha=0.0001, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32,
                 qk_rope_head_dim=16, v_head_dim=32, max_seq_len=1024, original_seq_len=256,
                 rope_factor=4.0, mtp_depth=1, init_std=0.02),
    # For unit tests: every feature, a few thousand parameters.
    "micro": dict(vocab_size=64, dim=32, inter_dim=64, moe_inter_dim=16, n_layers=2,
                  n_dense_layers=1, n_heads=2, n_routed_experts=8, n_shared_experts=1,
                  n_activated_experts=2, n_expert_groups=4, n_limited_groups=2, route_scale=2.5,
                  balance_loss_alpha=0.001, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                  qk_rope_head_dim=8, v_head_dim=8, max_seq_len=128, original_seq_len=32,
                  rope_factor=4.0, mtp_depth=1, init_std=0.02),
}


def get_config(name: str, **overrides) -> ModelConfig:
    """A named preset with optional field overrides; unknown names or fields raise ValueError."""
    if name not in PRESETS:
        raise ValueError(f"unknown model size {name!r}; choose one of {sorted(PRESETS)}")
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown ModelConfig field(s): {unknown}")
    return ModelConfig(**{**PRESETS[name], **overrides})


def dense_config(cfg: ModelConfig, **overrides) -> ModelConfig:
    """The same architecture with every FFN dense and no MTP: a distillation student."""
    n_layers = overrides.get("n_layers", cfg.n_layers)
    return replace(cfg, **{"n_dense_layers": n_layers, "mtp_depth": 0, **overrides})


# -------------------------------------------------------------------------------------------------
# Small pieces: norm, rotary embedding with YaRN, SwiGLU

class Linear(nn.Linear):
    """nn.Linear without bias by default and without its own init: `Transformer.init_weights` owns
    initialisation, which also keeps meta-device construction of the 671B model fast."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, out_features, bias=bias)

    def reset_parameters(self):
        pass


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).type_as(x)


def yarn_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """RoPE frequencies f_i = theta^(-2i/d), with YaRN's ramp between interpolation and extrapolation.

    Dimensions that rotate fewer than beta_slow times over original_seq_len are interpolated (f/s),
    those rotating more than beta_fast times keep f, and a linear ramp joins the two.
    """
    d = cfg.qk_rope_head_dim
    freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    if cfg.rope_factor > 1:
        def correction_dim(rotations):
            return d * math.log(cfg.original_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))
        low = max(math.floor(correction_dim(cfg.beta_fast)), 0)
        high = min(math.ceil(correction_dim(cfg.beta_slow)), d - 1)
        if low == high:
            high += 0.001  # avoid a zero-width ramp
        ramp = ((torch.arange(d // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        freqs = freqs / cfg.rope_factor * ramp + freqs * (1 - ramp)
    return freqs


def rope_tables(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of pos * f_i for every position: two (max_seq_len, d/2) float32 tensors."""
    freqs = yarn_frequencies(cfg)
    angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float64), freqs)
    return angles.cos().float().to(device), angles.sin().float().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) by pos * f_i, the official convention: the pair is
    the complex number x[2i] + i x[2i+1], multiplied by e^(i pos f_i) = cos + i sin.

    x: (B, T, H, d); cos, sin: (B, T, d/2).
    """
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())  # (B, T, H, d/2)
    out = torch.view_as_real(pairs * torch.complex(cos.float(), sin.float()).unsqueeze(2))  # (B, T, H, d/2, 2)
    return out.flatten(-2).type_as(x)


def rope_swap(w: torch.Tensor) -> torch.Tensor:
    """The rows of w (..., d_R, in), which make interleaved pairs (a, b), reordered and negated to make
    (-b, a) instead. A folded decode step multiplies them out with the others and then rotates each pair
    by angle t as x cos t + swap(x) sin t: the complex product (a + ib) e^(it) in two elementwise
    products, with no complex views (each view is an operator call, and a decode step is mostly calls)."""
    pairs = w.unflatten(-2, (-1, 2))                                             # (..., d_R/2, 2, in)
    return torch.stack([-pairs[..., 1, :], pairs[..., 0, :]], dim=-2).flatten(-3, -2)


def unit_rms(x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """RMSNorm without its weight, x / sqrt(mean(x^2) + eps): the folded decode step multiplies the
    weight into the next matrix instead. eps is a 0-dim fp32 tensor and mean(x^2) + eps one addcmul of
    ||x||: four operator calls where mean and Python scalars (each converted on every call) take eight."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)  # (..., 1)
    scale = torch.addcmul(eps, norm, norm, value=1 / x.shape[-1]).rsqrt_()
    return x * (scale if x.dtype == torch.float32 else scale.to(x.dtype))


def in_out(rows: list[torch.Tensor], norm: torch.Tensor) -> torch.Tensor:
    """Matrices (out_i, in) stacked along out, each input column scaled by norm (the weight of the
    RMSNorm before them), as one contiguous (in, sum out_i) matrix W: x @ W = [W_1; W_2; ...] (norm * x)."""
    return torch.cat([r.t() for r in rows], dim=1).mul_(norm.unsqueeze(1))


# Query positions per block of `BlockedAttention`, and the largest score rectangle B H T S it takes per layer
# (it keeps about half of it for the backward, and every layer keeps its own); beyond that, or off
# the CPU, or in half precision, attention runs in SDPA's fused kernels.
ATTENTION_BLOCK = 64
BLOCKED_ATTENTION_MAX_PROBS = 2 ** 27


def causal_bias(T: int, S: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Additive (T, S) causal mask for T queries after S - T earlier keys: query t, at position
    S - T + t, sees keys 0..S - T + t (0) and not the later ones (-inf)."""
    return torch.full((T, S), float("-inf"), dtype=dtype, device=device).triu_(S - T + 1)


def blocked_attention_pays(q: torch.Tensor, n_keys: int) -> bool:
    """Whether `BlockedAttention` runs for queries q (B, H, T, d), or (B, T, H, d), against n_keys keys."""
    return (q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64)
            and q.shape[0] * q.shape[1] * q.shape[2] * n_keys <= BLOCKED_ATTENTION_MAX_PROBS)


def folding_pays(cfg: ModelConfig) -> bool:
    """Whether the absorbed attention's folded query and output matrices (`MLA.absorbed_weights`,
    with the swap(W^KR) rows of a decode step) hold no more values than the ones they replace (wq_b
    or wq, wkv_b, wo), and so cost no more FLOPs per token: for small models like `tiny`, where
    d_c is as wide as a head; not for `full`, whose folded query matrix would be 3.3x wq_b."""
    q_in = cfg.q_lora_rank or cfg.dim
    H, d_c, d_R = cfg.n_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    folded = H * (d_c + 2 * d_R) * q_in + cfg.dim * H * d_c + d_R * cfg.dim
    plain = (H * cfg.qk_head_dim * q_in + cfg.dim * H * cfg.v_head_dim
             + H * (cfg.qk_nope_head_dim + cfg.v_head_dim) * d_c)
    return folded <= plain


def absorbed_training_pays(cfg: ModelConfig) -> bool:
    """Whether the absorbed attention, with folded weights, trains with no more FLOPs than the naive
    one: per token (`folding_pays`) and per (query, key) pair, d_c + d_R for the score and d_c for the
    value against d_h + d_R and d_v. So for `tiny` (d_c = d_h = d_v) but not for `full` (d_c = 4 d_h)."""
    return folding_pays(cfg) and 2 * cfg.kv_lora_rank <= cfg.qk_nope_head_dim + cfg.v_head_dim


class BlockedAttention(torch.autograd.Function):
    """Causal softmax(scale q k^T + mask) v with materialised probabilities, one block of query
    positions at a time: the queries at positions [s, e) are scored only against the keys they can
    see, [0, S - T + e), so most of the masked upper triangle is never computed (nearly half the
    scores when S = T), and the backward reuses the saved probabilities. On one CPU core this is
    faster than SDPA's flash kernel at training shapes, whose backward recomputes the probabilities
    (the README's model benchmark); it needs no padding of v.

    q (B, H_k, T, G, d): G query heads share each of the H_k key heads. Multi-head attention is
    G = 1; the absorbed MLA is H_k = 1, G = n_heads: every head scores the one latent key [c; k^R],
    so the heads of a block of positions go through one product with the keys (G times the rows).
    k (B, H_k, S, d), v (B, H_k, S, d_v); query t sits at position S - T + t.
    mask: None or additive float (B, 1, T, S), added on top of causality (padding); a query that it
    leaves no key gets a zero output, as in SDPA. Returns (B, H_k, T, G, d_v). Not twice differentiable.
    `blocked_attention` runs the forward alone, keeping nothing, where no backward can follow.
    """

    @staticmethod
    def forward(ctx, q, k, v, mask, scale: float, block: int):
        o, saved = BlockedAttention.attend(q, k, v, mask, scale, block, keep=True)
        ctx.save_for_backward(*saved)
        ctx.scale, ctx.block = scale, block
        return o

    @staticmethod
    def attend(q, k, v, mask, scale: float, block: int, keep: bool):
        """The forward: the output, and with keep what the backward needs (q, k, v and the output
        flattened over heads, then each block's probabilities), else None."""
        B, H_k, T, G = q.shape[:4]
        S = k.shape[2]
        if mask is not None and not mask.is_floating_point():
            raise TypeError(f"BlockedAttention takes an additive float mask, got {mask.dtype}")
        q = q.reshape(B * H_k, T * G, -1)                       # row t G + g: head g at position t
        k, v = k.reshape(B * H_k, S, -1), v.reshape(B * H_k, S, -1)
        causal = causal_bias(T, S, q.dtype, q.device)
        probs, outs = [], []
        for s in range(0, T, block):
            e = min(s + block, T)
            keys, rows = S - T + e, slice(s * G, e * G)
            bias = causal[s:e, :keys]
            if G > 1:  # a block's rows at a time: (T G, S) at once would outgrow the kept probabilities
                bias = bias.repeat_interleave(G, dim=0)                            # ((e - s) G, keys)
            p = torch.baddbmm(bias, q[:, rows], k[:, :keys].transpose(1, 2), alpha=scale)
            if mask is not None:
                p.view(B, H_k, e - s, G, keys).add_(mask[:, :, s:e, None, :keys])
            p = p.softmax(dim=-1)                                                  # (B H_k, (e - s) G, keys)
            if mask is not None:
                p.nan_to_num_(0.0)  # a query with every key masked: 0/0 in softmax, a zero row in SDPA
            outs.append(torch.bmm(p, v[:, :keys]))                                 # (B H_k, (e - s) G, d_v)
            if keep:
                probs.append(p)
        o = torch.cat(outs, dim=1)                                                 # (B H_k, T G, d_v)
        return o.view(B, H_k, T, G, -1), ((q, k, v, o, *probs) if keep else None)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, o, *probs = ctx.saved_tensors
        B, H_k, T, G = do.shape[:4]
        S = k.shape[1]
        do = do.reshape(B * H_k, T * G, -1)
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        delta = (do * o).sum(dim=-1, keepdim=True)                                  # rowsum(dO * O) = rowsum(P * dP)
        dq = []
        for p, s in zip(probs, range(0, T, ctx.block)):
            e = min(s + ctx.block, T)
            keys, rows = S - T + e, slice(s * G, e * G)
            dv[:, :keys] += torch.bmm(p.transpose(1, 2), do[:, rows])
            ds = torch.bmm(do[:, rows], v[:, :keys].transpose(1, 2)).sub_(delta[:, rows]).mul_(p)  # softmax backward
            dq.append(torch.bmm(ds, k[:, :keys]))
            dk[:, :keys] += torch.bmm(ds.transpose(1, 2), q[:, rows])
        dq = torch.cat(dq, dim=1).mul_(ctx.scale)
        return (dq.view(B, H_k, T, G, -1), dk.mul_(ctx.scale).view(B, H_k, S, -1), dv.view(B, H_k, S, -1),
                None, None, None)


def blocked_attention(q, k, v, mask, scale: float, block: int) -> torch.Tensor:
    """`BlockedAttention` where a backward may follow; otherwise (no_grad, inference_mode, inputs
    without gradients, as in a prefill) the same forward without keeping the probabilities."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return BlockedAttention.apply(q, k, v, mask, scale, block)
    return BlockedAttention.attend(q, k, v, mask, scale, block, keep=False)[0]


class MLP(nn.Module):
    """SwiGLU feed-forward w2(silu(w1 x) * w3 x): the dense FFN or the shared experts (the routed
    experts are the same function with stacked weights, `Experts`)."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = Linear(dim, inter_dim)
        self.w2 = Linear(inter_dim, dim)
        self.w3 = Linear(dim, inter_dim)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def fold(self, norm: torch.Tensor) -> dict[str, torch.Tensor]:
        """[w1; w3] with the preceding RMSNorm's weight, and w2^T: one product in, one out."""
        return {"w_ffn_in": in_out([self.w1.weight, self.w3.weight], norm), "w_ffn_out": self.w2.weight.t()}

    def decode(self, x, fold: Folded):
        h1, h3 = torch.mm(x, fold.w_ffn_in).chunk(2, dim=-1)
        return torch.mm(F.silu(h1) * h3, fold.w_ffn_out)


# -------------------------------------------------------------------------------------------------
# Multi-head Latent Attention

class KVCache:
    """The MLA cache of one layer: normalised latent c^KV and rotated shared key k^R per token, side by
    side in one buffer, so that a folded decode step scores a query against both in one product.

    A plain class, not a dataclass: FSDP2 rebuilds dataclass arguments around tensors that need
    gradients, and the cache must stay the caller's object, written in place.
    """
    __slots__ = ("kv_lora_rank", "latent")

    def __init__(self, latent: torch.Tensor, kv_lora_rank: int):
        self.latent = latent                                    # (B, S_max, kv_lora_rank + qk_rope_head_dim)
        self.kv_lora_rank = kv_lora_rank

    # Views made on each use rather than kept: with kv and pe kept from construction, a prefill with
    # gradients failed on its second write (the first gives the buffer autograd history, and autograd
    # then refuses in-place writes through the older view).
    @property
    def kv(self) -> torch.Tensor:
        return self.latent[..., :self.kv_lora_rank]             # (B, S_max, kv_lora_rank)

    @property
    def pe(self) -> torch.Tensor:
        return self.latent[..., self.kv_lora_rank:]             # (B, S_max, qk_rope_head_dim)


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.qk_nope_head_dim = cfg.qk_nope_head_dim
        self.qk_rope_head_dim = cfg.qk_rope_head_dim
        self.qk_head_dim = cfg.qk_head_dim
        self.v_head_dim = cfg.v_head_dim
        self.softmax_scale = cfg.softmax_scale
        self.norm_eps = cfg.norm_eps
        H = cfg.n_heads
        if cfg.q_lora_rank == 0:
            self.wq = Linear(cfg.dim, H * cfg.qk_head_dim)
        else:
            self.wq_a = Linear(cfg.dim, cfg.q_lora_rank)       # W^DQ, eq. 6
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.wq_b = Linear(cfg.q_lora_rank, H * cfg.qk_head_dim)  # W^UQ and W^QR
        self.wkv_a = Linear(cfg.dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim)  # W^DKV, W^KR
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, cfg.norm_eps)
        self.wkv_b = Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim))  # W^UK, W^UV
        self.wo = Linear(H * cfg.v_head_dim, cfg.dim)  # W^O, eq. 11
        self.fold_weights = folding_pays(cfg)
        self.absorbed_trains = absorbed_training_pays(cfg)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None, start_pos: int = 0,
                attn_impl: str | None = None):
        """x: (B, T, D); cos/sin: (B, T, d_R/2); mask: (B, 1, T, S) additive (0 where a query may
        attend, -inf elsewhere) or None for plain causal, query t at position S - T + t of the S keys.
        attn_impl: "naive", "absorbed", or None for the one that trains with fewer FLOPs
        (`absorbed_training_pays`)."""
        B, T, _ = x.shape
        H, d_c, d_R = self.n_heads, self.kv_lora_rank, self.qk_rope_head_dim
        if attn_impl is None:
            attn_impl = "absorbed" if self.absorbed_trains else "naive"
        if attn_impl not in ("naive", "absorbed"):
            raise ValueError(f"attn_impl must be 'naive' or 'absorbed', got {attn_impl!r}")
        q_in = x if self.q_lora_rank == 0 else self.q_norm(self.wq_a(x))    # c^Q, eq. 6 (or x)
        kv, k_pe = self.wkv_a(x).split([d_c, d_R], dim=-1)
        kv = self.kv_norm(kv)                                               # c^KV, eq. 1
        k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin).squeeze(2)           # k^R, eq. 3: (B, T, d_R)
        if cache is not None:
            end = start_pos + T
            cache.kv[:B, start_pos:end] = kv
            cache.pe[:B, start_pos:end] = k_pe
            # (B, S, d_c), (B, S, d_R); in the compute dtype, should the cache be kept in another
            # (FSDP2 mixed precision computes in bf16 while a model's stored dtype is fp32)
            kv, k_pe = cache.kv[:B, :end].to(kv.dtype), cache.pe[:B, :end].to(k_pe.dtype)
        S = kv.shape[1]
        if mask is None and 1 < T < S:  # causal at an offset (query t at position S - T + t) on every path
            mask = causal_bias(T, S, x.dtype, x.device)[None, None]                 # (1, 1, T, S)
        is_causal = mask is None and S == T  # SDPA's is_causal aligns query 0 with key 0
        wq = self.wq if self.q_lora_rank == 0 else self.wq_b
        if attn_impl == "naive":
            q_nope, q_pe = wq(q_in).view(B, T, H, -1).split([self.qk_nope_head_dim, d_R], dim=-1)
            q_pe = apply_rope(q_pe, cos, sin)                                 # q^R, eq. 8
            kv = self.wkv_b(kv).view(B, S, H, self.qk_nope_head_dim + self.v_head_dim)
            k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
            k = torch.cat([k_nope.transpose(1, 2), k_pe.unsqueeze(1).expand(-1, H, -1, -1)], dim=-1)  # (B, H, S, 192)
            q = torch.cat([q_nope.transpose(1, 2), q_pe.transpose(1, 2)], dim=-1)                   # (B, H, T, 192)
            v = v.transpose(1, 2)                                                                   # (B, H, S, d_v)
            if blocked_attention_pays(q, S):
                o = blocked_attention(q.unsqueeze(3), k, v.contiguous(), mask, self.softmax_scale,
                                      ATTENTION_BLOCK).squeeze(3)                           # (B, H, T, d_v)
            else:
                if self.v_head_dim < self.qk_head_dim:  # SDPA's fused kernels want one head dim for q, k, v
                    v = F.pad(v, (0, self.qk_head_dim - self.v_head_dim))                           # (B, H, S, 192)
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                                   scale=self.softmax_scale)[..., :self.v_head_dim]  # (B, H, T, d_v)
            return self.wo(o.transpose(1, 2).flatten(2))                                    # (B, T, D)

        # Absorbed: q_nope^T W^UK c = (W^UK^T q_nope)^T c, so every head attends in the latent space
        # to one shared key [c; k^R], and the attended latents leave through W^O W^UV.
        if self.fold_weights:  # the products multiplied into the weights: fewer FLOPs per token
            w_q, w_o = self.absorbed_weights()
            q_c, q_pe = F.linear(q_in, w_q.flatten(0, 1)).view(B, T, H, d_c + d_R).split([d_c, d_R], dim=-1)
        else:  # per token: fewer FLOPs when d_c is much wider than the heads (`full`)
            w_uk, w_uv = self.w_uk_uv()
            q_nope, q_pe = wq(q_in).view(B, T, H, -1).split([self.qk_nope_head_dim, d_R], dim=-1)
            # Batched over heads by bmm: einsum's own overhead is most of a decode step's.
            q_c = torch.bmm(q_nope.permute(2, 0, 1, 3).reshape(H, B * T, -1), w_uk)           # (H, B T, d_c)
            q_c = q_c.view(H, B, T, d_c).permute(1, 2, 0, 3)                                  # (B, T, H, d_c)
        q_pe = apply_rope(q_pe, cos, sin)                                                     # q^R, eq. 8
        if T == 1:
            # A decode step: the scores of one query against the cache in two products, scaled and
            # masked by baddbmm, without concatenating [c; k^R] (B, S, d_c + d_R) each layer.
            bias = mask.view(B, 1, S) if mask is not None else kv.new_zeros(B, 1, S)
            scores = torch.baddbmm(bias, q_c.reshape(B, H, d_c), kv.transpose(1, 2), alpha=self.softmax_scale)
            scores = torch.baddbmm(scores, q_pe.reshape(B, H, d_R), k_pe.transpose(1, 2), alpha=self.softmax_scale)
            o = torch.bmm(scores.softmax(dim=-1, dtype=torch.float32).type_as(kv), kv)    # (B, H, d_c)
            o = o.unsqueeze(1)                                                            # (B, 1, H, d_c)
        else:
            q = torch.cat([q_c, q_pe], dim=-1)                                            # (B, T, H, d_c + d_R)
            k = torch.cat([kv, k_pe], dim=-1)                                             # (B, S, d_c + d_R)
            if blocked_attention_pays(q, S):
                # One key head shared by H query heads: the values are the latents c.
                o = blocked_attention(q.unsqueeze(1), k.unsqueeze(1), kv.unsqueeze(1), mask,
                                      self.softmax_scale, ATTENTION_BLOCK).squeeze(1)       # (B, T, H, d_c)
            else:
                k = k.unsqueeze(1).expand(-1, H, -1, -1)                                  # (B, H, S, d_c + d_R)
                # The values are the latents c, the first d_c columns of k: passing k as v keeps one
                # head dim for q, k and v, which SDPA's fused kernels want; the k^R columns are dropped.
                o = F.scaled_dot_product_attention(
                    q.transpose(1, 2), k, k, attn_mask=mask, is_causal=is_causal,
                    scale=self.softmax_scale)[..., :d_c].transpose(1, 2)                  # (B, T, H, d_c)
        if self.fold_weights:
            return F.linear(o.flatten(2), w_o.flatten(1))                                 # (B, T, D)
        o = torch.bmm(o.permute(2, 0, 1, 3).reshape(H, B * T, d_c), w_uv.transpose(1, 2))  # W^UV: (H, B T, d_v)
        return self.wo(o.view(H, B, T, -1).permute(1, 2, 0, 3).flatten(2))               # (B, T, D)

    def w_uk_uv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W^UK (H, d_h, d_c) and W^UV (H, d_v, d_c): wkv_b's rows for each head, as views."""
        return self.wkv_b.weight.view(self.n_heads, -1, self.kv_lora_rank).split(
            [self.qk_nope_head_dim, self.v_head_dim], dim=1)

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W^UK multiplied into the query and W^UV into W^O (DeepSeek-V2, sec. 2.1.2), with gradients:
        w_q (H, d_c + d_R, q_in), per head [W^UK^T W^UQ; W^QR], maps c^Q (or x) to the query in the
        latent space and q^R before rotation; w_o (D, H, d_c), W^O W^UV, maps each head's attended
        latents to the output."""
        H, d_n = self.n_heads, self.qk_nope_head_dim
        w_uk, w_uv = self.w_uk_uv()
        wq = self.wq if self.q_lora_rank == 0 else self.wq_b
        q_nope, q_pe = wq.weight.view(H, self.qk_head_dim, -1).split([d_n, self.qk_rope_head_dim], dim=1)
        w_q = torch.cat([w_uk.transpose(1, 2) @ q_nope, q_pe], dim=1)                        # (H, d_c + d_R, q_in)
        w_o = torch.einsum("dhv,hvc->dhc", self.wo.weight.view(-1, H, self.v_head_dim), w_uv)  # (D, H, d_c)
        return w_q, w_o

    def fold(self, norm: torch.Tensor) -> dict[str, torch.Tensor]:
        """The absorbed products of one decode step, multiplied out once (see `Transformer.fold`).

        `absorbed_weights`, with the query's rows extended to [W^UK^T W^UQ; W^QR; swap(W^QR)] * softmax
        scale per head, which map c^Q (or x) straight to [q in the latent space; q^R before rotation;
        its pairs swapped (`rope_swap`)]. The norms' weights go into the matrix that follows them (a
        diagonal scaling of its input). Matrices are stored as (in, out), the layout in which an
        8-row product runs fastest.
        """
        d_c = self.kv_lora_rank
        w_q, w_o = self.absorbed_weights()
        w_q = torch.cat([w_q, rope_swap(w_q[:, d_c:])], dim=1)                   # (H, d_c + 2 d_R, q_in)
        w_q = w_q.flatten(0, 1) * self.softmax_scale
        w_kv = torch.cat([self.wkv_a.weight, rope_swap(self.wkv_a.weight[d_c:])])          # (d_c + 2 d_R, D)
        if self.q_lora_rank == 0:  # the folded query rows act on x directly: they lead w_in
            w_q_in, w_q = w_q, None
        else:
            w_q_in, w_q = self.wq_a.weight, (w_q * self.q_norm.weight).t()
        return {"w_in": in_out([w_q_in, w_kv], norm), "w_q": w_q,
                "kv_norm": self.kv_norm.weight, "w_o": w_o.permute(1, 2, 0).flatten(0, 1)}   # w_o (H d_c, D)

    def decode(self, x, fold: Folded, cache: KVCache, pos: int, rope: tuple[torch.Tensor, ...], bias: torch.Tensor):
        """Absorbed attention of one token per row with folded weights, writing cache position pos.

        x: (B, D) after the unit RMS norm; rope: the step's cos and sin for the queries, (B, 1, d_c + d_R)
        each, and for the key, (B, d_R) each (see `Transformer.decode_rope`); bias: (B, 1, pos + 1)
        additive mask over the cache. Returns (B, D).
        """
        B, H, d_c, d_R = x.shape[0], self.n_heads, self.kv_lora_rank, self.qk_rope_head_dim
        h = torch.mm(x, fold.w_in)
        if fold.w_q is None:
            q, kv, k_pe, k_swap = h.split([H * (d_c + 2 * d_R), d_c, d_R, d_R], dim=-1)
        else:
            c_q, kv, k_pe, k_swap = h.split([self.q_lora_rank, d_c, d_R, d_R], dim=-1)
            q = torch.mm(unit_rms(c_q, fold.eps), fold.w_q)
        cos_q, sin_q, cos_k, sin_k = rope
        q = q.view(B, H, d_c + 2 * d_R)                                             # [q^C; q^R; swap(q^R)] per head
        # [q^C; q^R cos + swap(q^R) sin]: over the first d_c columns sin is 0, so the shifted slice's
        # columns there (whatever they hold) drop out.
        q = torch.addcmul(q[..., :d_c + d_R] * cos_q, q[..., d_R:], sin_q)           # (B, H, d_c + d_R)
        k_r = torch.addcmul(k_pe * cos_k, k_swap, sin_k)                              # k^R, eq. 3
        cache.latent[:B, pos] = torch.cat([unit_rms(kv, fold.eps) * fold.kv_norm, k_r], dim=-1)  # [c^KV; k^R]
        keys = cache.latent[:B, :pos + 1]                                            # (B, S, d_c + d_R)
        if keys.dtype != x.dtype:
            keys = keys.to(x.dtype)
        scores = torch.baddbmm(bias, q, keys.transpose(1, 2))                         # (B, H, S), scaled by w_q
        p = scores.softmax(dim=-1, dtype=torch.float32)
        o = torch.bmm(p if p.dtype == keys.dtype else p.to(keys.dtype), keys[..., :d_c])  # (B, H, d_c)
        return torch.mm(o.flatten(1), fold.w_o)


# -------------------------------------------------------------------------------------------------
# DeepSeekMoE

class Gate(nn.Module):
    """Router: affinities s_i, group-limited top-k chosen on s_i + b_i, gate weights from s_i alone."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.topk = cfg.n_activated_experts
        self.n_groups = cfg.n_expert_groups
        self.topk_groups = cfg.n_limited_groups
        self.score_func = cfg.score_func
        self.route_scale = cfg.route_scale
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))  # centroids e_i
        # b_i: not trained by gradients, moved by the balancing rule; kept in fp32.
        self.register_buffer("bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32)
                             if cfg.use_router_bias else None)

    def forward(self, x: torch.Tensor):
        """x: (N, D) -> weights (N, K), indices (N, K) and affinities s (N, E), all fp32."""
        return self.route(F.linear(x.float(), self.weight.float()))

    def route(self, logits: torch.Tensor):
        """Routing from the logits u_t^T e_i (N, E): what `forward` returns."""
        logits = logits.float()
        scores = logits.sigmoid() if self.score_func == "sigmoid" else logits.softmax(dim=-1)  # s_i, eq. 15
        choice = scores if self.bias is None else scores + self.bias
        if self.n_groups > 1:
            grouped = choice.view(logits.shape[0], self.n_groups, -1)            # (N, G, E/G)
            if self.score_func == "sigmoid":  # V3: a group is worth its two best experts
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            else:                             # V2: a group is worth its best expert
                group_scores = grouped.amax(dim=-1)
            keep = group_scores.topk(self.topk_groups, dim=-1).indices           # (N, topk_groups)
            dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            choice = grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).flatten(1)
        indices = choice.topk(self.topk, dim=-1).indices
        weights = scores.gather(1, indices)                                      # g'_i from s_i, not s_i + b_i
        if self.score_func == "sigmoid":
            weights = weights / weights.sum(dim=-1, keepdim=True)                # eq. 13
        return (weights * self.route_scale if self.route_scale != 1 else weights), indices, scores


class Experts(nn.Module):
    """The N_r routed experts of one MoE layer: expert e is the SwiGLU w2[e](silu(w1[e] x) * w3[e] x).

    The official code and the checkpoints have one `Expert` of three Linears per expert (hf.py splits
    and stacks them); stacked on a leading expert dimension, the weights let a layer run its experts
    in a few batched products instead of 3 N_r small ones. Two ways to the routed sum of eq. 12,
    sum_k g_k FFN_{i_k}(x), with the same values and gradients:
    - `dense`: every expert on every token, gate weight 0 where it was not chosen: N_r / K_r times
      the useful FLOPs in eight kernels, the fastest for a few tokens (a decode step);
    - `grouped`: the (token, slot) pairs sorted by expert, three products per expert on its
      contiguous slice: only the useful FLOPs, the fastest for many tokens (training, prefill).
    """

    # `dense` while the FLOPs it spends on unchosen experts stay below this, about what `grouped`'s
    # extra per-expert kernels cost on one CPU core (measured with bench_model.py, see the README).
    dense_max_wasted_flops = 2 ** 24

    def __init__(self, n_experts: int, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))  # gate_proj of each expert
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))  # down_proj
        self.w3 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))  # up_proj

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """x: (N, D); weights, indices: (N, K) gate weights g and chosen experts. Returns (N, D)."""
        if self.runs_dense(x.shape[0], indices.shape[1]):
            return self.dense(x, weights, indices)
        return self.grouped(x, weights, indices)

    def runs_dense(self, n_tokens: int, k: int) -> bool:
        E, inter, D = self.w1.shape
        return 6 * n_tokens * (E - k) * inter * D <= self.dense_max_wasted_flops

    def dense(self, x, weights, indices):
        E, inter, D = self.w1.shape
        N = x.shape[0]
        g = x.new_zeros(N, E).scatter_(1, indices, weights.type_as(x))               # (N, E)
        h = F.silu(F.linear(x, self.w1.view(E * inter, D))) * F.linear(x, self.w3.view(E * inter, D))
        h = h.view(N, E, inter) * g.unsqueeze(2)                                     # (N, E, I)
        return torch.bmm(h.transpose(0, 1), self.w2.transpose(1, 2)).sum(0)         # (E, N, D) -> (N, D)

    def grouped(self, x, weights, indices):
        E, K = self.w1.shape[0], indices.shape[1]
        expert_ids = indices.flatten()                                               # (N*K,)
        order = expert_ids.argsort(stable=True)
        token_of = order // K
        counts = torch.bincount(expert_ids, minlength=E).tolist()
        # One gather in, one weighted scatter-add out; in between each expert sees a contiguous slice
        # (an expert without tokens passes its empty slice through uncomputed). unbind rather than
        # w1[e]: its backward stacks the E gradients once instead of summing E full-size ones.
        w1, w2, w3 = self.w1.unbind(0), self.w2.unbind(0), self.w3.unbind(0)
        chunks = x.index_select(0, token_of).split(counts)                           # (n_e, D) per expert
        out = torch.cat([F.linear(F.silu(F.linear(c, w1[e])) * F.linear(c, w3[e]), w2[e]) if len(c) else c
                         for e, c in enumerate(chunks)])                             # (N*K, D)
        out = out * weights.flatten().index_select(0, order).unsqueeze(1)
        return torch.zeros_like(x).index_add_(0, token_of, out.type_as(x))


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_routed_experts = cfg.n_routed_experts
        self.topk = cfg.n_activated_experts
        self.alpha = cfg.balance_loss_alpha
        self.gate = Gate(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim)
        self.shared_experts = MLP(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim) if cfg.n_shared_experts else None
        # Tokens routed to each expert since the last bias update (the "load" of the balancing rule).
        self.register_buffer("expert_load", torch.zeros(cfg.n_routed_experts), persistent=False)

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None):
        """x: (B, T, D); token_mask: (B, T) bool of real tokens. Returns y (B, T, D) and the balance loss."""
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        keep = None
        if token_mask is not None:  # route only real tokens: padding neither costs compute nor counts as load
            keep = token_mask.reshape(-1).nonzero().squeeze(1)
            flat = flat[keep]
        if flat.shape[0] == 0:  # every token is padding
            return x.new_zeros(B, T, D), x.new_zeros((), dtype=torch.float32)
        weights, indices, scores = self.gate(flat)
        y = self.experts(flat, weights, indices)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        aux = flat.new_zeros((), dtype=torch.float32)
        if self.training:
            self.expert_load += torch.bincount(indices.flatten(), minlength=self.n_routed_experts).to(
                self.expert_load.dtype)
            if self.alpha > 0:
                seq_id = (torch.arange(B * T, device=x.device) if keep is None else keep) // T
                aux = self.alpha * sequence_balance_loss(scores, indices, seq_id, B, self.topk)
        if keep is not None:
            y = flat.new_zeros(B * T, D).index_copy_(0, keep, y)
        return y.view(B, T, D), aux

    def fold(self, norm: torch.Tensor) -> dict[str, torch.Tensor]:
        """Router, every routed expert and the shared experts as one product in and one out:
        [gate; w1 of experts 1..N_r, shared; w3 likewise] (times the RMSNorm weight) and the w2s stacked
        along their inputs, so that sum_e g_e w2_e h_e is one product over (e, i) with g = 1 for shared;
        `gates` holds those g before routing: 0 for the routed experts, 1 for the shared ones."""
        E, inter = self.experts.w1.shape[:2]
        w1, w3 = [self.experts.w1.flatten(0, 1)], [self.experts.w3.flatten(0, 1)]   # (E I, D)
        w2 = [self.experts.w2.transpose(1, 2).flatten(0, 1)]                         # (E I, D), w2_e^T stacked
        if self.shared_experts is not None:
            s = self.shared_experts
            w1, w3, w2 = w1 + [s.w1.weight], w3 + [s.w3.weight], w2 + [s.w2.weight.t()]
        w2 = torch.cat(w2)
        gates = torch.zeros(1, len(w2) // inter, dtype=w2.dtype, device=w2.device)
        gates[:, E:] = 1
        return {"w_ffn_in": in_out([self.gate.weight, *w1, *w3], norm), "w_ffn_out": w2, "gates": gates}

    def decode(self, x, fold: Folded):
        """Eq. 12 for one token per row, every expert computed densely as `Experts.dense` does.
        x: (B, D) after the unit RMS norm. Returns (B, D)."""
        B, E, inter = x.shape[0], self.n_routed_experts, self.experts.w1.shape[1]
        n = fold.w_ffn_out.shape[0]                                                  # (N_r + shared) I
        logits, h1, h3 = torch.mm(x, fold.w_ffn_in).split([E, n, n], dim=-1)
        weights, indices, _ = self.gate.route(logits)
        g = fold.gates.expand(B, -1).scatter(1, indices, weights.type_as(x))         # g_e, 0 if not chosen, 1 shared
        h = (F.silu(h1) * h3).view(B, -1, inter) * g.unsqueeze(2)                    # (B, N_r + shared, I)
        return torch.mm(h.flatten(1), fold.w_ffn_out)

    @torch.no_grad()
    def update_bias(self, gamma: float):
        """Aux-loss-free balancing: b_i -= gamma if expert i was overloaded, += gamma if underloaded."""
        load = self.expert_load
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load)
        if self.gate.bias is not None and load.sum() > 0:
            self.gate.bias += gamma * torch.sign(load.mean() - load)
        load.zero_()


def sequence_balance_loss(scores, indices, seq_id, n_seqs: int, topk: int) -> torch.Tensor:
    """sum_i f_i P_i averaged over sequences (V3 eqs. 17-20); alpha is applied by the caller.

    f_i = N_r / (K_r T) * #tokens of the sequence routed to i;  P_i = mean_t s_{i,t} / sum_j s_{j,t}.
    Equals 1 when routing and affinities are uniform.
    """
    n_experts = scores.shape[1]
    tokens = torch.bincount(seq_id, minlength=n_seqs).clamp(min=1).float()             # T per sequence
    hits = torch.zeros(n_seqs * n_experts, device=scores.device)
    hits.index_add_(0, (seq_id.unsqueeze(1) * n_experts + indices).flatten(),
                    torch.ones(indices.numel(), device=scores.device))
    f = hits.view(n_seqs, n_experts) * n_experts / (topk * tokens.unsqueeze(1))
    p = torch.zeros(n_seqs, n_experts, device=scores.device)
    p = p.index_add(0, seq_id, scores / scores.sum(dim=-1, keepdim=True)) / tokens.unsqueeze(1)
    present = torch.bincount(seq_id, minlength=n_seqs) > 0
    return (f * p).sum(dim=-1)[present].mean() if present.any() else scores.new_zeros(())


# -------------------------------------------------------------------------------------------------
# Blocks, Multi-Token Prediction, the model

class Block(nn.Module):
    """Pre-norm block: x = x + attn(attn_norm(x)); x = x + ffn(ffn_norm(x))."""

    def __init__(self, layer_id: int, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = MLA(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = MLP(cfg.dim, cfg.inter_dim) if layer_id < cfg.n_dense_layers else MoE(cfg)

    def forward(self, x, cos, sin, mask, token_mask=None, cache=None, start_pos=0, attn_impl=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, start_pos, attn_impl)
        if isinstance(self.ffn, MoE):
            h, aux = self.ffn(self.ffn_norm(x), token_mask)
        else:
            h, aux = self.ffn(self.ffn_norm(x)), x.new_zeros((), dtype=torch.float32)
        return x + h, aux

    def fold(self, n_tokens: int) -> Folded:
        parts = self.attn.fold(self.attn_norm.weight)
        moe = isinstance(self.ffn, MoE)
        if not moe or self.ffn.experts.runs_dense(n_tokens, self.ffn.topk):  # else too many rows for dense experts
            parts.update(self.ffn.fold(self.ffn_norm.weight))
        eps = torch.tensor(self.attn_norm.eps, dtype=torch.float32, device=self.attn_norm.weight.device)
        return Folded(**{k: None if v is None else v.contiguous() for k, v in parts.items()}, eps=eps)

    def decode(self, x, fold: Folded, cache: KVCache, pos: int, rope: tuple[torch.Tensor, ...], bias: torch.Tensor):
        """`forward` for one token per row (x: (B, D)) with folded weights."""
        x = x + self.attn.decode(unit_rms(x, fold.eps), fold, cache, pos, rope, bias)
        if fold.w_ffn_in is None:
            return x + self.ffn(self.ffn_norm(x).unsqueeze(1))[0].squeeze(1)
        return x + self.ffn.decode(unit_rms(x, fold.eps), fold)


@dataclass
class Folded:
    """One block's weights multiplied out for decoding one token per row (`Transformer.fold`), each
    matrix stored as (in, out): a decode step computes x @ W."""
    w_in: torch.Tensor              # (D, q_lora + d_c + 2 d_R): [W^DQ; W^DKV; W^KR; swap(W^KR)]^T * attn_norm;
                                    # without q_lora (D, H (d_c + 2 d_R) + d_c + 2 d_R): [folded wq; ...]^T
    w_q: torch.Tensor | None        # (q_lora, H (d_c + 2 d_R)): per head [W^UK^T W^UQ; W^QR; swap(W^QR)]^T
                                    # * q_norm * softmax scale; None without q_lora (the rows lead w_in)
    kv_norm: torch.Tensor           # (d_c,)
    w_o: torch.Tensor               # (H d_c, D): (W^O W^UV)^T
    eps: torch.Tensor               # norm_eps as a 0-dim fp32 tensor, for `unit_rms`
    w_ffn_in: torch.Tensor | None = None   # (D, E + 2 (N_r + shared) I) [gate; w1s; w3s]^T * ffn_norm, or
                                           # (D, 2 I); None: the MoE runs its own forward (too many rows)
    w_ffn_out: torch.Tensor | None = None  # ((N_r + shared) I, D) stacked w2^T, or (I, D)
    gates: torch.Tensor | None = None      # (1, N_r + shared): g before routing, 0 routed and 1 shared


class MTPModule(nn.Module):
    """One MTP depth k (V3 eqs. 21-23): h'_i = M_k [RMSNorm(h^{k-1}_i); RMSNorm(Emb(t_{i+k}))], then a block.

    Embedding and output head are shared with the main model; the concat puts the embedding first,
    as the released checkpoints do.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.eh_proj = Linear(2 * cfg.dim, cfg.dim)  # M_k
        self.block = Block(cfg.n_layers, cfg)  # always MoE: its index is past the dense layers
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)  # shared_head.norm


@torch.no_grad()
def init_parameters(module: nn.Module, std: float):
    """Normal(0, std) weights, unit norms, zero router bias, in module order. Works on any part of
    the model, so a sharded build can initialise one block at a time (parallel.build_model)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
        elif isinstance(m, RMSNorm):
            nn.init.ones_(m.weight)
        elif isinstance(m, Gate):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, Experts):
            for e in range(m.w1.shape[0]):  # drawn as the per-expert Linears would be, in order
                for w in (m.w1, m.w2, m.w3):
                    nn.init.normal_(w[e], std=std)


# Logits per chunk of `LinearCrossEntropy` (rows x vocabulary): 128 rows at V = 1024, 512 KB in fp32.
# A `tiny` training step took the same time with chunks from 2^17 to 2^21 (all the rows); the
# smallest of those holds the least memory.
LOSS_CHUNK = 2 ** 17


def fused_loss_pays(h: torch.Tensor) -> bool:
    """Whether the loss on hidden states h runs as `LinearCrossEntropy`: where it was measured (CPU,
    fp32 or fp64) and only when a backward will follow, since it computes the gradients up front."""
    return (h.device.type == "cpu" and h.dtype in (torch.float32, torch.float64)
            and torch.is_grad_enabled() and h.requires_grad)


class LinearCrossEntropy(torch.autograd.Function):
    """The output head and the next-token loss in one, mean_i CE(h_i W^T, target_i) over the targets
    that are not -100, a chunk of rows at a time: a chunk's logits are made, turned at once into
    their gradient (softmax - one-hot) / n, and multiplied back into dh and dW, so the (N, V) logits
    and their gradient never exist whole. The backward only scales the two saved gradients.

    h (N, D), weight (V, D), targets (N,). Returns the loss, 0 when every target is -100.
    Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk: int):
        valid = (targets != -100).unsqueeze(1)                                     # (N, 1)
        safe = targets.clamp(min=0).unsqueeze(1)                                   # (N, 1), any id where ignored
        inv_n = 1.0 / max(int(valid.sum()), 1)
        dh, dw = torch.empty_like(h), torch.zeros_like(weight)
        loss = h.new_zeros(())
        for s in range(0, h.shape[0], chunk):
            e = min(s + chunk, h.shape[0])
            logits = torch.mm(h[s:e], weight.t())                                  # (chunk, V)
            top = logits.amax(dim=-1, keepdim=True)
            picked = logits.gather(1, safe[s:e])
            p = logits.sub_(top).exp_()                                            # in place: one exp per logit
            total = p.sum(dim=-1, keepdim=True)
            loss += (total.log() + top - picked).mul_(valid[s:e]).sum()            # -log softmax at the target
            p.div_(total).scatter_add_(1, safe[s:e], -valid[s:e].to(p.dtype))     # softmax - one-hot:
            p.mul_(valid[s:e]).mul_(inv_n)                                         # dloss/dlogits
            torch.mm(p, weight, out=dh[s:e])
            dw.addmm_(p.t(), h[s:e])
        ctx.save_for_backward(dh, dw)
        return loss * inv_n

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        dh, dw = ctx.saved_tensors
        return dh * grad, dw * grad, None, None


@dataclass
class ModelOutput:
    logits: torch.Tensor | None                     # (B, T, V); None when forward was asked not to keep them
    loss: torch.Tensor | None = None                # ntp + mtp + balance
    parts: dict[str, torch.Tensor] = field(default_factory=dict)  # "ntp", "mtp", "balance"
    hidden: torch.Tensor | None = None              # (B, T, D) last hidden state before the final norm


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(i, cfg) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = Linear(cfg.dim, cfg.vocab_size)  # not tied to the embedding
        self.mtp = nn.ModuleList(MTPModule(cfg) for _ in range(cfg.mtp_depth))
        self.cache_dtype: torch.dtype | None = None  # see new_cache
        self.register_buffer("rope_cos", torch.empty(cfg.max_seq_len, cfg.qk_rope_head_dim // 2), persistent=False)
        self.register_buffer("rope_sin", torch.empty(cfg.max_seq_len, cfg.qk_rope_head_dim // 2), persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Normal(0, init_std) weights, unit norms, zero router bias, fresh rope tables.

        Call after `to_empty()` when the model was built on the meta device (where it does nothing).
        """
        if self.embed.weight.is_meta:
            return
        init_parameters(self, self.cfg.init_std)
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self):
        """Recompute the buffers no checkpoint holds: rope tables and zero expert loads (also after
        `to_empty()`, which leaves them uninitialised)."""
        cos, sin = rope_tables(self.cfg, self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        for moe in self.moe_layers():
            moe.expert_load.zero_()

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def update_router_biases(self, gamma: float | None = None):
        """Call after each optimizer step: apply the aux-loss-free bias rule to every MoE layer."""
        gamma = self.cfg.bias_update_speed if gamma is None else gamma
        for moe in self.moe_layers():
            moe.update_bias(gamma)

    def folding_pays(self) -> bool:
        """`folding_pays` for this model's config."""
        return folding_pays(self.cfg)

    @torch.no_grad()
    def fold(self, n_tokens: int) -> tuple[list[Folded], torch.Tensor]:
        """Weights for `decode`: each block's products multiplied out (MLA.fold, MoE.fold, MLP.fold)
        and the final norm's weight in the head. The same function as `forward`, up to rounding;
        valid until the weights change, so `generate` folds once per call."""
        return [layer.fold(n_tokens) for layer in self.layers], (self.head.weight * self.norm.weight).t().contiguous()

    def decode(self, tokens: torch.Tensor, folded: tuple[list[Folded], torch.Tensor], cache: list[KVCache],
               pos: int, rope: tuple[torch.Tensor, torch.Tensor], bias: torch.Tensor) -> torch.Tensor:
        """One decode step with folded weights: tokens (B,) at cache position pos; rope this step's
        (cos, sin), (B, d_c + d_R) each, a slice [:, t] of `decode_rope`'s; bias (B, 1, pos + 1)
        additive mask. Returns (B, V) logits.

        The absorbed attention's step as `forward` takes it, with about half the matrix products: every
        product that does not depend on the token is multiplied out in `fold`.
        """
        layers, head = folded
        cos, sin = rope
        d_c = self.cfg.kv_lora_rank
        rope = (cos.unsqueeze(1), sin.unsqueeze(1), cos[:, d_c:], sin[:, d_c:])      # for q (B, 1, .), for k^R
        x = self.embed(tokens)                                                       # (B, D)
        for layer, fold, c in zip(self.layers, layers, cache):
            x = layer.decode(x, fold, c, pos, rope, bias)
        return torch.mm(unit_rms(x, layers[-1].eps), head)  # every norm has cfg.norm_eps

    def decode_rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for `decode` at positions (B, N): each (B, N, d_c + d_R), 1 and 0 over the d_c
        latent columns, then each rope pair's cos and sin twice (interleaved, as the pairs are)."""
        d_c, dtype = self.cfg.kv_lora_rank, self.embed.weight.dtype
        cos = self.rope_cos[positions].repeat_interleave(2, dim=-1)                  # (B, N, d_R)
        sin = self.rope_sin[positions].repeat_interleave(2, dim=-1)
        return F.pad(cos, (d_c, 0), value=1.0).to(dtype), F.pad(sin, (d_c, 0)).to(dtype)

    def new_cache(self, batch_size: int, max_len: int, dtype=None, device=None) -> list[KVCache]:
        """An empty latent cache: (kv_lora_rank + qk_rope_head_dim) values per token per layer, in
        `cache_dtype` if set (the compute dtype when it differs from the stored weights', as under
        FSDP2 mixed precision), else the weights' dtype."""
        if max_len > self.cfg.max_seq_len:
            raise ValueError(f"cache length {max_len} exceeds max_seq_len {self.cfg.max_seq_len}")
        dtype = dtype or self.cache_dtype or self.embed.weight.dtype
        device = device or self.embed.weight.device
        width = self.cfg.kv_lora_rank + self.cfg.qk_rope_head_dim
        return [KVCache(torch.zeros(batch_size, max_len, width, dtype=dtype, device=device), self.cfg.kv_lora_rank)
                for _ in self.layers]

    def _positions_and_mask(self, B, T, start_pos, key_mask, device, dtype):
        """Rope positions (B, T) and the additive attention mask (B, 1, T, S), 0 where a query may
        attend and -inf elsewhere, or None for plain causal. Additive once here rather than boolean:
        SDPA would convert a boolean mask in every layer, and baddbmm adds it for free.

        key_mask (B, S = start_pos + T) marks real tokens; with left padding a row's positions count
        only its real tokens, so a padded prompt sees the same positions as an unpadded one.
        """
        S = start_pos + T

        def additive(allowed):
            return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))

        if key_mask is None:
            positions = torch.arange(start_pos, S, device=device).expand(B, T)
            if start_pos == 0:
                return positions, None
            causal = torch.arange(T, device=device).unsqueeze(1) + start_pos >= torch.arange(S, device=device)
            return positions, additive(causal.expand(B, 1, T, S))
        if key_mask.shape != (B, S):
            raise ValueError(f"key_mask must have shape {(B, S)}, got {tuple(key_mask.shape)}")
        key_mask = key_mask.bool()
        positions = (key_mask.long().cumsum(dim=1) - 1).clamp(min=0)[:, start_pos:]
        q_idx = torch.arange(start_pos, S, device=device).unsqueeze(1)     # (T, 1)
        k_idx = torch.arange(S, device=device)                              # (S,)
        mask = (k_idx <= q_idx) & key_mask[:, None, :]                      # (B, T, S)
        mask = mask | (k_idx == q_idx)  # a padding query sees itself, so no row is empty (no NaN)
        return positions, additive(mask.unsqueeze(1))

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, *,
                key_mask: torch.Tensor | None = None, cache: list[KVCache] | None = None,
                start_pos: int = 0, attn_impl: str | None = None, mtp: bool = True,
                logits: bool = True) -> ModelOutput:
        """tokens (B, T) at positions start_pos.. of the cache; targets (B, T) next-token ids, -100 = ignore.

        key_mask (B, start_pos + T) marks real (non-padding) tokens over the cache and the new tokens.
        With targets, the loss is next-token CE + lambda * mean MTP CE + balance loss, with each part
        in `parts`. MTP runs only when targets are given and `mtp` is true. logits=False, with targets,
        leaves `ModelOutput.logits` None, so that a training step may take the loss without them
        (`head_loss`).
        """
        B, T = tokens.shape
        if start_pos + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence end {start_pos + T} exceeds max_seq_len {self.cfg.max_seq_len}")
        positions, mask = self._positions_and_mask(B, T, start_pos, key_mask, tokens.device,
                                                   self.embed.weight.dtype)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]      # (B, T, d_R/2)
        token_mask = None if key_mask is None else key_mask[:, start_pos:].bool()
        if token_mask is not None and bool(token_mask.all()):  # e.g. a decode step: nothing to filter out
            token_mask = None
        h = self.embed(tokens)
        balance = h.new_zeros((), dtype=torch.float32)
        for i, layer in enumerate(self.layers):
            h, aux = layer(h, cos, sin, mask, token_mask, None if cache is None else cache[i], start_pos, attn_impl)
            balance = balance + aux
        if targets is None:
            return ModelOutput(self.head(self.norm(h)), hidden=h)
        ntp, logits = self.head_loss(self.norm(h), targets, keep_logits=logits)
        parts = {"ntp": ntp}
        loss = ntp
        if mtp and len(self.mtp) > 0:
            mtp_losses, h_k = [], h
            for k, module in enumerate(self.mtp, start=1):
                if T - k < 1:
                    break
                # Depth k at position i sees h^{k-1}_i and Emb(t_{i+k}) and predicts t_{i+k+1} = targets[i+k].
                emb = module.enorm(self.embed(tokens[:, k:]))                  # (B, T-k, D)
                h_k = module.eh_proj(torch.cat([emb, module.hnorm(h_k[:, :T - k])], dim=-1))
                sub_mask = None if mask is None else mask[:, :, :T - k, :T - k]
                sub_tokens = None if token_mask is None else token_mask[:, k:] & token_mask[:, :T - k]
                h_k, aux = module.block(h_k, cos[:, :T - k], sin[:, :T - k], sub_mask, sub_tokens)
                balance = balance + aux
                mtp_losses.append(self.head_loss(module.norm(h_k), targets[:, k:], keep_logits=False)[0])
            if mtp_losses:
                parts["mtp"] = torch.stack(mtp_losses).mean()
                loss = loss + self.cfg.mtp_lambda * parts["mtp"]
        if self.training and self.moe_layers():
            parts["balance"] = balance
            loss = loss + balance
        return ModelOutput(logits, loss, parts, h)

    def head_loss(self, x: torch.Tensor, targets: torch.Tensor, keep_logits: bool):
        """The output head and the mean CE over the targets (B, T) that are not -100 (0 when none
        is), on normalised hidden states x (B, T, D): returns (loss, logits (B, T, V) or None).
        Without logits to keep, and where `fused_loss_pays`, as `LinearCrossEntropy`, which never
        holds the whole logits."""
        if not keep_logits and fused_loss_pays(x):
            chunk = max(1, LOSS_CHUNK // self.cfg.vocab_size)
            return LinearCrossEntropy.apply(x.flatten(0, 1), self.head.weight, targets.flatten(), chunk), None
        logits = self.head(x)
        targets = targets.flatten()
        # the mean over the targets, 0 when there are none (as LinearCrossEntropy's), where "mean" gives 0/0
        loss = (F.cross_entropy(logits.flatten(0, 1).float(), targets, ignore_index=-100, reduction="sum")
                / (targets != -100).sum().clamp(min=1))
        return loss, (logits if keep_logits else None)


# -------------------------------------------------------------------------------------------------
# Parameter counting

def count_parameters(model: Transformer) -> dict[str, int]:
    """Total and per-token active parameters of the main model, and the MTP modules' own parameters.

    Active = total minus the routed experts a token does not visit; it includes the embedding row
    lookup as a full matrix, as DeepSeek's own counts do. The router biases count as parameters, as
    they are stored tensors of the checkpoint (`e_score_correction_bias`). Works on the meta device.
    """
    cfg = model.cfg

    def numel(module):
        biases = sum(g.bias.numel() for g in module.modules() if isinstance(g, Gate) and g.bias is not None)
        return sum(p.numel() for p in module.parameters()) + biases

    mtp = numel(model.mtp)
    total = numel(model) - mtp
    main_moe = [layer.ffn for layer in model.layers if isinstance(layer.ffn, MoE)]
    idle = sum(numel(moe.experts) // cfg.n_routed_experts * (cfg.n_routed_experts - cfg.n_activated_experts)
               for moe in main_moe)
    return {"total": total, "active": total - idle, "mtp": mtp,
            "embedding": model.embed.weight.numel()}


# -------------------------------------------------------------------------------------------------
# Sampling with the latent cache

@dataclass
class Generation:
    prompt_tokens: torch.Tensor     # (B, P) left-padded prompts
    prompt_mask: torch.Tensor       # (B, P) bool, real prompt tokens
    tokens: torch.Tensor            # (B, N) sampled ids, pad after a stop token
    mask: torch.Tensor              # (B, N) bool, tokens up to and including the stop token
    logprobs: torch.Tensor          # (B, N) log pi(token) under softmax(logits / temperature), 0 where masked
    stopped: torch.Tensor           # (B,) bool, True if a stop token ended the row (False = truncated)

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(dim=1)


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, generator=None):
    """Sample from (B, V) logits; returns ids (B,) and their log-probs under softmax(logits / T)."""
    logits = logits.float()
    if temperature <= 0:
        ids = logits.argmax(dim=-1)
        return ids, logits.log_softmax(dim=-1).gather(1, ids.unsqueeze(1)).squeeze(1)
    if temperature != 1:
        logits = logits / temperature
    logprobs = logits.log_softmax(dim=-1)
    filtered = logits
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        filtered = filtered.masked_fill(filtered < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = filtered.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > top_p   # keep the smallest prefix with mass >= top_p
        filtered = filtered.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    # Inverse-CDF sampling: the first token whose cumulative probability exceeds u ~ U(0, total).
    # One uniform per row, where torch.multinomial draws an exponential per vocabulary entry.
    cdf = filtered.softmax(dim=-1).double().cumsum(dim=-1)                      # (B, V)
    u = torch.rand(cdf.shape[0], 1, dtype=cdf.dtype, device=cdf.device, generator=generator) * cdf[:, -1:]
    if not torch.isfinite(cdf[:, -1]).all():
        raise ValueError("sample_token: logits with NaN or +inf, or a row with no finite logit")
    ids = torch.searchsorted(cdf, u, right=True).squeeze(1)  # never a zero-probability token: cdf is flat there
    return ids, logprobs.gather(1, ids.unsqueeze(1)).squeeze(1)


def has_dtensors(model: nn.Module) -> bool:
    """Whether some parameter is a shard (an FSDP2 DTensor) rather than a whole tensor."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor
    return any(isinstance(p, DTensor) for p in model.parameters())


@torch.inference_mode()  # no autograd bookkeeping, which is much of a small model's decode step
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, *, pad_id: int,
             stop_ids: tuple[int, ...] = (), temperature: float = 1.0, top_p: float = 1.0,
             top_k: int = 0, generator: torch.Generator | None = None,
             attn_impl: str = "absorbed", sync_stop: bool = False, fold: bool | None = None) -> Generation:
    """Batched sampling: left-pad the prompts, prefill each distinct prompt once, decode with the latent cache.

    Rows with the same prompt share its prefill (the same logits as prefilling each row), so G samples
    of one prompt cost one prompt forward; sampling draws from the generator in row order either way.
    sync_stop: under torchrun with FSDP-sharded weights gathered block by block, stop when every
    rank's rows are done (see parallel.rollout_mode).
    fold: decode with the weights multiplied out once (`Transformer.fold`, `Transformer.decode`);
    None: where that pays (`Transformer.folding_pays`) and the weights are whole tensors on this rank.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and every prompt needs a token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = model.embed.weight.device
    B, P = len(prompts), max(len(p) for p in prompts)
    prompt_tokens = torch.full((B, P), pad_id, dtype=torch.long, device=device)
    prompt_mask = torch.zeros(B, P, dtype=torch.bool, device=device)
    for b, p in enumerate(prompts):
        prompt_tokens[b, P - len(p):] = torch.tensor(p, dtype=torch.long)
        prompt_mask[b, P - len(p):] = True
    # GRPO asks for G completions of each prompt: prefill each distinct (prompt, padding) row once.
    distinct, rows = torch.unique(torch.cat([prompt_tokens, prompt_mask.long()], dim=1), dim=0,
                                  return_inverse=True)                               # (D, 2P), (B,)
    shared = len(distinct) < B
    cache = model.new_cache(B, P + max_new_tokens)
    key_mask = torch.cat([prompt_mask, torch.ones(B, max_new_tokens, dtype=torch.bool, device=device)], dim=1)
    tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(B, max_new_tokens, dtype=torch.bool, device=device)
    logprobs = torch.zeros(B, max_new_tokens, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    if fold is None:
        fold = (attn_impl == "absorbed" and not sync_stop and max_new_tokens > 1 and model.folding_pays()
                and not has_dtensors(model))
    elif fold and (sync_stop or has_dtensors(model)):
        raise ValueError("fold=True needs whole weights on this rank: not with sync_stop or sharded (DTensor) parameters")
    if fold:
        folded = model.fold(B)
        positions = prompt_mask.sum(dim=1, keepdim=True) + torch.arange(max_new_tokens, device=device)  # (B, N)
        cos, sin = model.decode_rope(positions)                                        # (B, N, d_c + d_R)
        bias = torch.zeros(B, 1, P + max_new_tokens, dtype=model.embed.weight.dtype, device=device)
        bias.masked_fill_(~key_mask.unsqueeze(1), float("-inf"))                   # (B, 1, S) additive mask
    was_training = model.training
    model.eval()
    try:
        if shared:
            prefill = model.new_cache(len(distinct), P)
            logits = model(distinct[:, :P], key_mask=distinct[:, P:].bool(), cache=prefill,
                           attn_impl=attn_impl).logits[:, -1][rows]                  # (B, V)
            for c, d in zip(cache, prefill):  # each completion decodes on its own copy of its prompt's rows
                c.latent[:, :P] = d.latent[rows]
        else:
            logits = model(prompt_tokens, key_mask=key_mask[:, :P], cache=cache, attn_impl=attn_impl).logits[:, -1]
        for t in range(max_new_tokens):
            ids, lp = sample_token(logits, temperature, top_p, top_k, generator)
            live = ~done
            tokens[:, t] = torch.where(live, ids, pad_id)
            logprobs[:, t] = torch.where(live, lp, 0.0)
            mask[:, t] = live
            if stop_ids:
                done = done | (live & torch.isin(ids, stop))
            finished = done.all()
            if sync_stop:  # sharded weights: every rank joins every forward until all ranks are done
                finished = finished.int()
                torch.distributed.all_reduce(finished, op=torch.distributed.ReduceOp.MIN)
            if bool(finished) or t == max_new_tokens - 1:
                break
            if fold:
                logits = model.decode(tokens[:, t], folded, cache, P + t, (cos[:, t], sin[:, t]), bias[..., :P + t + 1])
            else:
                logits = model(tokens[:, t:t + 1], key_mask=key_mask[:, :P + t + 1], cache=cache,
                               start_pos=P + t, attn_impl=attn_impl).logits[:, -1]
    finally:
        model.train(was_training)
    with torch.inference_mode(False):  # plain tensors out, which training may use (old log-probs)
        return Generation(*(t.clone() for t in (prompt_tokens, prompt_mask, tokens, mask, logprobs, done)))
