"""Scale-out with PyTorch's own stack: torchrun, FSDP2 and Distributed Checkpoint. No home-made parallelism.

- `setup`: the one place that owns device, dtype, rank and world size (NCCL on CUDA, gloo on CPU).
- `parallelize`: FSDP2 `fully_shard` on every transformer block (and MTP block), then on the root,
  applied from outside model.py (torchtitan's pattern). On GPU a MixedPrecisionPolicy computes in
  bf16 and reduces gradients in fp32 over fp32 sharded master weights; activation checkpointing is
  optional. Build on the meta device first (`build_model`), so no rank ever holds the whole model.
- Rollouts under FSDP (`rollout_mode`): either gather every block once for the whole rollout (fast:
  no communication per decoded token, but the whole model must fit on each GPU), or keep gathering
  block by block as each decode step runs (fits any size; costs one all-gather of every block per
  token, so decoding is bound by interconnect bandwidth). A dedicated inference engine (vLLM,
  SGLang) replaces exactly this: the rollout function receives prompts and returns token ids and
  sampling log-probs, and weights are pushed to the engine after each optimizer step.
- Sharded checkpoints (`save_sharded` / `load_sharded`): each rank writes its shards; DCP stores
  global shapes, so a run saved on N ranks resumes on M.
- `memory_plan`: per-GPU memory of parameters, gradients, optimizer states, gathered blocks,
  activations and the rollout KV cache, for `train.py --dry-run`.
Experts under FSDP: a layer's routed experts are stacked (256, ., .) parameters of its MoE block,
so FSDP splits them along the expert dimension (whole experts per rank while there are at most
256 ranks, their widest evenly divisible dimension beyond) and all-gathers the whole MoE layer when
the block runs: 11.5B parameters per block for `full`, which is why FSDP alone does not fit the
671B model on 80 GB GPUs (`memory_plan`). Expert parallelism (not built here) would instead keep each rank's
experts resident and move tokens to them with all-to-all: weight traffic becomes activation traffic.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from model import ModelConfig, Transformer, count_parameters, init_parameters


# -------------------------------------------------------------------------------------------------
# Setup

@dataclass
class Env:
    """Where this process runs. One object, passed explicitly; no global state."""
    device: torch.device
    dtype: torch.dtype              # compute dtype: bf16 on CUDA, fp32 on CPU (slow bf16 matmuls)
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    distributed: bool = False       # launched by torchrun: FSDP2 and sharded checkpoints

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def setup(device: str | None = None) -> Env:
    """Detect torchrun, initialise the process group, pick device and dtype."""
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if not launched_by_torchrun():
        dev = torch.device(device or ("cuda" if use_cuda else "cpu"))
        return Env(dev, torch.bfloat16 if dev.type == "cuda" else torch.float32)
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if use_cuda:
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group("nccl", device_id=dev)
    else:
        dev = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group("gloo")
    return Env(dev, torch.bfloat16 if use_cuda else torch.float32, rank, world, local, True)


def teardown(env: Env, completed: bool = True):
    """Close the process group. After a normal finish every rank first waits for the others, so that
    none closes its connections while another still uses them (gloo aborted a rank now and then);
    after an error (completed=False) it closes at once, since the other ranks may never arrive."""
    if env.distributed and dist.is_initialized():
        if completed:
            dist.barrier()
        dist.destroy_process_group()


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place when distributed); the identity in one process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl" and x.device.type != "cuda":  # NCCL reduces GPU tensors only
            y = x.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(y)
            x.copy_(y)
        else:
            dist.all_reduce(x)
    return x


def any_rank(flag: bool, device=None) -> bool:
    """True if `flag` is true on any rank: a branch that decides how many forwards run must agree
    on every rank, or FSDP's collectives would pair up wrongly."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    return bool(all_reduce_sum(torch.tensor(int(flag), device=device)))


def from_rank0(value, env: Env):
    """Rank 0's value on every rank. For decisions read from a shared filesystem (does a checkpoint
    exist, in which format), where a rank on another node may briefly see a stale directory and
    take another branch than the others, whose collectives would then never pair up."""
    if not (env.distributed and env.world_size > 1):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_list(items: list) -> list:
    """Concatenate Python lists from every rank, rank by rank."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return list(items)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, list(items))
    return [x for part in parts for x in part]


# -------------------------------------------------------------------------------------------------
# FSDP2

def blocks(model: Transformer) -> list[nn.Module]:
    """The units FSDP gathers one at a time: each transformer block, and each MTP module's block."""
    return list(model.layers) + [m.block for m in model.mtp]


def parallelize(model: Transformer, env: Env, *, param_dtype: torch.dtype | None = None,
                activation_checkpointing: bool = False) -> Transformer:
    """Shard `model` with FSDP2 over all ranks: one group per block, then the root (embedding, head,
    final norm, MTP projections). param_dtype (default env.dtype) is what blocks compute in; the
    sharded master weights, gradient reductions and optimizer states stay fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import Shard
    param_dtype = param_dtype or env.dtype

    def placement(param: nn.Parameter):
        return Shard(shard_dim(tuple(param.shape), env.world_size))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32,
                              cast_forward_inputs=False)  # rope tables and router stay fp32
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
        for i, block in enumerate(model.layers):
            model.layers[i] = checkpoint_wrapper(block, preserve_rng_state=False)
        for m in model.mtp:
            m.block = checkpoint_wrapper(m.block, preserve_rng_state=False)
    for block in blocks(model):
        fully_shard(block, mp_policy=mp, shard_placement_fn=placement)
    fully_shard(model, mp_policy=mp, shard_placement_fn=placement)
    model.cache_dtype = param_dtype  # outside a forward the weights are fp32 shards; sample in bf16
    return model


def shard_dim(shape: tuple[int, ...], world_size: int) -> int:
    """The dimension FSDP splits a parameter along: the first, unless it has fewer entries than
    there are ranks (the stacked experts' 256 on 512 GPUs, the router's 256 rows), then the widest
    that the ranks divide evenly (FSDP2 pads only the first dimension), so that every rank holds an
    equal share; failing that the first, padded, leaving some ranks without a share."""
    if shape[0] >= world_size:
        return 0
    even = [d for d in range(len(shape)) if shape[d] % world_size == 0]
    return max(even, key=lambda d: shape[d]) if even else 0


def build_model(cfg: ModelConfig, env: Env, *, seed: int | None = None, sharded: bool | None = None,
                **parallel_options) -> Transformer:
    """Construct on the meta device, shard (when distributed), then allocate only this rank's shards.

    With `seed`, the weights are those `Transformer(cfg)` draws in one process, built block by block
    (`init_like_one_process`); without, they are left for a checkpoint to fill (`load_sharded`,
    `load_hf_sharded`)."""
    sharded = env.distributed if sharded is None else sharded
    if seed is not None:
        torch.manual_seed(seed)
        if not sharded:
            return Transformer(cfg).to(env.device)
    with torch.device("meta"):
        model = Transformer(cfg)
    if sharded:
        parallelize(model, env, **parallel_options)
    model.to_empty(device=env.device)  # without a seed: uninitialised, for a checkpoint to fill
    if seed is not None:
        init_like_one_process(model, cfg, seed)
    model.reset_buffers()
    return model


def init_like_one_process(model: Transformer, cfg: ModelConfig, seed: int):
    """The weights `Transformer(cfg)` draws after torch.manual_seed(seed), into a sharded model, one
    block at a time: each rank draws every full tensor of a block on the CPU, keeps its shards and
    frees the block, so no rank holds more than one block in full."""
    with torch.device("meta"):
        template = Transformer(cfg)
    torch.manual_seed(seed)
    # an eagerly built Transformer's nn.Embedding draws its weight once in its constructor, before
    # init_weights draws it again: spend the same random numbers
    torch.empty(cfg.vocab_size, cfg.dim).normal_()
    units = []
    for name, child in template.named_children():      # registration order = init_weights' order
        units += [(f"{name}.{i}", c) for i, c in enumerate(child)] if isinstance(child, nn.ModuleList) \
            else [(name, child)]
    for prefix, unit in units:
        unit.to_empty(device="cpu")
        init_parameters(unit, cfg.init_std)
        copy_full_state(model, {f"{prefix}.{k}": v for k, v in unit.state_dict().items()}, partial=True)
        unit.to_empty(device="meta")


@torch.no_grad()
def copy_full_state(model: nn.Module, state: dict[str, torch.Tensor], partial: bool = False):
    """Copy full (unsharded) tensors into a possibly sharded model: each rank keeps its own shard.
    Every entry of the model must be in `state`, unless `partial`; no entry of `state` may be unknown."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    own = model.state_dict()
    missing, unknown = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if (missing and not partial) or unknown:
        raise KeyError(f"state lacks {missing[:5]}, has unknown {unknown[:5]}")
    for name, target in own.items():
        if name not in state:
            continue
        src = state[name].to(device=target.device, dtype=target.dtype)
        if isinstance(target, DTensor):
            target.to_local().copy_(distribute_tensor(src, target.device_mesh, target.placements,
                                                      src_data_rank=None).to_local())
        else:
            target.copy_(src)


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict on CPU, on every rank (for small models: tests, `.pt` export)."""
    from torch.distributed.tensor import DTensor
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu()
            for k, v in model.state_dict().items()}


def load_hf_sharded(model: Transformer, path, env: Env) -> Transformer:
    """Fill a model already sharded by `parallelize` (and `to_empty`) from a Hugging Face checkpoint
    directory, one tensor at a time: each rank reads a tensor, keeps its shard and drops the rest."""
    import hf
    hf.load_hf_checkpoint(path, model=model, device=env.device)
    model.reset_buffers()
    return model


@contextmanager
def rollout_mode(model: nn.Module, gather_all: bool | None = None):
    """Sampling with a sharded model; yields generate's `sync_stop`. Outside FSDP this does nothing.

    gather_all=True: unshard every FSDP group once and keep it unsharded until the rollout ends: no
    communication per token, ranks may stop at different steps, but the whole model must fit on
    each device. False: each forward all-gathers its blocks as in training, so every rank must run
    every decode step (sync_stop) and each token costs one all-gather of all weights. None: gather
    all when the unsharded model takes under half of the free accelerator memory (always on CPU).
    """
    if not is_sharded(model):
        yield False
        return
    from torch.distributed.fsdp import FSDPModule
    groups = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if gather_all is None:
        gather_all = _fits_unsharded(model)
    if not gather_all:
        # generate runs under inference_mode: an all-gather there would leave FSDP's unsharded
        # parameters as inference tensors, which training then cannot use. Gather each group once
        # here first, one at a time, so its buffers exist as ordinary tensors.
        for m in groups:
            m.unshard()
            m.reshard()
        yield True
        return
    for m in groups:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield False
    finally:
        for m in groups:  # FSDP2's defaults: the root stays gathered after forward, blocks reshard
            m.reshard()
            m.set_reshard_after_forward(m is not model, recurse=False)


def _fits_unsharded(model: nn.Module) -> bool:
    """Every rank's answer to: does the whole model, in its compute dtype, fit in half the free memory?"""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return True
    need = sum(p.numel() for p in model.parameters()) * 2        # bf16
    fits = torch.tensor(int(need < 0.5 * torch.cuda.mem_get_info(device)[0]), device=device)
    dist.all_reduce(fits, op=dist.ReduceOp.MIN)                  # all ranks must choose alike
    return bool(fits)


def clip_grad_norm_(model: nn.Module, max_norm: float) -> float:
    """Gradient clipping that also works on DTensor (sharded) gradients: the norm is global."""
    from torch.distributed.tensor import DTensor
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm)


# -------------------------------------------------------------------------------------------------
# Sharded checkpoints (torch.distributed.checkpoint)

def save_sharded(path: Path, env: Env, model: nn.Module, meta: dict, optimizer=None, ref=None):
    """Write a DCP checkpoint directory atomically: all ranks write into a temporary directory,
    rank 0 adds meta.json and renames it into place, so a crash leaves the previous one intact."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if env.is_main and tmp.exists():
        shutil.rmtree(tmp)
    barrier(env)
    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    if ref is not None:
        state["ref"] = get_model_state_dict(ref)
    dcp.save(state, checkpoint_id=str(tmp))
    barrier(env)
    if env.is_main:
        (tmp / "meta.json").write_text(json.dumps({**meta, "world_size": env.world_size,
                                                   "has": sorted(state)}))
        old = path.with_name(path.name + ".old")
        if old.exists():  # left by a crash in the middle of an earlier save
            shutil.rmtree(old)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        if old.exists():
            shutil.rmtree(old)
    barrier(env)


def read_meta(path: Path) -> dict | None:
    meta = Path(path) / "meta.json"
    return json.loads(meta.read_text()) if meta.exists() else None


def load_sharded(path: Path, model: nn.Module, optimizer=None, ref=None) -> dict:
    """Load a DCP checkpoint saved on any number of ranks into this run's (sharded or not) model."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)
    meta = read_meta(path)
    if meta is None:
        raise RuntimeError(f"{path} is not a complete sharded checkpoint (no meta.json)")
    state = {"model": get_model_state_dict(model)}
    if optimizer is not None and "optimizer" in meta["has"]:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
        # a parameter that was never trained (GRPO leaves MTP alone) has no saved AdamW state:
        # ask only for the states the checkpoint holds
        saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        state["optimizer"]["state"] = {k: v for k, v in state["optimizer"]["state"].items()
                                       if all(f"optimizer.state.{k}.{n}" in saved for n in v)}
    if ref is not None and "ref" in meta["has"]:
        state["ref"] = get_model_state_dict(ref)
    with warnings.catch_warnings():  # in one process DCP warns that it loads without a process group
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])
    if "optimizer" in state:
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(strict=False))
    if "ref" in state:
        set_model_state_dict(ref, state["ref"])
    return meta


def barrier(env: Env):
    if env.distributed:
        dist.barrier()


# -------------------------------------------------------------------------------------------------
# Memory plan (train.py --dry-run)

GIB = 1024 ** 3
TRAINING_ROWS = ["block gradients (bf16 + fp32 for reduce-scatter)", "activations", "logits + grad (fp32)"]
ROLLOUT_ROWS = ["rollout KV cache (bf16)"]


def activation_elements_per_token(cfg: ModelConfig, layer: int) -> int:
    """Values one block keeps for backward per token (naive attention, fused SDPA, no recompute).

    Attention: norm in/out, q path (wq_a out, q_norm out, wq_b out, rotated q), kv path (wkv_a out,
    kv_norm out, wkv_b out, assembled k, v), SDPA output. FFN: norm in/out and, for MoE, the gathered
    inputs, w1 and w3 outputs, their product and w2 output of each of the k routed experts, the
    shared experts' three hidden tensors and the router's fp32 logits and scores (counted x2).
    """
    H, D = cfg.n_heads, cfg.dim
    q = 2 * cfg.q_lora_rank + 2 * H * cfg.qk_head_dim if cfg.q_lora_rank else 2 * H * cfg.qk_head_dim
    kv = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank \
        + H * (cfg.qk_nope_head_dim + cfg.v_head_dim) + H * cfg.qk_head_dim + H * cfg.v_head_dim
    attn = 2 * D + q + kv + H * cfg.v_head_dim
    if layer < cfg.n_dense_layers:
        return attn + 2 * D + 3 * cfg.inter_dim
    K, inter = cfg.n_activated_experts, cfg.moe_inter_dim
    routed = K * (2 * D + 3 * inter)
    shared = 3 * cfg.n_shared_experts * inter
    router = 2 * 2 * cfg.n_routed_experts
    return attn + 2 * D + routed + shared + router


@dataclass
class MemoryPlan:
    size: str
    world_size: int
    gpu_gib: float
    total_params: int
    active_params: int
    rows: dict[str, int]            # bytes per GPU
    detail: dict[str, str]

    @property
    def total(self) -> int:
        """Peak: the resident rows plus the larger of the training and the rollout working sets."""
        train = sum(self.rows[k] for k in TRAINING_ROWS)
        rollout = sum(self.rows[k] for k in ROLLOUT_ROWS)
        return sum(v for k, v in self.rows.items() if k not in TRAINING_ROWS + ROLLOUT_ROWS) + max(train, rollout)

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_gib * GIB

    def table(self) -> str:
        lines = [f"{self.size}: {self.total_params:,} parameters ({self.active_params:,} active per token), "
                 f"{self.world_size} GPUs x {self.gpu_gib:g} GiB", "",
                 "| per GPU | GiB | how |", "|---|---|---|"]
        for k, v in self.rows.items():
            lines.append(f"| {k} | {v / GIB:.2f} | {self.detail[k]} |")
        lines.append(f"| peak (resident + max(training, rollout)) | {self.total / GIB:.2f} | "
                     f"{'fits' if self.fits else 'DOES NOT FIT'} in {self.gpu_gib:g} GiB |")
        return "\n".join(lines)


def memory_plan(cfg: ModelConfig, size: str, world_size: int, gpu_gib: float, *, micro_batch: int = 1,
                seq_len: int = 4096, rollout_seqs: int = 8192, rollout_len: int = 32768,
                activation_checkpointing: bool = True, reference: bool = True) -> MemoryPlan:
    """Per-GPU memory of FSDP2 GRPO training with bf16 compute over fp32 master weights and AdamW.

    Sharded across world_size: fp32 parameters (4 B), fp32 gradients (4 B), AdamW m and v (8 B),
    and the frozen reference model (4 B) when beta > 0. Unsharded: bf16 copies of the block being
    computed and of the next one (FSDP2 prefetches it); in backward, the block's unsharded bf16
    gradients and their fp32 copy for the reduce-scatter; activations of one micro-batch; fp32 logits
    and their gradient; and in a rollout the latent KV cache of this rank's share of the sequences
    (bf16, cfg's MLA cache size; R1-Zero rolls out 512 questions x 16 = 8,192).
    """
    counts, largest_block = _sizes(cfg)
    n_params = counts["total"] + counts["mtp"]          # trained together
    W = world_size
    tokens = micro_batch * seq_len
    per_layer = [activation_elements_per_token(cfg, i) for i in range(cfg.n_layers)]
    mtp_layers = [activation_elements_per_token(cfg, cfg.n_layers)] * cfg.mtp_depth
    if activation_checkpointing:   # keep each block's input; recompute one block at a time in backward
        act = tokens * 2 * (cfg.dim * (cfg.n_layers + cfg.mtp_depth) + max(per_layer + mtp_layers))
        act_how = "bf16 block inputs + one block recomputed"
    else:
        act = tokens * 2 * (sum(per_layer) + sum(mtp_layers))
        act_how = "bf16, every block's saved tensors"
    logits = tokens * cfg.vocab_size * 4 * 2 * (1 + cfg.mtp_depth)
    cache_per_token = 2 * cfg.n_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    seqs = math.ceil(rollout_seqs / W)
    rows = {"parameters (fp32, sharded)": 4 * n_params // W,
            "gradients (fp32, sharded)": 4 * n_params // W,
            "AdamW m, v (fp32, sharded)": 8 * n_params // W,
            "reference model (fp32, sharded)": 4 * n_params // W if reference else 0,
            "gathered blocks (bf16)": 2 * 2 * largest_block,
            "block gradients (bf16 + fp32 for reduce-scatter)": (2 + 4) * largest_block,
            "activations": act,
            "logits + grad (fp32)": logits,
            "rollout KV cache (bf16)": seqs * rollout_len * cache_per_token}
    detail = {"parameters (fp32, sharded)": f"4 B x {n_params:,} / {W}",
              "gradients (fp32, sharded)": f"4 B x {n_params:,} / {W}",
              "AdamW m, v (fp32, sharded)": f"8 B x {n_params:,} / {W}",
              "reference model (fp32, sharded)": f"4 B x {n_params:,} / {W}" if reference else "beta = 0: none",
              "block gradients (bf16 + fp32 for reduce-scatter)": f"(2 + 4) B x {largest_block:,}",
              "gathered blocks (bf16)": f"2 blocks x 2 B x {largest_block:,} (largest block)",
              "activations": f"{micro_batch} x {seq_len} tokens, {act_how}",
              "logits + grad (fp32)": f"{tokens} tokens x {cfg.vocab_size} x 4 B x 2 x {1 + cfg.mtp_depth} heads",
              "rollout KV cache (bf16)": f"{seqs} sequences x {rollout_len} tokens x {cache_per_token:,} B"}
    return MemoryPlan(size, W, gpu_gib, counts["total"], counts["active"], rows, detail)


_SIZES: dict[str, tuple[dict[str, int], int]] = {}


def _sizes(cfg: ModelConfig) -> tuple[dict[str, int], int]:
    """count_parameters and the largest FSDP unit's parameter count, from a meta-device model."""
    key = json.dumps(asdict(cfg), sort_keys=True)
    if key not in _SIZES:
        with torch.device("meta"):
            model = Transformer(cfg)
        _SIZES[key] = count_parameters(model), max(sum(p.numel() for p in b.parameters()) for b in blocks(model))
    return _SIZES[key]


def smallest_world(cfg: ModelConfig, size: str, gpu_gib: float, per_node: int = 8, **kw) -> MemoryPlan | None:
    """The fewest GPUs (a multiple of per_node) whose plan fits, or None if none up to 16,384 does."""
    lo, hi = 1, 16_384 // per_node                      # in nodes; more GPUs never need more memory each
    if not memory_plan(cfg, size, hi * per_node, gpu_gib, **kw).fits:
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if memory_plan(cfg, size, mid * per_node, gpu_gib, **kw).fits:
            hi = mid
        else:
            lo = mid + 1
    return memory_plan(cfg, size, lo * per_node, gpu_gib, **kw)


def plan_as_dict(plan: MemoryPlan) -> dict:
    return {**asdict(plan), "total": plan.total, "fits": plan.fits}
