"""Run under `torchrun --nproc_per_node=N` (or plain python) by tests/test_parallel.py.

Every rank builds the micro model from one seed, sharded with FSDP2 when launched by torchrun, and
trains on its slice of batches that are the same on every rank, so the trajectory of the whole batch
can be compared across world sizes. Rank 0 writes {mode: {losses, norm, tokens}} as JSON.

  sft   next-token steps --sft-steps A:B, optionally --load DIR first and --save DIR after
  grpo  GRPO updates (beta > 0, "token" aggregation) on fixed rollouts for --grpo-steps A:B (with
        --load / --save of policy, optimizer and reference as for sft), then
        sampling from the sharded model, every block gathered at once and block by block
  --bf16 (FSDP2 mixed precision), --ac (activation checkpointing)
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import parallel  # noqa: E402
from grpo import GRPO, GRPOConfig, Rollout, advantages  # noqa: E402
from model import generate, get_config  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("modes", nargs="+", choices=["sft", "grpo"])
p.add_argument("--sft-steps", default="0:4")
p.add_argument("--grpo-steps", default="0:3")
p.add_argument("--load")
p.add_argument("--save")
p.add_argument("--out", required=True)
p.add_argument("--bf16", action="store_true", help="FSDP2 mixed precision: bf16 compute, fp32 reduction")
p.add_argument("--ac", action="store_true", help="activation checkpointing")
args = p.parse_args()
torch.set_num_threads(1)
env = parallel.setup("cpu")
R, W = env.rank, env.world_size
cfg = get_config("micro", vocab_size=64, max_seq_len=64)
options = dict(param_dtype=torch.bfloat16 if args.bf16 else None, activation_checkpointing=args.ac)


def steps(text: str) -> range:
    first, last = map(int, text.split(":"))
    return range(first, last)


def batch(step: int, n: int, T: int):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(3, cfg.vocab_size, (n, T), generator=g)


def weight_norm(model) -> float:
    return sum(float(v.float().pow(2).sum()) for v in parallel.full_state(model).values()) ** 0.5


def sft() -> dict:
    model = parallel.build_model(cfg, env, seed=0, **options)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    if args.load:
        parallel.load_sharded(Path(args.load), model, opt)
    losses = []
    for step in steps(args.sft_steps):
        tokens = batch(step, 4, 17)[R::W]                                    # this rank's rows
        out = model(tokens[:, :-1], tokens[:, 1:])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()          # equal token counts per rank: FSDP's average is the batch mean
        parallel.clip_grad_norm_(model, 1.0)
        opt.step()
        model.update_router_biases()
        losses.append(float(parallel.all_reduce_sum(out.loss.detach().clone())) / W)
    if args.save:
        parallel.save_sharded(Path(args.save), env, model, {"step": steps(args.sft_steps).stop}, optimizer=opt)
    return {"losses": losses, "norm": weight_norm(model)}


def grpo() -> dict:
    model = parallel.build_model(cfg, env, seed=0, **options)
    gcfg = GRPOConfig(group_size=2, prompts_per_step=4, max_new_tokens=6, beta=0.05, lr=1e-2, loss_agg="token")
    trainer = GRPO(model, gcfg, [], prompt_ids=None, decode=None, pad_id=0, stop_ids=(1,),
                   make_reference=lambda: parallel.build_model(cfg, env, **options), world_size=W)
    if args.load:
        parallel.load_sharded(Path(args.load), model, trainer.optimizer, trainer.ref)
    losses = []
    for step in steps(args.grpo_steps):
        g = torch.Generator().manual_seed(2000 + step)
        N, P, C = 8, 5, 6
        lengths = torch.randint(1, C + 1, (N,), generator=g)                 # uneven: the token normaliser matters
        rewards = torch.rand(N, generator=g)
        mine = torch.arange(N).view(4, 2)[R::W].flatten()                    # whole groups (G = 2) per rank
        n = len(mine)
        r = Rollout([None] * n, batch(step, 4, P).repeat_interleave(2, dim=0)[mine],
                    torch.ones(n, P, dtype=torch.bool), batch(step + 500, N, C)[mine],
                    (torch.arange(C) < lengths.unsqueeze(1))[mine], torch.ones(n, dtype=torch.bool),
                    torch.zeros(n, C), lengths[mine], [""] * n, rewards[mine])
        trainer.step_count = step
        upd = trainer.update(r, advantages(r.rewards, 2))
        losses.append(float(parallel.all_reduce_sum(torch.tensor(upd["loss"]))) / W)  # the ranks' mean
    if args.save:  # the MTP module gets no gradient in GRPO, hence no AdamW state: resume must cope
        parallel.save_sharded(Path(args.save), env, model, {"step": steps(args.grpo_steps).stop},
                              optimizer=trainer.optimizer, ref=trainer.ref)
    prompts = batch(99, 3, 4).tolist()
    prompts = [prompts[0][:2], prompts[1], prompts[2][:3]]
    with parallel.rollout_mode(model):
        tokens = generate(model, prompts, 5, pad_id=0, generator=torch.Generator().manual_seed(3)).tokens.tolist()
    # this rank's own prompts, with stop ids that end rows (and ranks) at different steps: gathering
    # block by block (every rank in every forward until all are done) samples what gathering all does
    outs = []
    for gather_all in (True, False):
        with parallel.rollout_mode(model, gather_all) as sync_stop:
            gen = generate(model, prompts[R::W], 6, pad_id=0, stop_ids=tuple(range(3, 40)), sync_stop=sync_stop,
                           generator=torch.Generator().manual_seed(4 + R))
            outs.append((gen.tokens.tolist(), gen.mask.tolist()))
    agree = int(parallel.all_reduce_sum(torch.tensor(int(outs[0] == outs[1])))) == W
    return {"losses": losses, "norm": weight_norm(model), "tokens": tokens, "blocks_agree": agree}


result = {mode: {"sft": sft, "grpo": grpo}[mode]() for mode in args.modes}
if env.is_main:
    Path(args.out).write_text(json.dumps({"world_size": W, **result}))
parallel.teardown(env)
