"""Claims of the DeepSeek-V3 report and the contract of model.py, checked on CPU."""

import math

import pytest
import torch
import torch.nn.functional as F

import model as model_module
from model import (BlockedAttention, LinearCrossEntropy, MoE, ModelConfig, Transformer, absorbed_training_pays,
                   apply_rope, blocked_attention, count_parameters, dense_config, generate, get_config,
                   rope_swap, sample_token, sequence_balance_loss, unit_rms, yarn_frequencies)

# The micro preset, its V2-style variant (softmax routing, no router bias, no q_lora), and heads as
# wide as the latent, where the absorbed attention folds its weights and trains (as `tiny` does).
VARIANTS = {
    "v3": {},
    "v2": dict(score_func="softmax", use_router_bias=False, q_lora_rank=0, route_scale=1.0),
    "folded": dict(qk_nope_head_dim=16, v_head_dim=16),
}


def micro(seed=0, **overrides):
    torch.manual_seed(seed)
    return Transformer(get_config("micro", **overrides))


def randomise_biases(model, scale=0.5):
    for moe in model.moe_layers():
        if moe.gate.bias is not None:
            moe.gate.bias.normal_(0, scale)


# ------------------------------------------------------------------------------------------------
# Configuration and parameter counts

def meta_model(name):
    with torch.device("meta"):
        return Transformer(get_config(name))


def test_full_config_has_the_published_parameter_counts():
    counts = count_parameters(meta_model("full"))
    assert counts["total"] == 671_026_419_200
    assert counts["active"] == 37_552_297_472
    assert counts["mtp"] == 11_610_068_224
    assert counts["active"] - counts["embedding"] == pytest.approx(36.6e9, rel=2e-3)


@pytest.mark.parametrize("name,total,active", [("236B", 235.741e9, 21.376e9), ("16B", 15.706e9, 2.661e9)])
def test_v2_presets_have_the_published_parameter_counts(name, total, active):
    counts = count_parameters(meta_model(name))
    assert round(counts["total"] / 1e6) == round(total / 1e6)
    assert round(counts["active"] / 1e6) == round(active / 1e6)
    assert counts["mtp"] == 0


def test_tiny_preset_is_small_and_keeps_every_feature():
    cfg = get_config("tiny")
    counts = count_parameters(Transformer(cfg))
    assert 1e6 <= counts["total"] + counts["mtp"] <= 10e6
    assert cfg.n_dense_layers < cfg.n_layers and cfg.mtp_depth >= 1 and cfg.q_lora_rank > 0
    assert cfg.use_router_bias and cfg.n_expert_groups > 1 and cfg.rope_factor > 1


@pytest.mark.parametrize("field,value", [
    ("dim", 0), ("n_heads", -1), ("n_activated_experts", 9), ("n_expert_groups", 3),
    ("n_limited_groups", 5), ("score_func", "relu"), ("qk_rope_head_dim", 7), ("n_dense_layers", 3),
    ("rope_factor", float("nan")), ("mtp_lambda", -0.1), ("vocab_size", 2.5), ("beta_fast", 1),
])
def test_invalid_config_fails_at_construction_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        get_config("micro", **{field: value})


def test_unknown_preset_and_field_are_rejected():
    with pytest.raises(ValueError, match="unknown model size"):
        get_config("huge")
    with pytest.raises(ValueError, match="n_experts"):
        get_config("micro", n_experts=4)


def test_dense_student_has_no_moe():
    student = Transformer(dense_config(get_config("micro")))
    assert student.moe_layers() == [] and len(student.mtp) == 0
    shallower = Transformer(dense_config(get_config("tiny"), n_layers=2, dim=64))
    assert shallower.moe_layers() == [] and len(shallower.layers) == 2


# ------------------------------------------------------------------------------------------------
# RoPE and YaRN

def test_yarn_frequencies_and_softmax_scale_match_the_671b_reference():
    cfg = get_config("full")
    freqs = yarn_frequencies(cfg)
    base = 1.0 / (10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    # low = 10 and high = 23 for theta 1e4, 4096 original positions, beta 32 / 1.
    assert torch.allclose(freqs[:11], base[:11])                 # ramp 0 up to i = low: extrapolate
    assert torch.allclose(freqs[23:], base[23:] / 40)            # ramp 1 from i = high: interpolate
    i = 16
    ramp = (i - 10) / 13
    assert freqs[i].item() == pytest.approx(base[i].item() / 40 * ramp + base[i].item() * (1 - ramp))
    mscale = 0.1 * math.log(40) + 1
    assert mscale == pytest.approx(1.368888, abs=1e-6)
    assert cfg.softmax_scale == pytest.approx(192 ** -0.5 * mscale ** 2)
    assert cfg.softmax_scale == pytest.approx(0.135234, abs=1e-6)


def test_yarn_is_off_without_a_rope_factor():
    cfg = get_config("micro", rope_factor=1.0)
    d = cfg.qk_rope_head_dim
    assert torch.allclose(yarn_frequencies(cfg), 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2).double() / d)))
    assert cfg.softmax_scale == pytest.approx(cfg.qk_head_dim ** -0.5)


def test_swapped_rows_rotate_like_the_complex_product():
    # The folded step rotates y = W x as y cos + (swap(W) x) sin, with cos and sin repeated per pair:
    # the same as apply_rope's complex multiplication, pair by pair.
    model = micro()
    w, x = torch.randn(8, 20), torch.randn(5, 20)
    positions = torch.tensor([0, 3, 17, 64, 127])
    cos, sin = model.rope_cos[positions], model.rope_sin[positions]         # (5, 4)
    expected = apply_rope((x @ w.t()).view(5, 1, 1, 8), cos.unsqueeze(1), sin.unsqueeze(1)).view(5, 8)
    got = (x @ w.t()) * cos.repeat_interleave(2, dim=-1) + (x @ rope_swap(w).t()) * sin.repeat_interleave(2, dim=-1)
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.equal(rope_swap(rope_swap(w)), -w)  # two quarter turns


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unit_rms_is_rmsnorm_without_its_weight(dtype):
    x = torch.randn(6, 32).to(dtype) * torch.logspace(-4, 2, 6).unsqueeze(1).to(dtype)  # norms far below and above eps
    got = unit_rms(x, torch.tensor(1e-6))
    assert got.dtype == dtype
    expected = F.rms_norm(x.float(), (32,), eps=1e-6).to(dtype)
    assert torch.allclose(got.float(), expected.float(), rtol=1e-5 if dtype == torch.float32 else 1e-2)


# ------------------------------------------------------------------------------------------------
# Multi-head Latent Attention

@pytest.mark.parametrize("variant", VARIANTS)
def test_attention_is_causal(variant):
    model = micro(**VARIANTS[variant]).eval()
    x = torch.randint(0, 64, (2, 16))
    y = x.clone()
    y[:, 10:] = torch.randint(0, 64, (2, 6))
    for impl in ("naive", "absorbed"):
        a, b = model(x, attn_impl=impl).logits, model(y, attn_impl=impl).logits
        assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
        assert not torch.allclose(a[:, 10:], b[:, 10:])


def each_attention_kernel(monkeypatch):
    """Yields twice: with `BlockedAttention` where it pays (the default), then with SDPA everywhere."""
    for limit in (model_module.BLOCKED_ATTENTION_MAX_PROBS, 0):
        monkeypatch.setattr(model_module, "BLOCKED_ATTENTION_MAX_PROBS", limit)
        yield


def reference_attention(q, k, v, mask, scale):
    """softmax(scale q k^T + causal at offset S - T + mask) v, written out for q (B, H_k, T, G, d)."""
    T, S = q.shape[2], k.shape[2]
    q, k, v = q.transpose(2, 3), k.unsqueeze(2), v.unsqueeze(2)              # (B, H_k, G, T, d), (B, H_k, 1, S, d)
    causal = torch.ones(T, S, dtype=torch.bool).tril(S - T)
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~causal, float("-inf"))
    scores = scores if mask is None else scores + mask.unsqueeze(2)
    return (scores.softmax(dim=-1) @ v).transpose(2, 3)                      # (B, H_k, T, G, d_v)


@pytest.mark.parametrize("T,S,block,padded,G", [(16, 16, 4, False, 1), (37, 37, 8, True, 1), (11, 20, 4, True, 1),
                                                (5, 5, 64, False, 1), (37, 37, 8, True, 3), (11, 20, 4, True, 4)])
def test_blocked_attention_equals_written_out_attention(T, S, block, padded, G):
    """G > 1: query heads sharing one key head, as the absorbed MLA's heads share [c; k^R]."""
    torch.manual_seed(0)
    B, H_k = 2, 3 if G == 1 else 1
    q, k = torch.randn(B, H_k, T, G, 12, dtype=torch.float64), torch.randn(B, H_k, S, 12, dtype=torch.float64)
    v = torch.randn(B, H_k, S, 7, dtype=torch.float64)
    mask = None
    if padded:  # the first keys of row 1 are padding; every query keeps at least its own key
        mask = torch.zeros(B, 1, T, S, dtype=torch.float64)
        mask[1, :, :, :3] = float("-inf")
        mask[1, :, torch.arange(T), torch.arange(S - T, S)] = 0
    inputs = [t.requires_grad_() for t in (q, k, v)]
    got = BlockedAttention.apply(*inputs, mask, 0.3, block)
    want = reference_attention(*inputs, mask, 0.3)
    assert torch.allclose(got, want, atol=1e-12)
    grad_out = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, inputs, grad_out), torch.autograd.grad(want, inputs, grad_out)):
        assert torch.allclose(a, b, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *x: BlockedAttention.apply(*x, mask, 0.3, block), inputs)


def test_blocked_attention_without_a_backward_keeps_nothing_and_gives_the_same_output():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 1, 13, 3, 8), torch.randn(2, 1, 13, 8), torch.randn(2, 1, 13, 5)
    with_grad = BlockedAttention.apply(*(t.clone().requires_grad_() for t in (q, k, v)), None, 0.3, 4)
    out, saved = BlockedAttention.attend(q, k, v, None, 0.3, 4, keep=False)
    with torch.no_grad():
        assert torch.equal(blocked_attention(q, k, v, None, 0.3, 4), with_grad) and torch.equal(out, with_grad)
    assert saved is None


def test_blocked_attention_gives_a_query_without_keys_a_zero_row_like_sdpa():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 6, 8, requires_grad=True) for _ in range(3))
    mask = torch.zeros(2, 1, 6, 6)
    mask[0, 0, 2] = float("-inf")
    causal = torch.full((6, 6), float("-inf")).triu(1)
    got = BlockedAttention.apply(q.unsqueeze(3), k, v, mask, 0.3, 4).squeeze(3)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask + causal, scale=0.3)
    assert torch.equal(got[0, :, 2], torch.zeros(2, 8)) and torch.allclose(got, want, atol=1e-6)
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(got.sum(), (q, k, v)))
    with pytest.raises(TypeError, match="additive float mask"):
        BlockedAttention.apply(q.unsqueeze(3), k, v, mask == 0, 0.3, 4)


def test_attention_without_a_mask_is_causal_at_an_offset_on_every_path(monkeypatch):
    """A chunk of T queries after S - T cached keys, mask None: query t sits at position S - T + t."""
    model = micro().eval()
    attn, x = model.layers[0].attn, torch.randn(2, 12, 32)
    positions = torch.arange(12).expand(2, 12)
    cos, sin = model.rope_cos[positions], model.rope_sin[positions]
    outs = []
    for _ in each_attention_kernel(monkeypatch):
        for impl in ("naive", "absorbed"):
            cache = model.new_cache(2, 12)[0]
            with torch.no_grad():
                attn(x[:, :4], cos[:, :4], sin[:, :4], None, cache, 0, impl)
                outs.append(attn(x[:, 4:], cos[:, 4:], sin[:, 4:], None, cache, 4, impl))
    with torch.no_grad():
        whole = attn(x, cos, sin, None)[:, 4:]
    assert all(torch.allclose(o, whole, atol=1e-5) for o in outs)


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_forward_and_gradients_match_on_every_attention_path(variant, monkeypatch):
    """Naive and absorbed (folded where that pays), each with `BlockedAttention` and with SDPA."""
    model = micro(**VARIANTS[variant])
    x = torch.randint(0, 64, (3, 20))
    key_mask = torch.ones(3, 20, dtype=torch.bool)
    key_mask[1, :6] = False  # left padding, as in the RL batches
    results = []
    for _ in each_attention_kernel(monkeypatch):
        for impl in ("naive", "absorbed"):
            model.zero_grad()
            out = model(x, x.roll(-1, 1), key_mask=key_mask, attn_impl=impl)
            out.loss.backward()
            results.append((out.logits, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    logits_a, grads_a = results[0]
    for logits_b, grads_b in results[1:]:
        assert torch.allclose(logits_a, logits_b, atol=1e-5)
        assert len(grads_a) == len(grads_b) and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads_a, grads_b))


@pytest.mark.parametrize("variant", VARIANTS)
def test_absorbed_attention_equals_naive(variant):
    model = micro(**VARIANTS[variant]).eval()
    randomise_biases(model)
    x = torch.randint(0, 64, (3, 24))
    naive, absorbed = model(x, attn_impl="naive").logits, model(x, attn_impl="absorbed").logits
    assert torch.allclose(naive, absorbed, atol=1e-5)


@pytest.mark.parametrize("impl", ["naive", "absorbed"])
def test_cached_decoding_equals_full_forward(impl):
    model = micro().eval()
    x = torch.randint(0, 64, (2, 20))
    full = model(x).logits
    cache = model.new_cache(2, 20)
    steps = [model(x[:, :5], cache=cache, attn_impl=impl).logits]
    steps += [model(x[:, t:t + 1], cache=cache, start_pos=t, attn_impl=impl).logits for t in range(5, 20)]
    assert torch.allclose(full, torch.cat(steps, dim=1), atol=1e-5)


@pytest.mark.parametrize("variant", ["v3", "v2", "v2 two shared experts", "many rows"])
def test_folded_decode_step_equals_the_absorbed_forward(variant):
    """Transformer.decode with the products multiplied out (MLA.fold, MoE.fold) is the same function
    as a cached forward step and writes the same cache; with rows too many for dense experts the
    MoE runs its own (grouped) forward."""
    overrides = {"v3": {}, "v2": VARIANTS["v2"], "many rows": {},
                 "v2 two shared experts": dict(VARIANTS["v2"], n_shared_experts=2)}[variant]
    model = micro(**overrides).eval()
    randomise_biases(model)
    if variant == "many rows":  # as if too many for one dense product
        for moe in model.moe_layers():
            moe.experts.dense_max_wasted_flops = 0
    B = 3
    x = torch.randint(0, 64, (B, 13))
    key_mask = torch.ones(B, 13, dtype=torch.bool)
    key_mask[0, :4] = False  # a left-padded row
    cache, folded_cache = model.new_cache(B, 13), model.new_cache(B, 13)
    with torch.no_grad():
        model(x[:, :12], key_mask=key_mask[:, :12], cache=cache, attn_impl="absorbed")
        model(x[:, :12], key_mask=key_mask[:, :12], cache=folded_cache, attn_impl="absorbed")
        step = model(x[:, 12:], key_mask=key_mask, cache=cache, start_pos=12, attn_impl="absorbed").logits[:, 0]
        layers, head = model.fold(B)
        assert all((f.w_ffn_in is None) == (variant == "many rows") for f in layers[1:])
        positions = key_mask.sum(dim=1) - 1
        cos, sin = model.decode_rope(positions.unsqueeze(1))                      # (B, 1, d_c + d_R)
        bias = torch.zeros(B, 1, 13).masked_fill_(~key_mask.unsqueeze(1), float("-inf"))
        folded = model.decode(x[:, 12], (layers, head), folded_cache, 12, (cos[:, 0], sin[:, 0]), bias)
    assert torch.allclose(folded, step, atol=1e-5)
    for c, f in zip(cache, folded_cache):
        assert torch.allclose(c.kv, f.kv, atol=1e-6) and torch.allclose(c.pe, f.pe, atol=1e-6)


def test_folded_decoding_runs_in_bf16_and_refuses_sharded_weights():
    # FSDP2 mixed precision gathers bf16 weights for rollouts: the folded step computes in bf16 too.
    model = micro(qk_nope_head_dim=32, v_head_dim=32).eval()
    assert model.folding_pays()
    prompts = [[5, 9, 13, 2], [3, 4]]
    fp32 = generate(model, prompts, 6, pad_id=0, temperature=0)
    bf16 = generate(model.to(torch.bfloat16), prompts, 6, pad_id=0, temperature=0)
    assert torch.equal(bf16.tokens[:, 0], fp32.tokens[:, 0])
    assert torch.allclose(bf16.logprobs[:, 0], fp32.logprobs[:, 0], atol=0.05)
    with pytest.raises(ValueError, match="fold=True"):
        generate(model, prompts, 6, pad_id=0, fold=True, sync_stop=True)


def test_folding_pays_for_tiny_but_not_for_full():
    # full: W^UK^T W^UQ (128 heads x 512 x 1536) is three times W^UQ; tiny's folds are smaller.
    assert Transformer(get_config("tiny")).folding_pays()
    assert not meta_model("full").folding_pays()
    # So tiny trains with the absorbed attention (d_c = d_h = d_v) and full with the naive one.
    assert absorbed_training_pays(get_config("tiny")) and not absorbed_training_pays(get_config("full"))
    tiny = Transformer(get_config("tiny"))
    assert all(layer.attn.absorbed_trains and layer.attn.fold_weights for layer in tiny.layers)


def test_chunked_prefill_equals_one_shot_prefill():
    model = micro().eval()
    x = torch.randint(0, 64, (2, 30))
    one_shot_cache = model.new_cache(2, 30)
    one_shot = model(x, cache=one_shot_cache, attn_impl="absorbed").logits
    cache = model.new_cache(2, 30)
    chunks = [model(x[:, a:b], cache=cache, start_pos=a, attn_impl="absorbed").logits
              for a, b in [(0, 7), (7, 19), (19, 30)]]
    assert torch.allclose(one_shot, torch.cat(chunks, dim=1), atol=1e-5)
    assert torch.allclose(one_shot_cache[0].kv, cache[0].kv, atol=1e-6)


def test_cache_holds_only_the_latent_and_the_rope_key():
    cfg = get_config("micro")
    cache = Transformer(cfg).new_cache(1, 10, dtype=torch.bfloat16)
    per_token = sum(c.kv.nbytes + c.pe.nbytes for c in cache) / 10
    assert per_token == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2 * cfg.n_layers
    full = get_config("full")
    assert (full.kv_lora_rank + full.qk_rope_head_dim) * 2 * full.n_layers == 70_272


def test_left_padding_gives_the_same_outputs_as_no_padding():
    model = micro().eval()
    x = torch.randint(0, 64, (1, 12))
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), x], dim=1)
    key_mask = torch.cat([torch.zeros(1, 5, dtype=torch.bool), torch.ones(1, 12, dtype=torch.bool)], dim=1)
    for impl in ("naive", "absorbed"):
        a = model(x, attn_impl=impl).logits
        b = model(padded, key_mask=key_mask, attn_impl=impl).logits[:, 5:]
        assert torch.isfinite(model(padded, key_mask=key_mask, attn_impl=impl).logits).all()
        assert torch.allclose(a, b, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# DeepSeekMoE routing

def moe_and_input(seed=0, n=64, **overrides):
    torch.manual_seed(seed)
    cfg = get_config("micro", **overrides)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return cfg, moe, torch.randn(n, cfg.dim)


def test_each_token_routes_to_k_distinct_experts():
    cfg, moe, x = moe_and_input()
    _, indices, _ = moe.gate(x)
    assert indices.shape == (64, cfg.n_activated_experts)
    assert all(len(set(row.tolist())) == cfg.n_activated_experts for row in indices)


def test_sigmoid_weights_sum_to_route_scale():
    cfg, moe, x = moe_and_input()
    weights, _, _ = moe.gate(x)
    assert torch.allclose(weights.sum(dim=-1), torch.full((64,), cfg.route_scale))


def test_softmax_weights_are_the_raw_affinities_times_route_scale():
    cfg, moe, x = moe_and_input(score_func="softmax", use_router_bias=False, route_scale=3.0)
    weights, indices, scores = moe.gate(x)
    assert torch.allclose(weights, 3.0 * scores.gather(1, indices))
    assert (weights.sum(dim=-1) < 3.0).all()


def test_bias_changes_selection_not_weights():
    _, moe, x = moe_and_input()
    w0, i0, s0 = moe.gate(x)
    moe.gate.bias[:] = torch.tensor([5.0, 5.0, 0, 0, 0, 0, 0, 0])  # favour experts 0 and 1 (group 0)
    w1, i1, s1 = moe.gate(x)
    assert not torch.equal(i0, i1)
    assert (i1.sort(dim=1).values == torch.tensor([0, 1])).all()
    assert torch.equal(s0, s1)
    renorm = s1.gather(1, i1) / s1.gather(1, i1).sum(dim=1, keepdim=True) * moe.gate.route_scale
    assert torch.allclose(w1, renorm)  # the weights come from s_i, the bias played no part


def test_group_limit_is_respected_even_when_every_score_plus_bias_is_negative():
    cfg, moe, x = moe_and_input()
    moe.gate.bias.fill_(-10.0)  # s + b < 0 everywhere: masking dropped groups with 0 would pick them
    _, indices, _ = moe.gate(x)
    per_group = cfg.n_routed_experts // cfg.n_expert_groups
    groups_used = [len(set((row // per_group).tolist())) for row in indices]
    assert max(groups_used) <= cfg.n_limited_groups


def test_group_limited_routing_picks_the_groups_with_the_best_top2_sum():
    cfg, moe, x = moe_and_input(n=1)
    scores = torch.tensor([[0.9, 0.1, 0.6, 0.6, 0.5, 0.5, 0.2, 0.95]])  # group sums 1.0, 1.2, 1.0, 1.15
    moe.gate.bias.copy_(scores[0] - 0.5)
    moe.gate.weight.data.zero_()  # sigmoid(0) = 0.5 for all, so s + b = scores
    _, indices, _ = moe.gate(x)
    assert set(indices[0].tolist()) <= {2, 3, 6, 7}  # groups 1 and 3
    assert set(indices[0].tolist()) == {7, 2} or set(indices[0].tolist()) == {7, 3}


def expert(experts, e, x):
    """Routed expert e on its own, as the official per-expert module computes it."""
    return F.linear(F.silu(F.linear(x, experts.w1[e])) * F.linear(x, experts.w3[e]), experts.w2[e])


def test_vectorised_dispatch_equals_a_per_token_loop():
    cfg, moe, x = moe_and_input()
    y, _ = moe(x.view(4, 16, -1))
    weights, indices, _ = moe.gate(x)
    expected = torch.stack([
        sum(w * expert(moe.experts, e, x[t]) for w, e in zip(weights[t], indices[t].tolist()))
        + moe.shared_experts(x[t]) for t in range(x.shape[0])])
    assert torch.allclose(y.view(-1, cfg.dim), expected, atol=1e-5)


@pytest.mark.parametrize("path", ["dense", "grouped"])
def test_stacked_experts_equal_a_per_expert_loop_in_values_and_gradients(path):
    cfg, moe, x = moe_and_input(n=24)
    weights = torch.rand(24, 2)
    indices = torch.stack([torch.randperm(4)[:2] for _ in range(24)])  # experts 4-7 receive no tokens
    indices[0] = torch.tensor([3, 0])
    params = [x, weights, moe.experts.w1, moe.experts.w2, moe.experts.w3]
    for p in params:
        p.requires_grad_(True)
    y = getattr(moe.experts, path)(x, weights, indices)
    expected = torch.zeros_like(x)
    for e in range(cfg.n_routed_experts):
        token, slot = (indices == e).nonzero(as_tuple=True)
        if len(token):
            expected = expected.index_add(0, token, weights[token, slot, None] * expert(moe.experts, e, x[token]))
    assert torch.allclose(y, expected, atol=1e-5)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, params, g)
    expected_grads = torch.autograd.grad(expected, params, g)
    for name, a, b in zip(["x", "weights", "w1", "w2", "w3"], grads, expected_grads):
        assert torch.allclose(a, b, atol=1e-5), name
    assert all((grad[4:] == 0).all() for grad in grads[2:])  # idle experts get zero gradient


def test_experts_run_dense_for_a_few_tokens_and_grouped_for_many():
    cfg, moe, _ = moe_and_input()
    calls = []
    for path in ("dense", "grouped"):
        setattr(moe.experts, path, lambda x, w, i, path=path: calls.append(path))
    per_token = 6 * (cfg.n_routed_experts - cfg.n_activated_experts) * cfg.dim * cfg.moe_inter_dim
    few = moe.experts.dense_max_wasted_flops // per_token
    for n in (1, few, few + 1, 4096):
        moe.experts(torch.zeros(n, cfg.dim), torch.zeros(n, 2), torch.zeros(n, 2, dtype=torch.long))
    assert calls == ["dense", "dense", "grouped", "grouped"]


def test_bias_update_lowers_an_overloaded_expert_and_raises_an_idle_one():
    _, moe, x = moe_and_input()
    moe.train()
    moe.gate.bias[:] = torch.tensor([3.0, 3.0, 0, 0, 0, 0, 0, 0])  # experts 0, 1 take every token
    moe(x.view(4, 16, -1))
    moe.update_bias(gamma=0.001)
    assert moe.gate.bias[0] == pytest.approx(3.0 - 0.001) and moe.gate.bias[1] == pytest.approx(3.0 - 0.001)
    assert (moe.gate.bias[2:] == 0.001).all()
    assert moe.expert_load.sum() == 0  # the load resets after each update


def test_bias_balancing_evens_out_the_load_over_steps():
    _, moe, x = moe_and_input()
    moe.train()
    moe.gate.bias[:] = torch.tensor([1.0, 1.0, 0, 0, 0, 0, 0, 0])
    loads = []
    for _ in range(300):
        moe(x.view(4, 16, -1))
        loads.append(moe.expert_load.clone())
        moe.update_bias(gamma=0.01)
    assert loads[-1].max() - loads[-1].min() < 0.5 * (loads[0].max() - loads[0].min())


def test_padding_tokens_do_not_count_as_expert_load():
    _, moe, x = moe_and_input()
    moe.train()
    mask = torch.zeros(4, 16, dtype=torch.bool)
    mask[:, :5] = True
    y, _ = moe(x.view(4, 16, -1), mask)
    assert moe.expert_load.sum() == 4 * 5 * 2
    assert (y[~mask] == 0).all()


def test_balance_loss_is_minimal_for_uniform_routing():
    E, K, T = 8, 2, 16
    seq_id = torch.zeros(T, dtype=torch.long)
    uniform_idx = torch.arange(T * K).view(T, K) % E
    uniform = sequence_balance_loss(torch.full((T, E), 0.5), uniform_idx, seq_id, 1, K)
    assert uniform.item() == pytest.approx(1.0)
    torch.manual_seed(0)
    for _ in range(20):
        scores = torch.rand(T, E)
        idx = scores.topk(K, dim=1).indices
        assert sequence_balance_loss(scores, idx, seq_id, 1, K) >= uniform - 1e-6


# ------------------------------------------------------------------------------------------------
# Training forward, MTP, learning

def test_loss_reports_next_token_mtp_and_balance_parts():
    model = micro().train()
    x = torch.randint(0, 64, (2, 16))
    out = model(x[:, :-1], x[:, 1:])
    assert set(out.parts) == {"ntp", "mtp", "balance"}
    expected = out.parts["ntp"] + model.cfg.mtp_lambda * out.parts["mtp"] + out.parts["balance"]
    assert torch.allclose(out.loss, expected)


@pytest.mark.parametrize("chunk", [1, 7, 16, 64])
def test_fused_head_loss_equals_cross_entropy_of_the_logits(chunk):
    """LinearCrossEntropy, chunks that do or do not divide the rows, ignored targets included."""
    torch.manual_seed(0)
    h = torch.randn(23, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 6, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (23,))
    targets[[0, 5, 6]] = -100
    got = LinearCrossEntropy.apply(h, weight, targets, chunk)
    want = F.cross_entropy(F.linear(h, weight), targets, ignore_index=-100)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    for a, b in zip(torch.autograd.grad(2.5 * got, (h, weight)), torch.autograd.grad(2.5 * want, (h, weight))):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *x: LinearCrossEntropy.apply(*x, targets, chunk), (h, weight))
    nothing = LinearCrossEntropy.apply(h, weight, torch.full((23,), -100), chunk)  # no target: 0, not 0/0
    assert nothing.item() == 0 and all(g.abs().max() == 0 for g in torch.autograd.grad(nothing, (h, weight)))


def test_training_loss_without_logits_equals_the_loss_with_them():
    model = micro().train()
    x = torch.randint(0, 64, (3, 17))
    targets = x[:, 1:].clone()
    targets[0, :5] = -100  # a prompt, as in SFT batches
    results = []
    for keep in (True, False):
        model.zero_grad()
        out = model(x[:, :-1], targets, logits=keep)
        out.loss.backward()
        results.append((out, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (kept, grads_a), (fused, grads_b) = results
    assert kept.logits.shape == (3, 16, 64) and fused.logits is None
    assert all(torch.allclose(kept.parts[k], fused.parts[k], atol=1e-6) for k in kept.parts)
    assert len(grads_a) == len(grads_b) and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads_a, grads_b))


def test_a_batch_without_targets_has_zero_loss_on_every_path():
    """Every target -100 (a rank whose rows are all prompt): 0, not the 0/0 of a plain mean."""
    model = micro().train()
    x = torch.randint(0, 64, (2, 9))
    nothing = torch.full((2, 9), -100)
    for grad, keep in ((True, True), (True, False), (False, False)):
        with torch.set_grad_enabled(grad):
            out = model(x, nothing, logits=keep)
        assert out.parts["ntp"].item() == 0 and out.parts["mtp"].item() == 0 and torch.isfinite(out.loss)


def test_mtp_is_not_run_at_inference():
    model = micro().eval()
    x = torch.randint(0, 64, (2, 16))
    before = model(x).logits
    for p in model.mtp.parameters():
        p.data.normal_()
    assert torch.equal(before, model(x).logits)


def test_mtp_depth_k_predicts_the_token_k_plus_one_ahead():
    # Depth 1 recomputed by hand: position i sees Emb(t_{i+1}) and predicts t_{i+2} = targets[i+1].
    model = micro(mtp_depth=2).train()
    x = torch.randint(0, 64, (2, 12))
    targets = x[:, 1:]
    out = model(x[:, :-1], targets)
    m = model.mtp[0]
    T = 11
    cos, sin = model.rope_cos[:T - 1].expand(2, -1, -1), model.rope_sin[:T - 1].expand(2, -1, -1)
    h = m.eh_proj(torch.cat([m.enorm(model.embed(x[:, 1:T])), m.hnorm(out.hidden[:, :T - 1])], dim=-1))
    h, _ = m.block(h, cos, sin, None)
    logits = model.head(m.norm(h))
    loss1 = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets[:, 1:].flatten())
    assert len(model.mtp) == 2 and torch.isfinite(out.parts["mtp"])
    assert loss1.item() == pytest.approx(_mtp_depth_losses(model, x)[0], rel=1e-5)


def _mtp_depth_losses(model, x):
    """Per-depth MTP losses through the model, by running with depth truncated."""
    depth = len(model.mtp)
    losses = []
    for k in range(1, depth + 1):
        keep = model.mtp
        model.mtp = keep[:k]
        cumulative = model(x[:, :-1], x[:, 1:]).parts["mtp"].item() * k
        model.mtp = keep
        losses.append(cumulative - sum(losses))
    return losses


def test_micro_model_overfits_a_fixed_batch():
    model = micro(seed=1).train()
    torch.manual_seed(1)
    x = torch.randint(0, 64, (4, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(150):
        out = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        model.update_router_biases()
        first = first if first is not None else out.loss.item()
    assert out.loss.item() < 0.1 * first
    assert out.parts["mtp"].item() < 0.2 * math.log(64) and out.parts["balance"].item() > 0


# ------------------------------------------------------------------------------------------------
# Generation

@pytest.mark.parametrize("fold", [False, True])
def test_padded_batch_generation_equals_one_prompt_at_a_time(fold):
    model = micro().eval()
    prompts = [[5, 9, 13, 2, 7, 1, 30], [3, 4], [60, 61, 62, 63]]
    batch = generate(model, prompts, 10, pad_id=0, temperature=0, fold=fold)
    for b, p in enumerate(prompts):
        alone = generate(model, [p], 10, pad_id=0, temperature=0, fold=not fold)
        assert torch.equal(batch.tokens[b], alone.tokens[0])
        assert torch.allclose(batch.logprobs[b], alone.logprobs[0], atol=1e-5)


@pytest.mark.parametrize("fold", [False, True])
def test_sampled_logprobs_equal_the_training_forward(fold):
    model = micro().eval()
    g = generate(model, [[5, 9, 13], [3, 4, 8, 9, 10]], 12, pad_id=0, temperature=0.7, top_p=0.9,
                 generator=torch.Generator().manual_seed(0), fold=fold)
    tokens = torch.cat([g.prompt_tokens, g.tokens], dim=1)
    key_mask = torch.cat([g.prompt_mask, g.mask], dim=1)
    P = g.prompt_tokens.shape[1]
    logits = model(tokens, key_mask=key_mask).logits[:, P - 1:-1] / 0.7
    lp = logits.log_softmax(-1).gather(2, g.tokens.unsqueeze(2)).squeeze(2)
    assert torch.allclose(lp * g.mask, g.logprobs, atol=1e-5)


def test_stop_tokens_end_a_row_and_mask_what_follows():
    model = micro().eval()
    g = generate(model, [[1, 2, 3]] * 8, 20, pad_id=0, stop_ids=(7, 11), temperature=1.5,
                 generator=torch.Generator().manual_seed(3))
    for b in range(8):
        n = int(g.mask[b].sum())
        row = g.tokens[b].tolist()
        stopped_at = next((i for i, t in enumerate(row[:n]) if t in (7, 11)), None)
        assert bool(g.stopped[b]) == (stopped_at is not None)
        assert n == (stopped_at + 1 if stopped_at is not None else 20)
        assert all(t == 0 for t in row[n:]) and (g.logprobs[b, n:] == 0).all()
    assert g.stopped.any()


def test_generation_is_reproducible_with_a_seeded_generator():
    model = micro().eval()
    run = [generate(model, [[1, 2, 3]] * 4, 10, pad_id=0, generator=torch.Generator().manual_seed(42)).tokens
           for _ in range(2)]
    assert torch.equal(run[0], run[1])


def test_top_k_and_top_p_restrict_the_sampled_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(2000, 1)
    gen = torch.Generator().manual_seed(0)
    ids, _ = sample_token(logits, 1.0, 1.0, 2, gen)
    assert set(ids.tolist()) == {0, 1}
    probs = torch.softmax(logits[0], 0)  # 0.636, 0.234, 0.086, ...: top-p 0.8 keeps the first two
    ids, lp = sample_token(logits, 1.0, 0.8, 0, gen)
    assert set(ids.tolist()) == {0, 1}
    assert torch.allclose(lp, probs.log()[ids])  # log-probs of the untruncated policy
    ids, _ = sample_token(logits, 0.0, 1.0, 0, gen)
    assert (ids == 0).all()


def test_sampled_frequencies_follow_the_policy():
    # Inverse-CDF sampling: token frequencies match softmax(logits / T) within 4 standard errors,
    # and a token with zero probability after top-k is never drawn.
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0, 0.5]]).repeat(40_000, 1)
    probs = torch.softmax(logits[0] / 0.8, 0)
    ids, _ = sample_token(logits, 0.8, 1.0, 0, torch.Generator().manual_seed(0))
    freq = torch.bincount(ids, minlength=6).double() / len(ids)
    assert ((freq - probs.double()).abs() <= 4 * (probs.double() * (1 - probs.double()) / len(ids)).sqrt() + 1e-9).all()
    ids, _ = sample_token(logits, 1.0, 1.0, 5, torch.Generator().manual_seed(1))
    assert 4 not in ids.tolist() and set(ids.tolist()) == {0, 1, 2, 3, 5}


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_sampling_refuses_non_finite_logits(bad):
    logits = torch.zeros(3, 5)
    logits[1, 2] = bad
    with pytest.raises(ValueError, match="NaN"):
        sample_token(logits, 1.0, 1.0, 0)
    with pytest.raises(ValueError, match="NaN"):
        sample_token(torch.full((2, 5), float("-inf")), 1.0, 1.0, 0)


def test_generate_folds_the_weights_where_it_pays():
    calls = []
    for name in ("tiny", "micro"):  # micro's folded W^O W^UV would be larger than W^O and W^UV
        model = micro() if name == "micro" else Transformer(get_config("tiny"))
        model.fold = lambda n, fold=model.fold, name=name: calls.append(name) or fold(n)
        generate(model.eval(), [[1, 2, 3]], 3, pad_id=0)
    assert calls == ["tiny"]


def test_generate_rejects_empty_prompts():
    model = micro()
    with pytest.raises(ValueError):
        generate(model, [[1], []], 4, pad_id=0)
    with pytest.raises(ValueError):
        generate(model, [[1]], 0, pad_id=0)


def test_meta_model_materialises_with_init_weights():
    with torch.device("meta"):
        model = Transformer(get_config("micro"))
    model.to_empty(device="cpu")
    model.init_weights()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.isfinite(model(torch.randint(0, 64, (1, 8))).logits).all()


def test_config_is_a_plain_dataclass_with_documented_presets():
    for name in ("full", "236B", "16B", "tiny", "micro"):
        assert isinstance(get_config(name), ModelConfig)


def test_a_batch_of_padding_only_routes_nothing():
    _, moe, x = moe_and_input()
    y, aux = moe(x.view(4, 16, -1), torch.zeros(4, 16, dtype=torch.bool))
    assert (y == 0).all() and aux == 0


def test_repeated_prompts_are_prefilled_once_with_the_same_outputs():
    model = micro().eval()
    a, b = [5, 9, 13, 2, 7, 1, 30], [3, 4]
    prompts = [a, b, a, a, b]
    batch_sizes = []
    hook = model.embed.register_forward_hook(lambda m, inp, out: batch_sizes.append(out.shape[0]))
    greedy = generate(model, prompts, 10, pad_id=0, temperature=0)
    hook.remove()
    assert batch_sizes[0] == 2 and set(batch_sizes[1:]) == {5}  # prefill on the 2 distinct prompts only
    for row, p in enumerate(prompts):
        alone = generate(model, [p], 10, pad_id=0, temperature=0)
        assert torch.equal(greedy.tokens[row], alone.tokens[0])
        assert torch.allclose(greedy.logprobs[row], alone.logprobs[0], atol=1e-5)
    g = generate(model, prompts, 12, pad_id=0, temperature=0.7, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(g.tokens[0], g.tokens[2])  # the copies sample independently
    P = g.prompt_tokens.shape[1]
    logits = model(torch.cat([g.prompt_tokens, g.tokens], dim=1),
                   key_mask=torch.cat([g.prompt_mask, g.mask], dim=1)).logits[:, P - 1:-1] / 0.7
    lp = logits.log_softmax(-1).gather(2, g.tokens.unsqueeze(2)).squeeze(2)
    assert torch.allclose(lp * g.mask, g.logprobs, atol=1e-5)
