"""Hugging Face format: DeepSeek-V3 / R1 checkpoints and tokenizers in and out of model.py.

R1 trains from DeepSeek-V3-Base, released in this format; a model trained here goes back out in it.
- config.json <-> ModelConfig for `deepseek_v3` (sigmoid routing, router bias, MTP) and `deepseek_v2`
  (softmax routing); a field model.py cannot compute is an error naming it.
- Sharded safetensors, renamed per tensor (official names <-> `model.layers.N.self_attn...`) and read
  one tensor at a time into a model built on the meta device (all of it, or what `keep` selects);
  block-FP8 weights are dequantised on load; MTP module k is `model.layers.{n_layers + k - 1}`; the
  routed experts, stacked in model.py (`experts.w1` of shape (N_r, inter, dim)), are one tensor per
  expert in the checkpoint (`experts.{e}.gate_proj.weight`): split on save, stacked on load.
- A byte-level BPE tokenizer.json as a `tiktoken.Encoding`, and DeepSeek-R1's chat format.
Choices: every checkpoint problem (missing, unexpected, mis-shaped tensors, a truncated file) is
reported at once before a tensor is read; the MTP layer's copies of the embedding and head are only
shape-checked on load and written as copies on save; a sigmoid model without router bias is saved
with a zero bias; only interleaved RoPE and YaRN with mscale == mscale_all_dim are accepted, which
covers every released V2 / V3 / R1 config.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path

import tiktoken
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from model import MoE, ModelConfig, Transformer, rope_tables

INDEX = "model.safetensors.index.json"
FP8_BLOCK = (128, 128)  # DeepSeek's released block size, used when the config does not state one
FP8_DTYPES = {"F8_E4M3": torch.float8_e4m3fn}
FLOAT_DTYPES = {"F32", "BF16", "F16"}


class CheckpointError(ValueError):
    """A checkpoint, its config or a tokenizer file that model.py cannot load exactly."""


def _listing(title: str, items: list[str], limit: int = 20) -> str:
    shown = "\n".join(f"  {item}" for item in items[:limit])
    more = f"\n  ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"{title} ({len(items)}):\n{shown}{more}"


# -------------------------------------------------------------------------------------------------
# config.json <-> ModelConfig

# ModelConfig fields that change neither the tensors nor the function they compute (for positions
# below max_seq_len): a loader may override them freely.
FREE_FIELDS = {"bias_update_speed", "balance_loss_alpha", "mtp_lambda", "init_std", "max_seq_len"}


def _rope_from_hf(hf: dict) -> dict:
    """model.py's RoPE fields from `rope_parameters` (transformers 5) or `rope_scaling` + `rope_theta`."""
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in (None, "default"):
        return dict(rope_theta=theta, rope_factor=1.0)
    if kind != "yarn":
        raise CheckpointError(f"rope type {kind!r} is not supported: model.py implements YaRN and plain RoPE")
    original = rope.get("original_max_position_embeddings")
    if original is None:
        raise CheckpointError("YaRN rope parameters need original_max_position_embeddings")
    factor = rope.get("factor") or hf["max_position_embeddings"] / original
    out = dict(rope_theta=theta, rope_factor=float(factor), original_seq_len=int(original),
               beta_fast=_number(rope.get("beta_fast") or 32), beta_slow=_number(rope.get("beta_slow") or 1))
    if factor <= 1:
        return dict(out, rope_factor=1.0)
    if rope.get("truncate", True) is not True:
        raise CheckpointError("rope truncate=false is not supported: model.py rounds the YaRN ramp ends")
    # transformers multiplies cos and sin by m(mscale) / m(mscale_all_dim) and the softmax scale by
    # m(mscale_all_dim)^2, so the rope part of q.k gets m(mscale)^2 and the rest m(mscale_all_dim)^2.
    # model.py has one temperature for both: they must agree (they do in every released config).
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    if not mscale or not mscale_all_dim or mscale != mscale_all_dim:
        raise CheckpointError(f"YaRN needs mscale == mscale_all_dim (both set) for model.py's single softmax "
                              f"temperature, got mscale={mscale!r}, mscale_all_dim={mscale_all_dim!r}")
    if rope.get("attention_factor", 1.0) != 1.0:
        raise CheckpointError(f"YaRN attention_factor={rope['attention_factor']!r} is not supported")
    return dict(out, mscale=float(mscale))


def _number(x):
    return int(x) if float(x).is_integer() else float(x)


def config_from_hf(hf: dict) -> ModelConfig:
    """The ModelConfig of a Hugging Face DeepSeek-V3 or -V2 config.json (as a dict).

    Raises CheckpointError naming the field when the config asks for something model.py does not
    compute (another architecture, attention biases, tied embeddings, other routing rules).
    """
    model_type = hf.get("model_type")
    if model_type not in ("deepseek_v3", "deepseek_v2"):
        raise CheckpointError(f"unsupported architecture: model_type {model_type!r} "
                              f"(architectures {hf.get('architectures')}); expected deepseek_v3 or deepseek_v2")
    v3 = model_type == "deepseek_v3"
    required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "q_lora_rank"]
    n_dense = hf.get("first_k_dense_replace", 3 if v3 else 0)
    if n_dense < hf.get("num_hidden_layers", 0):
        required += ["n_routed_experts", "num_experts_per_tok", "moe_intermediate_size"]
    missing = [k for k in required if k not in hf]
    if missing:
        raise CheckpointError(f"config.json lacks {missing}")

    def expect(key, allowed, default):
        value = hf.get(key, default)
        if value not in allowed:
            raise CheckpointError(f"config.json {key}={value!r} is not supported by model.py "
                                  f"(expected one of {allowed})")
        return value

    expect("hidden_act", ["silu"], "silu")
    expect("tie_word_embeddings", [False], False)
    expect("attention_bias", [False], False)
    expect("mlp_bias", [False], False)
    expect("moe_layer_freq", [1], 1)
    expect("rope_interleave", [True], True)
    top_k = hf.get("num_experts_per_tok") or 1
    if v3:
        expect("scoring_func", ["sigmoid"], "sigmoid")
        expect("topk_method", ["noaux_tc"], "noaux_tc")
        if top_k > 1:  # model.py renormalises sigmoid weights over the chosen experts
            expect("norm_topk_prob", [True], True)
        groups, kept = hf.get("n_group") or 1, hf.get("topk_group") or 1
    else:
        expect("scoring_func", ["softmax"], "softmax")
        if top_k > 1:  # model.py does not renormalise softmax weights
            expect("norm_topk_prob", [False], False)
        method = expect("topk_method", ["greedy", "group_limited_greedy"], "greedy")
        limited = method == "group_limited_greedy"
        groups, kept = (hf.get("n_group") or 1, hf.get("topk_group") or 1) if limited else (1, 1)
    rope = _rope_from_hf(hf)
    mtp = hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers", 0))
    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"], dim=hf["hidden_size"], inter_dim=hf["intermediate_size"],
            moe_inter_dim=hf.get("moe_intermediate_size") or 1, n_layers=hf["num_hidden_layers"],
            n_dense_layers=n_dense, n_heads=hf["num_attention_heads"],
            n_routed_experts=hf.get("n_routed_experts") or 0, n_shared_experts=hf.get("n_shared_experts") or 0,
            n_activated_experts=hf.get("num_experts_per_tok") or 0, n_expert_groups=groups, n_limited_groups=kept,
            score_func="sigmoid" if v3 else "softmax",
            route_scale=float(hf.get("routed_scaling_factor", 2.5 if v3 else 1.0)), use_router_bias=v3,
            q_lora_rank=hf["q_lora_rank"] or 0, kv_lora_rank=hf["kv_lora_rank"],
            qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=hf["qk_rope_head_dim"],
            v_head_dim=hf["v_head_dim"], max_seq_len=hf.get("max_position_embeddings", 4096 if v3 else 2048),
            mtp_depth=mtp or 0, norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            init_std=float(hf.get("initializer_range", 0.02)), **rope)
    except ValueError as e:  # ModelConfig's own checks, e.g. more dense layers than layers
        raise CheckpointError(f"config.json describes an invalid model: {e}") from None


def config_to_hf(cfg: ModelConfig) -> dict:
    """A config.json dict for `cfg`: DeepseekV3ForCausalLM, or DeepseekV2ForCausalLM for softmax routing.

    `transformers.DeepseekV3Config(**config_to_hf(cfg))` builds the equivalent transformers model. RoPE
    is written the way the released checkpoints write it (`rope_theta` + `rope_scaling`), which
    transformers 4 and 5 and the official remote code all read.
    """
    v3 = cfg.score_func == "sigmoid"
    if not v3 and cfg.use_router_bias and cfg.has_moe:
        raise CheckpointError("softmax routing with a router bias has no Hugging Face format "
                              "(deepseek_v2 has no e_score_correction_bias)")
    hf = dict(
        architectures=["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"],
        model_type="deepseek_v3" if v3 else "deepseek_v2",
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.inter_dim,
        moe_intermediate_size=cfg.moe_inter_dim, num_hidden_layers=cfg.n_layers,
        first_k_dense_replace=cfg.n_dense_layers, moe_layer_freq=1,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
        n_routed_experts=cfg.n_routed_experts, n_shared_experts=cfg.n_shared_experts,
        num_experts_per_tok=cfg.n_activated_experts, n_group=cfg.n_expert_groups,
        topk_group=cfg.n_limited_groups, routed_scaling_factor=cfg.route_scale,
        scoring_func=cfg.score_func, norm_topk_prob=v3,
        topk_method="noaux_tc" if v3 else ("greedy" if cfg.n_expert_groups == 1 else "group_limited_greedy"),
        q_lora_rank=cfg.q_lora_rank or None, kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim, max_position_embeddings=cfg.max_seq_len,
        rope_theta=cfg.rope_theta, rope_scaling=None, num_nextn_predict_layers=cfg.mtp_depth,
        rms_norm_eps=cfg.norm_eps, initializer_range=cfg.init_std, hidden_act="silu",
        tie_word_embeddings=False, attention_bias=False, bos_token_id=0, eos_token_id=1,
    )
    if v3:
        hf["rope_interleave"] = True
    if cfg.rope_factor > 1:
        hf["rope_scaling"] = dict(type="yarn", rope_type="yarn", factor=cfg.rope_factor,
                                  original_max_position_embeddings=cfg.original_seq_len,
                                  beta_fast=cfg.beta_fast, beta_slow=cfg.beta_slow,
                                  mscale=cfg.mscale, mscale_all_dim=cfg.mscale)
    return hf


# -------------------------------------------------------------------------------------------------
# Tensor names: official (model.py) <-> Hugging Face

# One entry per path component that changes name; the others (layer and expert numbers, `gate`,
# `experts`, `shared_experts`, `weight`) are kept. gate_proj = w1, up_proj = w3, down_proj = w2.
HF_COMPONENT = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn": "self_attn", "wq": "q_proj", "wq_a": "q_a_proj", "q_norm": "q_a_layernorm", "wq_b": "q_b_proj",
    "wkv_a": "kv_a_proj_with_mqa", "kv_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj", "wo": "o_proj",
    "ffn": "mlp", "w1": "gate_proj", "w2": "down_proj", "w3": "up_proj",
}


def hf_name(name: str, n_layers: int) -> str:
    """The checkpoint name of a model.py state-dict entry; model.mtp[k] is layer n_layers + k."""
    parts = name.split(".")
    if name == "embed.weight":
        return "model.embed_tokens.weight"
    if name == "norm.weight":
        return "model.norm.weight"
    if name == "head.weight":
        return "lm_head.weight"
    if parts[0] == "layers":
        prefix, rest = f"model.layers.{parts[1]}", parts[2:]
    elif parts[0] == "mtp":
        prefix, rest = f"model.layers.{n_layers + int(parts[1])}", parts[2:]
        if rest[0] == "block":
            rest = rest[1:]
        elif rest[0] == "norm":
            rest = ["shared_head", "norm", *rest[1:]]
    else:
        raise KeyError(f"no Hugging Face name for {name!r}")
    if rest[-2:] == ["gate", "bias"]:
        rest = [*rest[:-1], "e_score_correction_bias"]
    return ".".join([prefix, *(HF_COMPONENT.get(p, p) for p in rest)])


# A stacked routed-expert parameter of model.py: slice e is expert e's Linear `{experts}.{e}.{w}.weight`.
STACKED_EXPERTS = re.compile(r"(.+\.experts)\.(w[123])$")


def per_expert(name: str, tensor: torch.Tensor) -> list[tuple[str, int | None]]:
    """The model.py names a state-dict entry holds, each with its expert index: one per expert for a
    stacked expert weight (named as the official per-expert Linear), else the entry itself (None)."""
    m = STACKED_EXPERTS.fullmatch(name)
    if m is None:
        return [(name, None)]
    return [(f"{m[1]}.{e}.{m[2]}.weight", e) for e in range(tensor.shape[0])]


def _mtp_layers(cfg: ModelConfig, depth: int) -> range:
    return range(cfg.n_layers, cfg.n_layers + depth)


def _layer_of(key: str) -> int | None:
    m = re.match(r"model\.layers\.(\d+)\.", key)
    return int(m.group(1)) if m else None


# -------------------------------------------------------------------------------------------------
# Loading

def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block=FP8_BLOCK) -> torch.Tensor:
    """fp32 weight = fp8 weight times its block's scale: scale_inv[i, j] covers rows
    [i*b0, (i+1)*b0) and columns [j*b1, (j+1)*b1), cropped at the edges."""
    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(block[0], dim=0)[:rows]
    return weight.float() * scale.repeat_interleave(block[1], dim=1)[:, :cols]


class _Shards:
    """The safetensors files of a checkpoint directory, opened lazily; errors name the file."""

    def __init__(self, path: Path):
        self.path = path
        self.handles = {}
        index = path / INDEX
        if index.exists():
            try:
                self.where = dict(json.loads(index.read_text())["weight_map"])
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            for name in sorted(set(self.where.values())):
                keys = set(self.open(name).keys())
                listed = {k for k, f in self.where.items() if f == name}
                if keys != listed:
                    problems = [f"{k}: listed in the index, absent from the file" for k in sorted(listed - keys)]
                    problems += [f"{k}: in the file, absent from the index" for k in sorted(keys - listed)]
                    raise CheckpointError(_listing(f"{path / name} does not match {INDEX}", problems))
        elif (path / "model.safetensors").exists():
            self.where = {k: "model.safetensors" for k in self.open("model.safetensors").keys()}
        else:
            found = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
            raise CheckpointError(f"{path}: no {INDEX} or model.safetensors (found {found}); "
                                  f"only safetensors checkpoints are supported")

    def open(self, name: str):
        if name not in self.handles:
            file = self.path / name
            if not file.exists():
                raise CheckpointError(f"{file}: listed in {INDEX} but missing")
            try:
                self.handles[name] = safe_open(str(file), framework="pt")
            except Exception as e:  # safetensors raises its own error type for every header problem
                raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({e})") from None
        return self.handles[name]

    def info(self, key: str) -> tuple[tuple[int, ...], str]:
        piece = self.open(self.where[key]).get_slice(key)
        return tuple(piece.get_shape()), piece.get_dtype()

    def tensor(self, key: str, device) -> torch.Tensor:
        try:
            return self.open(self.where[key]).get_tensor(key).to(device)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{self.path / self.where[key]}: cannot read {key} ({e})") from None

    def close(self):
        for handle in self.handles.values():
            handle.__exit__(None, None, None)
        self.handles.clear()


def _read_config(path: Path) -> dict:
    file = path / "config.json"
    if not file.exists():
        raise CheckpointError(f"{path}: no config.json")
    try:
        return json.loads(file.read_text())
    except ValueError as e:
        raise CheckpointError(f"{file}: invalid JSON ({e})") from None


def _fp8_block(hf: dict) -> tuple[int, int]:
    quant = hf.get("quantization_config")
    if quant is None:
        return FP8_BLOCK
    method = quant.get("quant_method")
    if method != "fp8" or quant.get("fmt", "e4m3") != "e4m3":
        raise CheckpointError(f"unsupported quantisation: quant_method={method!r}, fmt={quant.get('fmt')!r} "
                              f"(only DeepSeek's block-wise fp8 e4m3 is dequantised on load)")
    block = quant.get("weight_block_size") or FP8_BLOCK
    if len(block) != 2:
        raise CheckpointError(f"unsupported quantisation: weight_block_size={block!r}")
    return int(block[0]), int(block[1])


def _check_compatible(model_cfg: ModelConfig, ckpt_cfg: ModelConfig):
    differ = [f"{f.name}: model {getattr(model_cfg, f.name)!r}, checkpoint {getattr(ckpt_cfg, f.name)!r}"
              for f in fields(ModelConfig) if f.name not in FREE_FIELDS | {"mtp_depth"}
              and getattr(model_cfg, f.name) != getattr(ckpt_cfg, f.name)]
    if model_cfg.mtp_depth > ckpt_cfg.mtp_depth:
        differ.append(f"mtp_depth: model {model_cfg.mtp_depth}, checkpoint {ckpt_cfg.mtp_depth}")
    if differ:
        raise CheckpointError(_listing("the model's config differs from the checkpoint's", differ))


def _plan(shards: _Shards, model: Transformer, ckpt_mtp_depth: int,
          block) -> list[tuple[str, str, int | None, str | None]]:
    """(checkpoint key, model.py name, expert index or None, fp8 scale key or None) for every tensor
    to read, after checking names, shapes and dtypes of the whole checkpoint from the file headers
    alone. An expert index e means the tensor is slice e of a stacked expert weight."""
    cfg = model.cfg
    targets = model.state_dict(keep_vars=True)          # parameters and the router-bias buffers
    by_hf = {hf_name(sub, cfg.n_layers): (name, e)  # checkpoint key -> (model.py name, expert index)
             for name, t in targets.items() for sub, e in per_expert(name, t)}
    loaded_mtp = set(_mtp_layers(cfg, cfg.mtp_depth))
    skipped_mtp = set(_mtp_layers(cfg, ckpt_mtp_depth)) - loaded_mtp
    copies = {"embed_tokens.weight": model.embed.weight, "shared_head.head.weight": model.head.weight}
    problems = {"missing": [], "unexpected": [], "wrong shape": [], "unsupported dtype": []}
    plan = []
    for key in sorted(shards.where):
        shape, dtype = shards.info(key)
        layer = _layer_of(key)
        if key.endswith(".weight_scale_inv"):           # read with its weight
            base = key.removesuffix("_scale_inv")
            if base not in shards.where or shards.info(base)[1] not in FP8_DTYPES:
                problems["unexpected"].append(f"{key} (no fp8 weight {base})")
            continue
        if layer in skipped_mtp or key.endswith("rotary_emb.inv_freq"):
            continue
        copy = copies.get(key.removeprefix(f"model.layers.{layer}.")) if layer in loaded_mtp else None
        if copy is not None:                            # the MTP layer's copy of the embedding or head
            if shape != tuple(copy.shape):
                problems["wrong shape"].append(f"{key}: checkpoint {shape}, model {tuple(copy.shape)}")
            continue
        if key not in by_hf:
            problems["unexpected"].append(key)
            continue
        name, expert = by_hf.pop(key)
        expected = tuple(targets[name].shape[1:] if expert is not None else targets[name].shape)
        if shape != expected:
            problems["wrong shape"].append(f"{key}: checkpoint {shape}, model {expected}")
            continue
        scale_key = None
        if dtype in FP8_DTYPES:
            scale_key = key.removesuffix("weight") + "weight_scale_inv"
            if len(shape) != 2 or scale_key not in shards.where:
                problems["unsupported dtype"].append(f"{key}: {dtype} without {scale_key}")
                continue
            grid = tuple(math.ceil(n / b) for n, b in zip(shape, block))
            if shards.info(scale_key)[0] != grid:
                problems["wrong shape"].append(f"{scale_key}: checkpoint {shards.info(scale_key)[0]}, "
                                               f"expected {grid} for blocks of {block}")
                continue
        elif dtype not in FLOAT_DTYPES:
            problems["unsupported dtype"].append(f"{key}: {dtype}")
            continue
        plan.append((key, name, expert, scale_key))
    problems["missing"] = sorted(by_hf)
    if any(problems.values()):
        hint = ""
        if problems["missing"] and all(_layer_of(k) in loaded_mtp for k in problems["missing"]):
            hint = "\nonly MTP weights are missing: load with mtp_depth=0 to skip the MTP module"
        raise CheckpointError(f"{shards.path} does not match the model:\n"
                              + "\n".join(_listing(k, v) for k, v in problems.items() if v) + hint)
    return plan


def _place(model: nn.Module, name: str, tensor: torch.Tensor, dtype, device, expert: int | None = None):
    """Put a loaded tensor into parameter or persistent buffer `name`, or into its slice `expert` of
    a stacked expert weight: a meta entry is replaced by a tensor on `device` (parameters in `dtype`,
    the fp32 router bias kept fp32; a stacked one allocated on its first expert); a materialised one
    is copied into, in its own dtype (a DTensor receives its local shard of a whole tensor)."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    is_param = attr in module._parameters
    old = module._parameters[attr] if is_param else module._buffers[attr]
    if old.is_meta and expert is not None:
        new = torch.empty(old.shape, dtype=dtype, device=device)
        new[expert] = tensor
        module._parameters[attr] = nn.Parameter(new, requires_grad=old.requires_grad)
        return
    if old.is_meta:
        new = tensor.to(device=device, dtype=dtype if is_param else old.dtype)
        if is_param:
            module._parameters[attr] = nn.Parameter(new, requires_grad=old.requires_grad)
        else:
            module._buffers[attr] = new
        return
    with torch.no_grad():
        if hasattr(old, "device_mesh"):                 # a DTensor of an FSDP2 / tensor-parallel model
            from torch.distributed.tensor import distribute_tensor
            local = old.to_local()
            full = tensor.to(device=local.device, dtype=old.dtype)
            local.copy_(distribute_tensor(full, old.device_mesh, old.placements, src_data_rank=None).to_local())
        else:
            (old if expert is None else old[expert]).copy_(tensor)


def _materialise_buffers(model: Transformer, device):
    """The non-persistent buffers (rope tables, expert load counters) are computed, not loaded."""
    if model.rope_cos.is_meta:
        model.rope_cos, model.rope_sin = rope_tables(model.cfg, device)
    for module in model.modules():
        if isinstance(module, MoE) and module.expert_load.is_meta:
            module.expert_load = torch.zeros(module.n_routed_experts, device=device)


def load_hf_checkpoint(path, *, dtype=torch.float32, device="cpu", model: Transformer | None = None,
                       keep: Callable[[str], bool] | None = None, **overrides) -> Transformer:
    """Load a Hugging Face DeepSeek-V3 / -V2 checkpoint directory into a model.py Transformer.

    Without `model`, the model is built on the meta device from config.json (plus `overrides` of
    FREE_FIELDS, or a smaller mtp_depth: mtp_depth=0 skips the MTP layer) and each parameter is
    materialised on `device` in `dtype` as its tensor is read. With `model` (on meta, or
    materialised: for FSDP2, after `to_empty`), its config must match the checkpoint's and tensors
    are copied in. `keep(name)` selects the model.py names to read; the others stay as they are (on
    meta for a fresh model). Every problem is reported at once as a CheckpointError.
    """
    path = Path(path)
    hf = _read_config(path)
    ckpt_cfg = config_from_hf(hf)
    block = _fp8_block(hf)
    if model is None:
        unknown = sorted(set(overrides) - {f.name for f in fields(ModelConfig)})
        fixed = sorted(set(overrides) - FREE_FIELDS - {"mtp_depth"} - set(unknown))
        if unknown or fixed:
            raise CheckpointError(f"cannot override {unknown + fixed}: unknown fields or fixed by the checkpoint")
        if overrides.get("mtp_depth", 0) > ckpt_cfg.mtp_depth:
            raise CheckpointError(f"mtp_depth={overrides['mtp_depth']} exceeds the checkpoint's "
                                  f"num_nextn_predict_layers={ckpt_cfg.mtp_depth}")
        with torch.device("meta"):
            model = Transformer(replace(ckpt_cfg, **overrides))
    elif overrides:
        raise CheckpointError(f"overrides {sorted(overrides)} apply only when load_hf_checkpoint builds the model")
    else:
        _check_compatible(model.cfg, ckpt_cfg)

    shards = _Shards(path)
    try:
        targets = model.state_dict(keep_vars=True)
        stacks = {}  # the experts of a sharded (DTensor) stacked weight, placed whole once all are read
        for key, name, expert, scale_key in _plan(shards, model, ckpt_cfg.mtp_depth, block):
            if keep is not None and not keep(name):
                continue
            # Read (and dequantise) where the parameter lives: on a GPU that is much faster.
            where = device if targets[name].is_meta else targets[name].device
            tensor = shards.tensor(key, where)
            if scale_key is not None:
                tensor = dequantize_fp8(tensor, shards.tensor(scale_key, where), block)
            if expert is not None and hasattr(targets[name], "device_mesh"):
                stack = stacks.setdefault(name, [None] * targets[name].shape[0])
                stack[expert] = tensor
                if all(t is not None for t in stack):
                    _place(model, name, torch.stack(stacks.pop(name)), dtype, device)
                continue
            _place(model, name, tensor, dtype, device, expert)
    finally:
        shards.close()
    _materialise_buffers(model, device)
    return model


# -------------------------------------------------------------------------------------------------
# Saving

def _shard_name(i: int, n: int) -> str:
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def _is_checkpoint_file(name: str) -> bool:
    return name in ("config.json", INDEX, "model.safetensors", "generation_config.json") or bool(
        re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", name))


def save_hf_checkpoint(model: Transformer, path, *, max_shard_bytes: int = 5_000_000_000, dtype=None,
                       state_dict: dict[str, torch.Tensor] | None = None, extra_config: dict | None = None) -> Path:
    """Write config.json, model-0000i-of-0000n.safetensors and the index, loadable by transformers.

    `dtype` casts floating tensors (the router bias stays fp32, as released). `state_dict` replaces
    model.state_dict(), e.g. a full state dict gathered from a sharded model (call on one rank).
    `extra_config` adds config.json entries, e.g. the bos/eos ids of the tokenizer the model was
    trained with (config_to_hf writes DeepSeek's 0 and 1). The files are written to a temporary
    directory that then replaces `path`, so a crash never leaves a half checkpoint; other files of
    an existing `path` (a tokenizer, notes) are carried over.
    """
    cfg = model.cfg
    path = Path(path)
    hf = {**config_to_hf(cfg), **(extra_config or {})}
    state = model.state_dict() if state_dict is None else state_dict
    partial = [name for name, t in state.items() if t.is_meta or hasattr(t, "device_mesh")]
    if partial:
        raise CheckpointError(_listing("cannot save tensors on the meta device or sharded (DTensor); "
                                       "pass a full state_dict", partial))
    entries = []                                        # (hf name, tensor)
    for name, tensor in state.items():
        if dtype is not None and tensor.is_floating_point() and not name.endswith("gate.bias"):
            tensor = tensor.to(dtype)
        tensor = tensor.detach().cpu()
        for sub, e in per_expert(name, tensor):
            entries.append((hf_name(sub, cfg.n_layers), (tensor if e is None else tensor[e]).contiguous()))
    if not cfg.use_router_bias and hf["model_type"] == "deepseek_v3":
        # transformers' V3 router always adds e_score_correction_bias: zero is "no bias".
        for name, module in model.named_modules():
            if isinstance(module, MoE):
                entries.append((hf_name(name + ".gate.bias", cfg.n_layers), torch.zeros(cfg.n_routed_experts)))
    shared = dict(entries)
    for layer in _mtp_layers(cfg, cfg.mtp_depth):
        # The release stores the shared embedding and head again inside each MTP layer.
        entries.append((f"model.layers.{layer}.embed_tokens.weight", shared["model.embed_tokens.weight"].clone()))
        entries.append((f"model.layers.{layer}.shared_head.head.weight", shared["lm_head.weight"].clone()))

    shards, size = [[]], 0
    for entry in entries:
        nbytes = entry[1].numel() * entry[1].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes

    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        for other in path.iterdir() if path.exists() else []:
            if not _is_checkpoint_file(other.name):     # e.g. tokenizer.json: carried over
                (shutil.copytree if other.is_dir() else shutil.copy2)(other, tmp / other.name)
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            name = _shard_name(i, len(shards))
            save_file(dict(shard), str(tmp / name), metadata={"format": "pt"})
            weight_map.update({key: name for key, _ in shard})
        total = sum(t.numel() * t.element_size() for _, t in entries)
        (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                            indent=2))
        hf["torch_dtype"] = str(shared["model.embed_tokens.weight"].dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        for file in tmp.iterdir():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        _swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _swap_in(new: Path, path: Path):
    """Rename directory `new` to `path`; an existing `path` is moved aside first and restored on failure."""
    if not path.exists():
        os.replace(new, path)
        return
    aside = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
    os.replace(path, aside / path.name)
    try:
        os.replace(new, path)
    except BaseException:
        os.replace(aside / path.name, path)
        raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


# -------------------------------------------------------------------------------------------------
# Tokenizer: tokenizer.json (byte-level BPE) -> tiktoken.Encoding

def _byte_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in for each byte, as stored in byte-level tokenizer.json files:
    printable Latin-1 bytes stand for themselves, the other bytes map to U+0100 onwards in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


# GPT-2's split, which the ByteLevel pre-tokenizer applies when use_regex is true.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# DeepSeek-V3's (and R1's) three successive Isolated splits, as its tokenizer.json spells them (\r
# and \n are the characters themselves there): digit runs of up to three, runs of CJK ideographs and
# kana, then a GPT-style regex inside each remaining piece.
DEEPSEEK_V3_SPLITS = (
    "\\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
    "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
)


def _deepseek_v3_pattern() -> str:
    """One regex whose matches are the pieces of DEEPSEEK_V3_SPLITS.

    The first two splits cut the text where the character class changes (digit, CJK, other), so the
    third regex runs inside runs of one class: restrict each of its character classes to the run's
    class, treat a following digit or CJK character as the end of the text in its lookahead, and add
    the text it leaves unmatched (a lone control or format character) as pieces of their own.
    """
    cjk = r"\x{4E00}-\x{9FA5}\x{3040}-\x{309F}\x{30A0}-\x{30FF}"
    c_letter = rf"[{cjk}&&[\p{{L}}\p{{M}}]]"
    c_prefix = rf"[{cjk}--[\p{{L}}\p{{P}}\p{{S}}]]"
    c_other = rf"[{cjk}--[\p{{L}}\p{{M}}\p{{P}}\p{{S}}]]"
    o_letter = rf"[\p{{L}}\p{{M}}--[{cjk}]]"
    o_prefix = rf"[^\r\n\p{{L}}\p{{P}}\p{{S}}\p{{N}}{cjk}]"
    o_other = rf"[^\s\p{{L}}\p{{M}}\p{{P}}\p{{S}}\p{{N}}{cjk}]"
    pieces = [
        r"\p{N}{1,3}",
        # inside a CJK run
        rf"{c_prefix}?{c_letter}+",
        rf"[{cjk}&&[\p{{P}}\p{{S}}]]+",
        rf"(?:{c_other}(?!{c_letter}))+",
        # inside a run of everything else
        r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+""",
        rf"{o_prefix}?{o_letter}+",
        rf" ?[\p{{P}}\p{{S}}--[{cjk}]]+[\r\n]*",
        r"\s*[\r\n]+",
        rf"\s+(?![^\s\p{{N}}{cjk}])",
        r"\s+",
        rf"(?:{o_other}(?!{o_letter}))+",
    ]
    return "|".join(pieces)


def _split_regex(step: dict) -> str:
    pattern = step.get("pattern", {})
    if step.get("behavior") != "Isolated" or step.get("invert", False):
        raise CheckpointError(f"unsupported Split pre-tokenizer (behavior {step.get('behavior')!r}, "
                              f"invert {step.get('invert')!r}): only Isolated splits map to tiktoken")
    if "Regex" in pattern:
        return pattern["Regex"]
    # A literal string: backslash only the metacharacters (Rust reads \< and \> as word boundaries).
    return "".join("\\" + c if c in r".^$*+?{}[]\|()#&-~" else c for c in pattern["String"])


def _escape_newlines(regex: str) -> str:
    return regex.replace("\r", "\\r").replace("\n", "\\n")


def _pattern_from_pre_tokenizer(pre: dict | None) -> str:
    steps = [] if pre is None else pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    if not steps or steps[-1].get("type") != "ByteLevel":
        raise CheckpointError(f"unsupported pre-tokenizer {pre!r}: expected byte-level BPE (ByteLevel last)")
    byte_level = steps[-1]
    if byte_level.get("add_prefix_space", False):
        raise CheckpointError("unsupported pre-tokenizer: ByteLevel add_prefix_space=true")
    others = [s.get("type") for s in steps[:-1] if s.get("type") != "Split"]
    if others:
        raise CheckpointError(f"unsupported pre-tokenizer steps {others}: only Split and ByteLevel map to tiktoken")
    regexes = [_split_regex(s) for s in steps[:-1]] + ([GPT2_PATTERN] if byte_level.get("use_regex", True) else [])
    if tuple(map(_escape_newlines, regexes)) == tuple(map(_escape_newlines, DEEPSEEK_V3_SPLITS)):
        return _deepseek_v3_pattern()
    if not regexes:
        return r"[\s\S]+"
    if len(regexes) == 1:
        # tiktoken drops text its pattern does not match; an Isolated split keeps it as pieces.
        return rf"{regexes[0]}|(?:(?!{regexes[0]})[\s\S])+"
    raise CheckpointError(f"unsupported pre-tokenizer: {len(regexes)} successive regex splits have no single "
                          f"tiktoken pattern (only DeepSeek-V3's sequence is translated): {regexes}")


def load_hf_tokenizer(tokenizer_json, name: str | None = None) -> tiktoken.Encoding:
    """A tiktoken Encoding that gives the same ids as a Hugging Face byte-level BPE tokenizer.json.

    Every added token (special or not) becomes a tiktoken special token with its id, so encode with
    `allowed_special="all"` to split them out of text as `tokenizers` does. No BOS is prepended (the
    chat format writes it). Raises CheckpointError for files tiktoken cannot reproduce.
    """
    path = Path(tokenizer_json)
    if path.is_dir():
        path = path / "tokenizer.json"
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read tokenizer ({e})") from None
    bpe = spec.get("model", {})
    if bpe.get("type") != "BPE":
        raise CheckpointError(f"{path}: unsupported tokenizer model {bpe.get('type')!r}, expected BPE")
    for option in ("byte_fallback", "dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if bpe.get(option):
            raise CheckpointError(f"{path}: unsupported BPE option {option}={bpe[option]!r}")
    normalizer = spec.get("normalizer")
    if normalizer and not (normalizer.get("type") == "Sequence" and not normalizer.get("normalizers")):
        raise CheckpointError(f"{path}: unsupported normalizer {normalizer.get('type')!r}")
    pat_str = _pattern_from_pre_tokenizer(spec.get("pre_tokenizer"))

    added = {}
    for token in spec.get("added_tokens", []):
        flags = [f for f in ("lstrip", "rstrip", "single_word") if token.get(f)]
        if flags:
            raise CheckpointError(f"{path}: added token {token['content']!r} uses {flags}, which tiktoken lacks")
        added[token["content"]] = token["id"]
    ordered = sorted(added)
    nested = [(a, b) for a, b in zip(ordered, ordered[1:]) if b.startswith(a)]
    if nested:
        raise CheckpointError(f"{path}: added tokens that prefix others are ambiguous in tiktoken: {nested[:5]}")

    alphabet = _byte_alphabet()
    vocab = bpe["vocab"]
    ranks = {}
    for token, i in vocab.items():
        if token in added:
            continue
        try:
            ranks[bytes(alphabet[c] for c in token)] = i
        except KeyError:
            raise CheckpointError(f"{path}: vocabulary entry {token!r} is not in the byte-level alphabet") from None
    if len([b for b in ranks if len(b) == 1]) != 256:
        raise CheckpointError(f"{path}: the vocabulary lacks some of the 256 single bytes")
    # tiktoken merges the adjacent pair whose concatenation has the lowest id, tokenizers the pair
    # listed first among the merges: the same order only if ids grow along the merge list.
    previous, results = -1, set()
    for merge in bpe.get("merges", []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        result = vocab.get(left + right)
        if result is None or left not in vocab or right not in vocab:
            raise CheckpointError(f"{path}: merge {left!r} + {right!r} refers to tokens outside the vocabulary")
        if result <= previous:
            raise CheckpointError(f"{path}: merge ids are not increasing along the merge list at "
                                  f"{left!r} + {right!r}; tiktoken ranks need that order")
        previous = result
        results.add(left + right)
    unreachable = [t for t in vocab if len(t) > 1 and t not in results and t not in added]
    if unreachable:
        raise CheckpointError(_listing(f"{path}: vocabulary entries no merge produces", unreachable[:50]))
    by_id = {i: b for b, i in ranks.items()}
    clash = [t for t, i in added.items() if i in by_id and by_id[i] != t.encode("utf-8")]
    if clash:
        raise CheckpointError(f"{path}: added tokens {clash[:10]} reuse the ids of other BPE tokens")
    return tiktoken.Encoding(name or path.parent.name or "hf", pat_str=pat_str, mergeable_ranks=ranks,
                             special_tokens=added)


# -------------------------------------------------------------------------------------------------
# DeepSeek-R1's chat format

BOS_TOKEN = "<｜begin▁of▁sentence｜>"   # full-width bars U+FF5C, U+2581 for spaces
EOS_TOKEN = "<｜end▁of▁sentence｜>"
USER_TOKEN = "<｜User｜>"
ASSISTANT_TOKEN = "<｜Assistant｜>"

# The same format as a Jinja chat template (tokenizer_config.json's `chat_template`, bos_token given).
R1_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{{ messages | selectattr('role', 'equalto', 'system') | map(attribute='content') | join('\\n\\n') }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ '" + USER_TOKEN + "' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}"
    "{{ '" + ASSISTANT_TOKEN + "' + m['content'].split('</think>')[-1] + '" + EOS_TOKEN + "' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + ASSISTANT_TOKEN + "<think>\\n' }}{% endif %}"
)


def format_r1_chat(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """DeepSeek-R1's prompt: BOS, the system messages joined by blank lines, then <｜User｜>text and
    <｜Assistant｜>text<｜end▁of▁sentence｜> turns. Earlier assistant turns keep only what follows their
    last </think> (R1 does not see its old reasoning); the generation prompt opens the assistant
    turn with "<think>\\n", as the released template forces."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    out = [BOS_TOKEN, system]
    for m in messages:
        if m["role"] == "user":
            out.append(USER_TOKEN + m["content"])
        elif m["role"] == "assistant":
            out.append(ASSISTANT_TOKEN + m["content"].split("</think>")[-1] + EOS_TOKEN)
        elif m["role"] != "system":
            raise ValueError(f"unsupported chat role {m['role']!r}: expected system, user or assistant")
    if add_generation_prompt:
        out.append(ASSISTANT_TOKEN + "<think>\n")
    return "".join(out)


class HFTokenizer:
    """The released tokenizer behind the pipeline's tokenizer interface (encode with bos, decode,
    bos/eos/pad ids): text is encoded as ordinary text, so a special-token string inside a question
    cannot forge a turn; BOS frames the prompt; EOS also pads (the release has no pad token)."""

    def __init__(self, path):
        self.enc = load_hf_tokenizer(path)
        specials = self.enc._special_tokens
        missing = [t for t in (BOS_TOKEN, EOS_TOKEN) if t not in specials]
        if missing:
            raise CheckpointError(f"{path}: tokenizer has no {missing}: not a DeepSeek-V3/R1 tokenizer")
        self.bos_id, self.eos_id = specials[BOS_TOKEN], specials[EOS_TOKEN]
        self.pad_id = self.eos_id

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return [self.bos_id] * bos + self.enc.encode_ordinary(text) + [self.eos_id] * eos

    def decode(self, ids) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return self.enc.decode_bytes(ids).decode("utf-8", errors="replace")
