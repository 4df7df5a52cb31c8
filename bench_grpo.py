"""Benchmark of a GRPO step (grpo.py) against TRL's GRPOTrainer: completion tokens per second on this CPU.

The same setup on both sides: the tiny pipeline's tokenizer and arithmetic prompts (stages.make_data) in
the R1-Zero template; the `tiny` model with the same initial weights (transformers' DeepseekV3ForCausalLM
loads ours through hf.save_hf_checkpoint); P prompts x G completions of exactly L tokens per step at
temperature 1 (ours has no stop token, TRL gets min_new_tokens = L); the same beta, clip range, "grpo"
loss aggregation and accuracy + format rewards; one optimizer step per batch.
- Ours: rollout and update tokens/s and the share of the step spent generating, from GRPO.step's timings.
- TRL (no vLLM, fp32, no gradient checkpointing): wall time per optimizer step, its logging included.
The two alternate step by step (ours runs from a TRL callback, outside TRL's timing), the first step of
each is warmup, and the headline is the ratio of end-to-end completion tokens/s. One torch thread by
default: the machine is shared, and threads beyond its idle cores measure the scheduler, not the code.
TRL (with accelerate and datasets) is a benchmark-only dependency: `pip install trl`.
Run: python bench_grpo.py [--group-size 8] [--prompts 8] [--max-new-tokens 48] [--steps 6] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import warnings

import torch

import stages
import tasks
from grpo import GRPO, GRPOConfig
from hf import config_to_hf, save_hf_checkpoint
from model import Transformer, count_parameters, get_config
from rewards import RewardSpec, accuracy_reward, format_reward
from tokenizer import BOS, EOS, PAD, Tokenizer

TARGET = 3.0                     # ours / TRL, end-to-end completion tokens/s


def load_avg() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


# -------------------------------------------------------------------------------------------------
# Shared setup

class TimedRewards:
    """The R1-Zero rewards (accuracy + format) with the seconds spent in them, for either trainer."""

    def __init__(self):
        self.seconds = 0.0

    def timed(self, fn):
        def run(completion, problem):
            start = time.perf_counter()
            try:
                return fn(completion, problem)
            finally:
                self.seconds += time.perf_counter() - start
        return run

    def specs(self) -> list[RewardSpec]:
        return [RewardSpec("accuracy", self.timed(accuracy_reward)), RewardSpec("format", self.timed(format_reward))]


def pipeline_data(seed: int) -> tuple[Tokenizer, list]:
    """The tiny pipeline's tokenizer (BPE on its generated corpus, asked for 1024 ids) and arithmetic problems."""
    cfg = stages.pipeline_preset("tiny")
    data = stages.make_data(cfg, seed)
    return Tokenizer.train(stages.tokenizer_texts(data), cfg.vocab_size), data.train


def hf_tokenizer(tok: Tokenizer):
    """A PreTrainedTokenizerFast that gives exactly our ids: the same ranks as a byte-level BPE, the same
    split pattern, BOS prepended to every prompt, and our BOS / EOS / PAD as its special tokens."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as RustTokenizer
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_char = bytes_to_unicode()

    def chars(token: bytes) -> str:
        return "".join(byte_char[b] for b in token)

    ranks = tok.mergeable_ranks
    # tiktoken merges the adjacent pair whose concatenation has the lowest rank; listing every split of
    # each token at that token's rank makes the Rust BPE do the same.
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        merges += sorted(splits, key=lambda lr: (ranks[lr[0]], ranks[lr[1]]))
    rust = RustTokenizer(models.BPE({chars(t): r for t, r in ranks.items()},
                                    [(chars(a), chars(b)) for a, b in merges], ignore_merges=True))
    rust.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tok.pat_str), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    rust.decoder = decoders.ByteLevel()
    rust.add_special_tokens([BOS, EOS, PAD])
    rust.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, tok.bos_id)])
    hf = PreTrainedTokenizerFast(tokenizer_object=rust, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                 padding_side="left")
    if (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) != (tok.bos_id, tok.eos_id, tok.pad_id):
        raise RuntimeError("the transformers tokenizer's special ids differ from ours")
    return hf


# -------------------------------------------------------------------------------------------------
# The two trainers

class Ours:
    """grpo.GRPO on our model, one `step` per call, with the per-step metrics kept."""

    def __init__(self, model: Transformer, tok: Tokenizer, problems: list, args):
        self.rewards = TimedRewards()
        cfg = GRPOConfig(group_size=args.group_size, prompts_per_step=args.prompts, max_new_tokens=args.max_new_tokens,
                         beta=args.beta, temperature=1.0, lr=args.lr, loss_agg="grpo")
        # No stop token: every completion is max_new_tokens long, as TRL's with min_new_tokens.
        self.grpo = GRPO(model, cfg, self.rewards.specs(),
                         prompt_ids=lambda p: tok.encode(tasks.format_prompt(p.question), bos=True),
                         decode=tok.decode, pad_id=tok.pad_id, stop_ids=(), seed=args.seed)
        self.problems, self.P = problems, args.prompts
        self.steps: list[dict] = []

    def step(self):
        i = len(self.steps)
        batch = self.problems[i * self.P:(i + 1) * self.P]
        reward_s = self.rewards.seconds
        start = time.perf_counter()
        m = self.grpo.step(batch)
        wall = time.perf_counter() - start
        self.steps.append({"wall_s": wall, "rollout_s": m["rollout_s"], "update_s": m["update_s"],
                           "reward_s": self.rewards.seconds - reward_s, "tokens": m["rollout_tokens"],
                           "update_tokens": m["update_tokens"]})


def make_trl_trainer(checkpoint: str, hf_tok, problems: list, args, tmp: str, between_steps):
    """GRPOTrainer on transformers' DeepseekV3ForCausalLM from `checkpoint`, one optimizer step per
    P prompts x G completions; `between_steps()` runs after each of its steps, outside its timing."""
    import transformers
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer

    transformers.logging.set_verbosity_error()  # the MTP layer in the checkpoint is "unexpected" to it
    transformers.logging.disable_progress_bar()
    # transformers 5 renames gradient_checkpointing, which TRL's config still sets (off here, as ours has none).
    warnings.filterwarnings("ignore", message=".*checkpointing.*", category=FutureWarning)
    rewards = TimedRewards()
    specs = rewards.specs()

    def reward_fn(spec):
        def fn(completions, problem_index, **_):
            return [spec.fn(c, problems[i]) for c, i in zip(completions, problem_index)]
        fn.__name__ = spec.name
        return fn

    class TimedTrainer(GRPOTrainer):
        """Keeps the seconds, completion tokens and prompt lengths of each generate call."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.generations: list[tuple[float, int, list[int]]] = []

        def _generate_single_turn(self, prompt_ids, *rest, **kw):
            start = time.perf_counter()
            completion_ids, logprobs = super()._generate_single_turn(prompt_ids, *rest, **kw)
            self.generations.append((time.perf_counter() - start, sum(map(len, completion_ids)),
                                     [len(p) for p in prompt_ids]))
            return completion_ids, logprobs

    class Interleave(TrainerCallback):
        """TRL's step i lasts from the end of `between_steps` after step i - 1 to the end of step i."""

        def __init__(self):
            self.walls, self.reward_s, self.mark, self.reward_mark = [], [], 0.0, 0.0

        def on_train_begin(self, *_, **__):
            self.mark, self.reward_mark = time.perf_counter(), rewards.seconds

        def on_step_end(self, *_, **__):
            self.walls.append(time.perf_counter() - self.mark)
            self.reward_s.append(rewards.seconds - self.reward_mark)
            between_steps()
            self.mark, self.reward_mark = time.perf_counter(), rewards.seconds

    model = transformers.DeepseekV3ForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    model.generation_config.eos_token_id = None  # config_to_hf writes DeepSeek's eos id 1; ours is the tokenizer's
    data = Dataset.from_dict({"prompt": [tasks.format_prompt(p.question) for p in problems],
                              "problem_index": list(range(len(problems)))})
    config = TRLConfig(
        output_dir=os.path.join(tmp, "trl"), num_generations=args.group_size,
        per_device_train_batch_size=args.prompts * args.group_size, gradient_accumulation_steps=1,
        num_iterations=1, max_completion_length=args.max_new_tokens, beta=args.beta, temperature=1.0,
        learning_rate=args.lr, epsilon=0.2, loss_type="grpo", scale_rewards="group", max_grad_norm=1.0,
        generation_kwargs={"min_new_tokens": args.max_new_tokens}, max_steps=args.steps + 1,
        shuffle_dataset=False, use_vllm=False, bf16=False, fp16=False, gradient_checkpointing=False,
        use_cpu=True, dataloader_num_workers=0, report_to=[], logging_steps=1, save_strategy="no",
        disable_tqdm=True, log_completions=False, seed=args.seed,
        optim="adamw_torch_fused")  # the fused AdamW that ours uses too
    interleave = Interleave()
    trainer = TimedTrainer(model=model, reward_funcs=[reward_fn(s) for s in specs], args=config,
                           train_dataset=data, processing_class=hf_tok, callbacks=[interleave])
    trainer.remove_callback(PrinterCallback)
    return trainer, interleave


# -------------------------------------------------------------------------------------------------
# The benchmark

def summarise(walls: list[float], tokens: list[int]) -> dict:
    return {"seconds_per_step": statistics.median(walls), "tokens_per_step": int(statistics.median(tokens)),
            "tokens_per_s": sum(tokens) / sum(walls), "step_walls": walls, "tokens": tokens}


def bench(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    P, G, L, n = args.prompts, args.group_size, args.max_new_tokens, args.steps + 1
    tok, problems = pipeline_data(args.seed)
    cfg = get_config("tiny", vocab_size=tok.vocab_size)
    problems = problems[:P * n]
    prompt_ids = [tok.encode(tasks.format_prompt(p.question), bos=True) for p in problems]
    model = Transformer(cfg)
    report = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__, "load_before": load_avg()},
        "config": {"model": "tiny", **count_parameters(model), "vocab_size": tok.vocab_size, "group_size": G,
                   "prompts": P, "max_new_tokens": L, "beta": args.beta, "lr": args.lr, "timed_steps": args.steps,
                   "prompt_tokens_mean": statistics.mean(map(len, prompt_ids)),
                   "completions_per_step": P * G, "hf_config": config_to_hf(cfg)},
    }
    ours = Ours(model, tok, problems, args)
    with tempfile.TemporaryDirectory() as tmp:
        if args.skip_trl:
            for _ in range(n):
                ours.step()
        else:
            import transformers
            import trl
            report["machine"].update(transformers=transformers.__version__, trl=trl.__version__)
            hf_tok = hf_tokenizer(tok)
            if hf_tok([tasks.format_prompt(p.question) for p in problems])["input_ids"] != prompt_ids:
                raise RuntimeError("the transformers tokenizer does not give our prompt ids")
            # Before ours trains: TRL starts from the same weights (its reference model loads them too).
            checkpoint = save_hf_checkpoint(model, os.path.join(tmp, "checkpoint"))
            trainer, trl_times = make_trl_trainer(checkpoint, hf_tok, problems, args, tmp, ours.step)
            trainer.train()
            gens = trainer.generations
            if len(gens) != n or len(trl_times.walls) != n:
                raise RuntimeError(f"TRL ran {len(trl_times.walls)} steps and {len(gens)} generations, expected {n}")
            if any(lengths != [len(ids) for ids in prompt_ids[i * P:(i + 1) * P] for _ in range(G)]
                   for i, (_, _, lengths) in enumerate(gens)):
                raise RuntimeError("TRL's prompt lengths differ from ours")
            walls, tokens = trl_times.walls[1:], [g[1] for g in gens[1:]]
            generate_s = [g[0] for g in gens[1:]]
            hf_cfg = trainer.model.config
            report["trl"] = {**summarise(walls, tokens),
                             "attention": hf_cfg._attn_implementation, "experts": hf_cfg._experts_implementation,
                             "generate_share": sum(generate_s) / sum(walls),
                             "generate_s_per_step": statistics.median(generate_s),
                             "generate_tokens_per_s": sum(tokens) / sum(generate_s),
                             "reward_s_per_step": statistics.median(trl_times.reward_s[1:])}
    steps = ours.steps[1:]
    if len(ours.steps) != n:
        raise RuntimeError(f"ours ran {len(ours.steps)} steps, expected {n}")

    def total(key):
        return sum(s[key] for s in steps)

    report["ours"] = {
        **summarise([s["wall_s"] for s in steps], [s["tokens"] for s in steps]),
        "rollout_tokens_per_s": total("tokens") / total("rollout_s"),
        "update_tokens_per_s": total("update_tokens") / total("update_s"),
        "rollout_share": total("rollout_s") / total("wall_s"),
        "generate_share": (total("rollout_s") - total("reward_s")) / total("wall_s"),
        "generate_tokens_per_s": total("tokens") / (total("rollout_s") - total("reward_s")),
        "rollout_s_per_step": statistics.median(s["rollout_s"] for s in steps),
        "update_s_per_step": statistics.median(s["update_s"] for s in steps),
        "reward_s_per_step": statistics.median(s["reward_s"] for s in steps),
    }
    for side in ("ours", "trl"):
        if side in report and report[side]["tokens"] != [P * G * L] * args.steps:
            raise RuntimeError(f"{side} generated {report[side]['tokens']} tokens per step, expected {P * G * L}")
    if "trl" in report:
        ratio = report["ours"]["tokens_per_s"] / report["trl"]["tokens_per_s"]
        # Each TRL step and the ours step right after it ran under the same load: their ratios show the noise.
        pairs = [t / o for t, o in zip(report["trl"]["step_walls"], report["ours"]["step_walls"])]
        report.update(ratio=ratio, pair_ratios=pairs, target_met=ratio >= TARGET)
    report["machine"]["load_after"] = load_avg()
    return report


def print_report(r: dict):
    m, c = r["machine"], r["config"]
    versions = f"torch {m['torch']}" + (f", transformers {m['transformers']}, trl {m['trl']}" if "trl" in m else "")
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['threads']} torch threads; {versions}")
    print(f"load average (1/5/15 min): {m['load_before']} before, {m['load_after']} after")
    print(f"model tiny: {c['total']:,} parameters ({c['active']:,} active), vocab {c['vocab_size']}, fp32")
    print(f"GRPO step: {c['prompts']} prompts x G={c['group_size']} = {c['completions_per_step']} completions of "
          f"{c['max_new_tokens']} tokens, prompts {c['prompt_tokens_mean']:.1f} tokens on average, beta {c['beta']}, "
          f"lr {c['lr']}; {c['timed_steps']} timed steps after 1 warmup" + (", alternating" if "trl" in r else ""))
    print()
    print(f"  {'':<34} {'s/step':>8} {'tokens/step':>12} {'tokens/s':>10} {'generate share':>15}")
    rows = [("ours (grpo.GRPO)", r["ours"])] + ([("TRL GRPOTrainer", r["trl"])] if "trl" in r else [])
    for name, v in rows:
        print(f"  {name:<34} {v['seconds_per_step']:>8.2f} {v['tokens_per_step']:>12,} {v['tokens_per_s']:>10,.0f} "
              f"{v['generate_share']:>15.0%}")
    o = r["ours"]
    print()
    print("ours, per step (median):")
    print(f"  rollout   {o['rollout_s_per_step']:6.2f} s  {o['rollout_tokens_per_s']:8,.0f} tokens/s  "
          f"({o['rollout_share']:.0%} of the step; rewards {o['reward_s_per_step'] * 1e3:.1f} ms of it)")
    print(f"  update    {o['update_s_per_step']:6.2f} s  {o['update_tokens_per_s']:8,.0f} tokens/s  "
          f"(reference + policy forward, backward, AdamW)")
    if "trl" not in r:
        return
    t = r["trl"]
    print(f"TRL, per step (median), transformers' default {t['attention']} attention and {t['experts']} experts:")
    print(f"  generate  {t['generate_s_per_step']:6.2f} s  {t['generate_tokens_per_s']:8,.0f} tokens/s")
    print(f"  the rest  {t['seconds_per_step'] - t['generate_s_per_step']:6.2f} s  (tokenizing, rewards, reference and "
          f"policy forward, backward, AdamW, logging)")
    print()
    pairs = r["pair_ratios"]
    print(f"end-to-end completion tokens/s, ours / TRL = {r['ratio']:.2f}x (target >= {TARGET}x): "
          f"{'met' if r['target_met'] else 'MISSED'}")
    print(f"  per step pair (a TRL step, then ours): median {statistics.median(pairs):.2f}x, "
          f"range {min(pairs):.2f}x - {max(pairs):.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group-size", type=int, default=8, help="G, completions per prompt")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="L, tokens per completion")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per trainer, after one warmup step")
    parser.add_argument("--beta", type=float, default=0.01, help="KL weight (both trainers)")
    parser.add_argument("--lr", type=float, default=3e-4, help="learning rate (the tiny pipeline's R1-Zero stage)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads, both trainers (0 = torch's default; more than the idle cores "
                             "measures the scheduler, not the code)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-trl", action="store_true", help="time ours alone")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()
    report = bench(args)
    print_report(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
