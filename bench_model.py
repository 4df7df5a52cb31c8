"""Benchmark of model.py against transformers' DeepseekV3ForCausalLM: one run, one machine, one config.

Both models are the `--size` preset (default tiny) in fp32 with our weights (saved by hf.py, loaded
by `from_pretrained`; the logits are compared first).
- training tokens/s: forward + backward + AdamW on one random (B, T) batch; ours with MTP off (like for
  like) and on, transformers with each attention x experts implementation, the fastest the baseline;
  with the minor page faults of a step, and one profiled step of ours and of the baseline;
- sampling tokens/s: B prompts, N new tokens, temperature 1, no stop token; our latent-cache
  `generate` (folded decode step where it pays, the default, and not folded) against transformers'
  `generate` with its DynamicCache;
- KV-cache bytes per token against the MLA minimum (kv_lora_rank + qk_rope_head_dim) * bytes * layers;
- MFU: FLOPs per token (`train_flops_per_token`) x tokens/s over an fp32 matmul peak timed in the run;
- our routed experts' two paths (`Experts.dense`, `Experts.grouped`) by token count, which places
  the switch between them (`Experts.dense_max_wasted_flops`);
- causal attention of one layer, `BlockedAttention` (what MLA.forward runs on CPU) with the naive and
  the absorbed path's shapes, against SDPA.
Each repetition runs every variant once, alternating the order, and figures are medians, so ratios
stay fair on a shared machine (the load average is printed). One torch thread by default (a second
waits on cores that others hold), and then speeds are per CPU-second of this process, which other
processes barely disturb; wall-clock speeds are printed beside them.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
import transformers

from hf import config_to_hf, save_hf_checkpoint
from model import (ATTENTION_BLOCK, BlockedAttention, ModelConfig, Transformer, absorbed_training_pays,
                   count_parameters, generate, get_config)

HF_ATTENTION = ("sdpa", "eager")          # transformers' default is sdpa
HF_EXPERTS = ("grouped_mm", "eager")      # transformers' default is grouped_mm where torch has it
TARGETS = {"training": 1.5, "sampling": 3.0}


# -------------------------------------------------------------------------------------------------
# Timing

CLOCKS = ("cpu", "wall")


def interleaved(runs: dict[str, Callable[[], object]], reps: int, warmup: int) -> dict[str, dict[str, list]]:
    """CPU and wall-clock seconds per call of each run, and the minor page faults it took (memory the
    allocator got back from the OS, which the kernel zeroes on first touch): each repetition calls
    every run once, reversing the order on alternate repetitions so that no run always follows the
    same neighbour."""
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    times = {name: {clock: [] for clock in (*CLOCKS, "page_faults")} for name in runs}
    for rep in range(reps):
        for name in (list(runs) if rep % 2 == 0 else list(reversed(runs))):
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            cpu, wall = time.process_time(), time.perf_counter()
            runs[name]()
            times[name]["cpu"].append(time.process_time() - cpu)
            times[name]["wall"].append(time.perf_counter() - wall)
            times[name]["page_faults"].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
    return times


def medians(times: dict[str, list]) -> dict[str, float]:
    return {clock: statistics.median(times[clock]) for clock in CLOCKS}


def matmul(n: int) -> tuple[Callable[[], object], float]:
    """An fp32 (n, n) @ (n, n) product and its FLOPs: the peak MFU is measured against."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return (lambda: a @ b), 2.0 * n ** 3


def load_avg() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


# -------------------------------------------------------------------------------------------------
# FLOPs and cache sizes

def train_flops_per_token(cfg: ModelConfig, counts: dict[str, int], seq_len: int, mtp: bool) -> float:
    """Training FLOPs per token, forward + backward, in the PaLM (appendix B) convention.

    6 N for the N active parameters a token multiplies (the embedding is a lookup, not counted; the
    head is), plus 6 H (d_qk + d_v) T per attention layer for the scores q.k over T keys and the
    weighted sum of values, counting the causally masked half as PaLM and nanoGPT do. With MTP each
    depth k adds its module (its block, eh_proj, and the shared head once more) on T - k tokens.
    """
    attention = 6 * cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len
    flops = 6 * (counts["active"] - counts["embedding"]) + cfg.n_layers * attention
    if mtp and cfg.mtp_depth:
        idle = 3 * cfg.dim * cfg.moe_inter_dim * (cfg.n_routed_experts - cfg.n_activated_experts)
        module = counts["mtp"] / cfg.mtp_depth - idle + cfg.dim * cfg.vocab_size
        for k in range(1, cfg.mtp_depth + 1):
            flops += (6 * module + attention) * max(seq_len - k, 0) / seq_len
    return flops


def weight_product_flops(cfg: ModelConfig, counts: dict[str, int], tokens: int, ours: bool) -> float:
    """FLOPs of a training step's products with the weights, 6 N per token, less wkv_b's for our model
    where it trains with the absorbed attention (`absorbed_training_pays`), which never multiplies the
    latents by wkv_b. The products that fold wkv_b into the other weights run once a step, not once
    a token, and are left out."""
    flops = 6 * (counts["active"] - counts["embedding"]) * tokens
    if ours and absorbed_training_pays(cfg):
        flops -= 6 * cfg.n_layers * cfg.kv_lora_rank * cfg.n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim) * tokens
    return flops


def mla_minimum_bytes(cfg: ModelConfig, bytes_per_value: int) -> int:
    """Cache bytes per token of MLA: the latent c^KV and the shared rotated key k^R, every layer."""
    return (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * bytes_per_value * cfg.n_layers


def mha_bytes(cfg: ModelConfig, bytes_per_value: int) -> int:
    """Cache bytes per token of plain multi-head attention over the same heads: every K and V."""
    return cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim) * bytes_per_value * cfg.n_layers


def hf_cache_bytes_per_token(cache) -> float:
    """Bytes per cached token over every tensor a transformers DynamicCache holds."""
    total, tokens = 0, None
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            total += t.numel() * t.element_size()
        tokens = layer.keys.shape[0] * layer.get_seq_length()
    return total / tokens


# -------------------------------------------------------------------------------------------------
# Where a training step's time goes

OP_KINDS = {  # torch.profiler operator names by kind; anything else is "the rest"
    "mm": ("aten::mm", "aten::addmm", "aten::addmm_", "aten::_grouped_mm"),
    "bmm": ("aten::bmm", "aten::baddbmm"),
    "SDPA kernels": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                     "aten::_scaled_dot_product_flash_attention_for_cpu_backward"),
    "softmax, log-softmax": ("aten::_softmax", "aten::_softmax_backward_data", "aten::_log_softmax",
                             "aten::_log_softmax_backward_data"),
}


def time_by_kind(step: Callable[[], object]) -> dict[str, float]:
    """Self CPU seconds of one call of step by kind of operator (OP_KINDS), and the number of operator
    calls. The profiler adds a little to every call, so "the rest" (many small calls) reads high."""
    with torch.profiler.profile() as prof:
        step()
    seconds = dict.fromkeys([*OP_KINDS, "the rest"], 0.0)
    calls = 0
    for event in prof.key_averages():
        kind = next((k for k, names in OP_KINDS.items() if event.key in names), "the rest")
        seconds[kind] += event.self_cpu_time_total / 1e6
        calls += event.count
    return {**seconds, "total": sum(seconds.values()), "calls": calls}


# -------------------------------------------------------------------------------------------------
# The benchmark

def bench_experts(model: Transformer, reps: int) -> dict:
    """Seconds per call of one MoE layer's routed experts, `dense` against `grouped`, by token count,
    and the most tokens `Experts.forward` sends to `dense`."""
    experts = model.moe_layers()[0].experts
    E, inter, D = experts.w1.shape
    K = model.cfg.n_activated_experts
    by_tokens = {}
    for n in (4, 8, 16, 32, 64, 128):
        x, weights = torch.randn(n, D), torch.rand(n, K)
        indices = torch.rand(n, E).topk(K, dim=1).indices
        runs = {path: partial(getattr(experts, path), x, weights, indices) for path in ("dense", "grouped")}
        with torch.inference_mode():
            times = interleaved(runs, reps=reps, warmup=3)
        by_tokens[n] = {path: medians(times[path]) for path in runs}
    return {"by_tokens": by_tokens, "dense_up_to": experts.dense_max_wasted_flops // (6 * (E - K) * inter * D)}


def bench_attention(cfg: ModelConfig, batch: int, seq: int, reps: int) -> dict:
    """Seconds of forward + backward of one layer's causal attention, at the training shape and at other
    (batch, length) pairs with the same number of tokens: `model.BlockedAttention` with the naive
    path's per-head keys and values, with the absorbed path's one latent key [c; k^R] (values c)
    shared by every head, and SDPA with the naive shapes (v padded to the q/k head dim, as
    MLA.forward does)."""
    H, d, d_v, scale = cfg.n_heads, cfg.qk_head_dim, cfg.v_head_dim, cfg.softmax_scale
    d_c, d_R = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    by_shape = {}
    for B, T in ((batch * 4, seq // 4), (batch, seq), (max(batch // 4, 1), seq * 4)):
        q, k = torch.randn(B, H, T, d, requires_grad=True), torch.randn(B, H, T, d, requires_grad=True)
        v = torch.randn(B, H, T, d_v, requires_grad=True)
        q_c = torch.randn(B, 1, T, H, d_c + d_R, requires_grad=True)
        k_c = torch.randn(B, 1, T, d_c + d_R, requires_grad=True)

        def naive():
            BlockedAttention.apply(q.unsqueeze(3), k, v, None, scale, ATTENTION_BLOCK).sum().backward()

        def absorbed():
            BlockedAttention.apply(q_c, k_c, k_c[..., :d_c], None, scale, ATTENTION_BLOCK).sum().backward()

        def sdpa():
            F.scaled_dot_product_attention(q, k, F.pad(v, (0, d - d_v)), is_causal=True,
                                           scale=scale)[..., :d_v].sum().backward()
        times = interleaved({"blocked, naive": naive, "blocked, absorbed": absorbed, "SDPA, naive": sdpa},
                            reps=reps, warmup=2)
        by_shape[f"{B} x {T}"] = {name: medians(t) for name, t in times.items()}
    return by_shape


def build_hf_variants(model: Transformer, tmp: str) -> dict[str, torch.nn.Module]:
    """transformers' DeepseekV3ForCausalLM with our config and weights, for every attention x experts
    implementation."""
    transformers.logging.set_verbosity_error()  # the MTP layer in the checkpoint is "unexpected" to it
    transformers.utils.logging.disable_progress_bar()
    config = transformers.DeepseekV3Config(**config_to_hf(model.cfg))
    path = save_hf_checkpoint(model, os.path.join(tmp, "checkpoint"))
    variants = {}
    for attention in HF_ATTENTION:
        for experts in HF_EXPERTS:
            hf = transformers.DeepseekV3ForCausalLM.from_pretrained(
                path, config=copy.deepcopy(config), dtype=torch.float32, attn_implementation=attention,
                experts_implementation=experts)
            hf.generation_config.eos_token_id = None  # every row samples exactly N tokens, as ours does
            variants[f"transformers {attention} attn, {experts} experts"] = hf
    return variants


def bench(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = get_config(args.size)
    B, T, N, P = args.batch, args.seq, args.new_tokens, args.prompt_len
    torch.manual_seed(args.seed)
    ours = Transformer(cfg)
    counts = count_parameters(ours)
    report = {
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "load_before": load_avg()},
        # Per CPU-second only with one thread: more threads also count their time spent waiting.
        "clock": "cpu" if torch.get_num_threads() == 1 else "wall",
        "config": {"size": args.size, "batch": B, "seq": T, "prompt_len": P, "new_tokens": N,
                   "steps": args.steps, "sample_reps": args.sample_reps, "expert_reps": args.expert_reps,
                   "attention_reps": args.attention_reps,
                   **counts},
    }
    report["machine"]["transformers"] = transformers.__version__
    with tempfile.TemporaryDirectory() as tmp:
        hf_models = build_hf_variants(ours, tmp)

    # The same function: our logits against transformers' on one batch.
    probe = torch.randint(0, cfg.vocab_size, (2, min(T, 64)))
    ours.eval()
    with torch.no_grad():
        ref = ours(probe).logits
        report["max_logit_diff"] = max((hf(input_ids=probe).logits - ref).abs().max().item()
                                       for hf in hf_models.values())

    # Training: forward + backward + AdamW on one (B, T) batch, each model with its own optimizer.
    ids = torch.randint(0, cfg.vocab_size, (B, T + 1))
    inputs, targets = ids[:, :T], ids[:, 1:]
    runs = {}
    for mtp in (False, True):
        model = copy.deepcopy(ours).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def step(model=model, opt=opt, mtp=mtp):
            model(inputs, targets, mtp=mtp, logits=False).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            model.update_router_biases()
        runs[f"ours, MTP {'on' if mtp else 'off'}"] = step
    for name, hf in hf_models.items():
        hf.train()
        opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=True)

        def step(hf=hf, opt=opt):
            hf(input_ids=inputs, labels=inputs).loss.backward()  # transformers shifts the labels itself
            opt.step()
            opt.zero_grad(set_to_none=True)
        runs[name] = step
    peak_runs = {f"matmul {n}": matmul(n) for n in (1024, 2048)}
    runs.update({name: fn for name, (fn, _) in peak_runs.items()})
    times = interleaved(runs, reps=args.steps, warmup=1)
    peak = {clock: max(flops / medians(times[name])[clock] for name, (_, flops) in peak_runs.items())
            for clock in CLOCKS}
    report["matmul_peak_flops"] = peak
    training = {}
    for name in runs:
        if name in peak_runs:
            continue
        seconds = medians(times[name])
        flops = train_flops_per_token(cfg, counts, T, mtp=name == "ours, MTP on")
        rate = {clock: B * T / seconds[clock] for clock in CLOCKS}
        training[name] = {"seconds_per_step": seconds, "tokens_per_s": rate, "flops_per_token": flops,
                          "mfu": {clock: rate[clock] * flops / peak[clock] for clock in CLOCKS},
                          "page_faults": statistics.median(times[name]["page_faults"]),
                          "all_seconds": times[name]}
    report["training"] = training
    # One profiled step of ours (MTP off) and of the fastest transformers variant: what each spends on
    # the weight products, on attention, and on everything else.
    fastest = max((k for k in training if not k.startswith("ours")), key=lambda k: training[k]["tokens_per_s"][report["clock"]])
    profiled = ("ours, MTP off", fastest)
    report["training_profile"] = {"steps": {name: time_by_kind(runs[name]) for name in profiled},
                                  "mm_flops": {name: weight_product_flops(cfg, counts, B * T, name.startswith("ours"))
                                               for name in profiled}}

    # Sampling: same prompts, N new tokens each, temperature 1, no stop token.
    prompts = torch.randint(2, cfg.vocab_size, (B, P))
    ours.eval()
    sampled = {}

    def ours_sample(n=N, fold=None):
        out = generate(ours, prompts.tolist(), n, pad_id=0, temperature=1.0, fold=fold)
        sampled["ours"] = int(out.lengths.sum())

    def hf_sample(hf, name, n=N):
        hf.eval()
        out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n,
                          min_new_tokens=n, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                          use_cache=True, pad_token_id=0, return_dict_in_generate=True)
        sampled[name] = (out.sequences.shape[1] - P) * B
        sampled[name + " cache"] = out.past_key_values

    runs = {"ours, latent cache": ours_sample,
            "ours, latent cache, not folded": partial(ours_sample, fold=False)}
    runs.update({name: (lambda hf=hf, name=name: hf_sample(hf, name)) for name, hf in hf_models.items()})
    ours_sample(8)  # warm up on short runs
    ours_sample(8, fold=False)
    for name, hf in hf_models.items():
        hf_sample(hf, name, 8)
    times = interleaved(runs, reps=args.sample_reps, warmup=0)
    sampling = {}
    for name in runs:
        count = sampled["ours" if name.startswith("ours") else name]
        if count != B * N:
            raise RuntimeError(f"{name} sampled {count} tokens, expected {B * N}")
        seconds = medians(times[name])
        sampling[name] = {"seconds": seconds, "tokens_per_s": {c: B * N / seconds[c] for c in CLOCKS},
                          "all_seconds": times[name]}
    report["sampling"] = sampling

    # KV-cache bytes per token: what our generate allocates (new_cache) against the MLA minimum.
    bytes_per_value = ours.embed.weight.element_size()
    cache = ours.new_cache(B, P + N)
    ours_bytes = sum(c.kv.nbytes + c.pe.nbytes for c in cache) / (B * (P + N))
    hf_bytes = {name: hf_cache_bytes_per_token(sampled[name + " cache"]) for name in hf_models}
    full = get_config("full")
    report["kv_cache"] = {
        "ours": ours_bytes, "mla_minimum": mla_minimum_bytes(cfg, bytes_per_value),
        "mha": mha_bytes(cfg, bytes_per_value), "transformers": max(hf_bytes.values()),
        "full_bf16_mla_minimum": mla_minimum_bytes(full, 2),
        "full_bf16_mha_per_layer": mha_bytes(full, 2) // full.n_layers,
        "full_bf16_mha": mha_bytes(full, 2),
    }

    def ratio(results, ours_name, clock):
        """Ours against the fastest transformers variant."""
        best = max(v["tokens_per_s"][clock] for k, v in results.items() if not k.startswith("ours"))
        return results[ours_name]["tokens_per_s"][clock] / best

    report["ratios"] = {clock: {"training": ratio(training, "ours, MTP off", clock),
                                "training_with_mtp": ratio(training, "ours, MTP on", clock),
                                "sampling": ratio(sampling, "ours, latent cache", clock)}
                        for clock in CLOCKS}
    primary = report["ratios"][report["clock"]]
    report["targets_met"] = {
        "training": primary["training"] >= TARGETS["training"],
        "sampling": primary["sampling"] >= TARGETS["sampling"],
        "kv_cache": ours_bytes == report["kv_cache"]["mla_minimum"],
    }
    report["experts"] = bench_experts(ours, reps=args.expert_reps)
    report["attention"] = bench_attention(cfg, B, T, reps=args.attention_reps)
    report["machine"]["load_after"] = load_avg()
    return report


def print_report(r: dict):
    m, c, clock = r["machine"], r["config"], r["clock"]
    other = "wall" if clock == "cpu" else "cpu"
    unit = {"cpu": "CPU s", "wall": "wall s"}
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['threads']} torch threads; torch {m['torch']}, "
          f"transformers {m['transformers']}")
    print(f"load average (1/5/15 min): {m['load_before']} before, {m['load_after']} after")
    if m["threads"] > 1 and float(m["load_before"].split("/")[0]) + m["threads"] > m["cores"]:
        print(f"warning: {m['threads']} threads on a machine this busy wait on each other; "
              "absolute speeds and MFU are low and noisy (try --threads 1)")
    print(f"config {c['size']}: {c['total']:,} parameters, {c['active']:,} active per token, "
          f"MTP {c['mtp']:,}; fp32; batch {c['batch']} x {c['seq']} tokens")
    print(f"same function: max |logits ours - transformers| = {r['max_logit_diff']:.2e} "
          f"(config by hf.config_to_hf, weights by hf.save_hf_checkpoint)")
    print(f"speeds per {unit[clock]} (the targets' clock), per {unit[other]} beside them")
    print()
    print(f"training: forward + backward + AdamW, median of {c['steps']} interleaved steps; fp32 matmul "
          f"peak {r['matmul_peak_flops'][clock] / 1e9:.1f} GFLOP per {unit[clock]} "
          f"({r['matmul_peak_flops'][other] / 1e9:.1f} per {unit[other]})")
    print(f"  {'variant':<46} {unit[clock]:>8} {'tokens/s':>9} {'MFU':>6} {unit[other]:>8} {'tokens/s':>9} "
          f"{'GFLOP/tok':>10} {'page faults':>12}")
    for name, v in r["training"].items():
        s, rate = v["seconds_per_step"], v["tokens_per_s"]
        print(f"  {name:<46} {s[clock]:>8.3f} {rate[clock]:>9,.0f} {v['mfu'][clock]:>6.1%} {s[other]:>8.3f} "
              f"{rate[other]:>9,.0f} {v['flops_per_token'] / 1e9:>10.5f} {v['page_faults']:>12,.0f}")
    steps, mm_flops = r["training_profile"]["steps"], r["training_profile"]["mm_flops"]
    calls = " and ".join(f"{s['calls']:,}" for s in steps.values())
    print(f"  one profiled step each, self CPU ms by operator ({calls} operator calls; profiling inflates "
          "small calls):")
    print(f"    {'':<22}" + "".join(f"{name:>46}" for name in steps))
    for kind in [*OP_KINDS, "the rest", "total"]:
        cells = ""
        for name, s in steps.items():
            rate = f" ({mm_flops[name] / s[kind] / 1e9:.0f} GFLOP/s)" if kind == "mm" and s[kind] else ""
            cells += f"{f'{s[kind] * 1e3:,.0f}{rate}':>46}"
        print(f"    {kind:<22}" + cells)
    print()
    print(f"sampling: {c['batch']} prompts x {c['prompt_len']} tokens, {c['new_tokens']} new tokens, "
          f"temperature 1, median of {c['sample_reps']} interleaved runs")
    print(f"  {'variant':<46} {unit[clock]:>8} {'tokens/s':>9} {unit[other]:>8} {'tokens/s':>9}")
    for name, v in r["sampling"].items():
        s, rate = v["seconds"], v["tokens_per_s"]
        print(f"  {name:<46} {s[clock]:>8.2f} {rate[clock]:>9,.1f} {s[other]:>8.2f} {rate[other]:>9,.1f}")
    print()
    k = r["kv_cache"]
    print("KV cache, bytes per token (all layers):")
    print(f"  ours (new_cache, as generate allocates it)  {k['ours']:>12,.0f}")
    print(f"  MLA minimum (kv_lora_rank + qk_rope) * L    {k['mla_minimum']:>12,}")
    print(f"  transformers DynamicCache after generate    {k['transformers']:>12,.0f}")
    print(f"  full K/V of the same heads (plain MHA)      {k['mha']:>12,}")
    print(f"  full config, bf16: MLA {k['full_bf16_mla_minimum']:,} for 61 layers; plain MHA "
          f"{k['full_bf16_mha_per_layer']:,} per layer, {k['full_bf16_mha']:,} for 61 layers")
    print()
    ratios, alt, met = r["ratios"][clock], r["ratios"][other], r["targets_met"]
    print(f"targets (ours / fastest transformers variant, per {unit[clock]}; per {unit[other]} in brackets):")
    for part in ("training", "sampling"):
        extra = (f"; with MTP on {ratios['training_with_mtp']:.2f}x ({alt['training_with_mtp']:.2f}x)"
                 if part == "training" else "")
        print(f"  {part:<9} {ratios[part]:.2f}x ({alt[part]:.2f}x), target >= {TARGETS[part]}x: "
              f"{'met' if met[part] else 'MISSED'}{extra}")
    print(f"  KV cache  {k['ours']:,.0f} bytes per token, minimum {k['mla_minimum']:,}: "
          f"{'met' if met['kv_cache'] else 'MISSED'}")
    print()
    e = r["experts"]
    print(f"our routed experts, one MoE layer, us per call ({unit[clock]}; median of {c['expert_reps']}); "
          f"Experts.forward runs dense up to {e['dense_up_to']} tokens:")
    print("  tokens   " + "".join(f"{n:>8}" for n in e["by_tokens"]))
    for path in ("dense", "grouped"):
        print(f"  {path:<8} " + "".join(f"{v[path][clock] * 1e6:>8,.0f}" for v in e["by_tokens"].values()))
    print()
    a = r["attention"]
    print(f"causal attention of one layer, forward + backward, ms per call ({unit[clock]}; median of "
          f"{c['attention_reps']}), by batch x length:")
    print(f"  {'':<18}" + "".join(f"{shape:>12}" for shape in a))
    for name in next(iter(a.values())):
        print(f"  {name:<18}" + "".join(f"{v[name][clock] * 1e3:>12,.1f}" for v in a.values()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny", help="model preset (model.PRESETS)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per training step and prompts")
    parser.add_argument("--seq", type=int, default=256, help="training sequence length")
    parser.add_argument("--prompt-len", type=int, default=32, help="tokens per prompt")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens sampled per prompt")
    parser.add_argument("--steps", type=int, default=7, help="timed training steps per variant")
    parser.add_argument("--sample-reps", type=int, default=9, help="timed generate calls per variant")
    parser.add_argument("--expert-reps", type=int, default=50, help="timed calls per routed-experts path")
    parser.add_argument("--attention-reps", type=int, default=10, help="timed calls per attention kernel")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()
    report = bench(args)
    print_report(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
