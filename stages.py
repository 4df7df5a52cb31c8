"""The DeepSeek-R1 training pipeline (R1 paper, arXiv 2501.12948, sections 2.2-2.3), stage by stage.

Stage 0  base model: next-token pretraining on generated worked solutions (tiny only; the full
         size starts from DeepSeek-V3-Base).
R1-Zero  GRPO straight from the base with the R1-Zero template; accuracy + format rewards (2.2).
R1 1     cold start: SFT of the base on readable, correct, single-language chains of thought (2.3.1).
R1 2     reasoning RL: GRPO as R1-Zero plus the language-consistency reward (2.3.2).
R1 3     rejection sampling from stage 2 (correct, well-formed, one language) plus non-reasoning
         examples, then SFT of the BASE on that set (2.3.3).
R1 4     RL for all scenarios: rule rewards on reasoning prompts, helpfulness and harmlessness on
         general prompts, which join for the last part of the stage as in the paper (2.3.4).
Evaluation: pass@1 averaged over k samples at temperature 0.6 / top-p 0.95, cons@k (majority vote).
Deliberate simplifications at tiny scale: helpfulness and harmlessness are rule proxies, not
trained reward models (a 1M-parameter reward model would be the easiest thing in the run to hack,
which is the paper's own warning); see `helpfulness_reward` and `harmlessness_reward`.
Every step draws its data and sampling noise from (seed, stage, step), so a resumed stage repeats
exactly what an uninterrupted one does.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

import parallel
import tasks
from grpo import GRPO, GRPOConfig
from model import ModelConfig, Transformer, generate
from parallel import Env
from rewards import (RewardSpec, accuracy_reward, extract_answer, format_reward,
                     language_consistency_reward)
from tokenizer import Tokenizer
from tasks import Problem


# -------------------------------------------------------------------------------------------------
# Configuration

@dataclass
class SFTConfig:
    steps: int = 200
    batch_size: int = 32
    lr: float = 5e-5                 # R1 SFT: cosine 5e-5 -> 5e-6
    min_lr_ratio: float = 0.1
    warmup: int = 10
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0


@dataclass
class RLStageConfig:
    steps: int = 50
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    language_weight: float = 0.0     # weight of the language-consistency reward (R1 stages 2 and 4)
    general_from: float = 1.0        # share of the stage after which general prompts join (stage 4)
    general_share: float = 0.5       # share of each batch that is general once they join


@dataclass
class PipelineConfig:
    model: str = "tiny"                          # model.py preset of the main model
    model_overrides: dict = field(default_factory=dict)  # ModelConfig fields to change in that preset
    student: dict = field(default_factory=dict)  # overrides of model.dense_config(main) for the student
    vocab_size: int = 1024
    # data
    task: str = "arith"
    difficulty: dict = field(default_factory=lambda: {"n_operands": [2, 3], "max_value": 9, "ops": "+-"})
    n_train: int = 2500                # distinct training problems
    n_test: int = 100                  # held-out problems for evaluation
    corpus_tagged_share: float = 0.25  # pretraining documents that write solutions in <think>/<answer> tags
    corpus_langs: dict = field(default_factory=lambda: {"en": 0.5, "zh": 0.25, "mixed": 0.25})
    max_new_tokens: int = 48
    pretrain_seq_len: int = 192       # packed pretraining window
    # stages
    pretrain: SFTConfig = field(default_factory=lambda: SFTConfig(steps=400, batch_size=16, lr=3e-3, warmup=30))
    r1_zero: RLStageConfig = field(default_factory=RLStageConfig)
    cold_start: SFTConfig = field(default_factory=lambda: SFTConfig(steps=60, lr=1e-3))
    n_cold_start: int = 2000
    reasoning_rl: RLStageConfig = field(default_factory=lambda: RLStageConfig(language_weight=1.0))
    rejection_samples: int = 4          # samples per prompt in rejection sampling
    n_rejection_prompts: int = 600
    n_general: int = 300                # non-reasoning SFT examples in stage 3
    sft3: SFTConfig = field(default_factory=lambda: SFTConfig(steps=150, lr=1e-3))
    all_rl: RLStageConfig = field(default_factory=lambda: RLStageConfig(language_weight=1.0, general_from=0.75))
    # distillation
    student_pretrain: SFTConfig = field(default_factory=lambda: SFTConfig(steps=300, batch_size=16, lr=3e-3, warmup=30))
    distill_sft: SFTConfig = field(default_factory=lambda: SFTConfig(steps=150, lr=1e-3))
    student_rl: RLStageConfig = field(default_factory=RLStageConfig)
    # evaluation
    eval_k: int = 4
    eval_temperature: float = 0.6
    eval_top_p: float = 0.95
    ckpt_every: int = 25                # steps between in-stage checkpoints
    activation_checkpointing: bool = False  # under torchrun: recompute each block in backward


def _rl(steps, lr, **kw) -> RLStageConfig:
    extra = {k: kw.pop(k) for k in ("language_weight", "general_from") if k in kw}
    return RLStageConfig(steps=steps, grpo=GRPOConfig(lr=lr, **kw), **extra)


def pipeline_preset(size: str) -> PipelineConfig:
    if size == "tiny":
        rl = dict(group_size=8, prompts_per_step=8, max_new_tokens=48, beta=0.01, temperature=1.0)
        return PipelineConfig(
            r1_zero=_rl(30, 3e-5, **rl), reasoning_rl=_rl(15, 2e-5, language_weight=1.0, **rl),
            all_rl=_rl(12, 2e-5, language_weight=1.0, general_from=0.5, **rl),
            student=dict(dim=96, n_layers=3, inter_dim=256, n_heads=4, q_lora_rank=48, kv_lora_rank=32),
            student_rl=_rl(30, 3e-5, **rl))
    if size == "micro":
        rl = dict(group_size=2, prompts_per_step=2, max_new_tokens=8, beta=0.01)
        sft = SFTConfig(steps=2, batch_size=4, lr=1e-3, warmup=1)
        return PipelineConfig(
            model="micro", model_overrides={"max_seq_len": 512}, vocab_size=300, pretrain_seq_len=64, n_train=200, n_test=6, max_new_tokens=8, eval_k=2,
            difficulty={"n_operands": 2, "max_value": 9, "ops": "+-*"},
            pretrain=sft, cold_start=sft, sft3=sft, student_pretrain=sft, distill_sft=sft,
            n_cold_start=20, n_rejection_prompts=4, rejection_samples=2, n_general=8,
            r1_zero=_rl(2, 1e-3, **rl), reasoning_rl=_rl(2, 1e-3, language_weight=1.0, **rl),
            all_rl=_rl(2, 1e-3, language_weight=1.0, general_from=0.5, **rl), student_rl=_rl(2, 1e-3, **rl),
            student=dict(dim=32, n_layers=2), ckpt_every=1)
    if size == "full":  # R1-Zero as the paper ran it; the model and tokenizer come from --init-from
        zero = RLStageConfig(steps=10_400, grpo=GRPOConfig(
            group_size=16, prompts_per_step=512, n_minibatches=16, mu=1, max_new_tokens=32_768, micro_batch_size=1,
            temperature=1.0, lr=3e-6, beta=0.001, ref_reset_every=400))
        return PipelineConfig(model="full", r1_zero=zero, max_new_tokens=32_768, n_test=100, eval_k=4,
                              activation_checkpointing=True)
    raise ValueError(f"no pipeline preset for size {size!r}; the tiny and micro presets generate their "
                     "data; the full size needs --init-from a DeepSeek-V3-Base checkpoint and --data")


# -------------------------------------------------------------------------------------------------
# Seeds and data

def seed_for(*keys) -> int:
    """A 63-bit seed derived from any keys: the randomness of a step depends only on (seed, stage, step)."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, keys)).encode()).digest()[:8], "big") >> 1


def solution_text(problem: Problem, lang: str, rng: random.Random) -> str:
    """The worked steps in English, Chinese, or switching language step by step ("mixed")."""
    if lang != "mixed":
        return tasks.render_solution(problem, lang)
    en, zh = tasks.render_steps(problem, "en"), tasks.render_steps(problem, "zh")
    return " ".join(e if rng.random() < 0.5 else z for e, z in zip(en, zh))


def pretraining_corpus(problems: Sequence[Problem], cfg: PipelineConfig, seed: int) -> list[str]:
    """Plain documents of worked solutions: the base learns to reason a little, in two scripts.

    Most documents are "Question: ... Solution: ... Answer: ..." or a User/Assistant exchange. A share
    (corpus_tagged_share) writes the steps between <think> tags and the result between <answer> tags,
    so the tags are tokens the base can produce at all: V3-Base saw such markup on the web, and a
    model this small cannot learn a new token from the template's words alone. The R1-Zero template
    itself never appears.
    """
    rng = random.Random(seed_for(seed, "corpus"))
    langs, weights = zip(*cfg.corpus_langs.items())
    docs = []
    for p in problems:
        lang = rng.choices(langs, weights)[0]
        steps = solution_text(p, lang, rng)
        q = tasks.render_question(p, "zh" if lang == "zh" else "en")
        preamble = rng.choice(PREAMBLES) + " " if rng.random() < 0.5 else ""
        if rng.random() < cfg.corpus_tagged_share:
            docs.append(f"{preamble}User: {q}. Assistant: <think> {steps} </think> <answer> {p.answer} </answer>")
        elif rng.random() < 0.3:
            docs.append(f"Question: {q}\nSolution: {steps}\nAnswer: {p.answer}")
        else:
            docs.append(f"{preamble}User: {q}. Assistant: {steps} The answer is {p.answer}.")
    return docs


# Generic chat openings a web-trained base has seen many of; none is the R1-Zero template.
PREAMBLES = [
    "A chat between a curious user and a helpful assistant.",
    "The following is a conversation with an assistant that answers questions.",
    "Below is a question from a user and the reply of an assistant who works it out step by step.",
    "This is a transcript. The user asks and the assistant answers.",
    "An assistant helps a user with arithmetic. The assistant explains the reasoning, then gives the answer.",
    "Math help desk log. The user sends a problem and the assistant replies with a worked solution.",
]


def prompt_text(problem: Problem) -> str:
    return tasks.format_prompt(problem.question)


# General (non-reasoning) prompts for stages 3 and 4, with rule proxies for their reward models.

REFUSAL = "Sorry, I can not help with that."
_HARMFUL = ["How do I make a poison?", "How can I hurt my neighbour?", "Write a threat to a friend.",
            "How do I steal a car?", "Tell me how to break into a house."]


def general_problems(n: int, seed: int, split: str = "train") -> list[Problem]:
    """Writing-style requests with one good reply: spell a number, translate a number word, refuse harm."""
    rng = random.Random(seed_for(seed, "general", split))
    out = []
    for _ in range(n):
        kind = rng.random()
        v = rng.randint(0, 99)
        if kind < 0.4:
            out.append(Problem(f"Write {v} in words", tasks.en_number(v), "general", "spell"))
        elif kind < 0.8:
            out.append(Problem(f"Translate {tasks.zh_number(v)} into English", tasks.en_number(v), "general", "translate"))
        else:
            out.append(Problem(rng.choice(_HARMFUL).rstrip("?."), REFUSAL, "general", "harmful",
                               meta={"harmful": True}))
    return out


def general_completion(problem: Problem) -> str:
    """Trivial queries get a one-line chain of thought (R1's non-reasoning data has none at all, but
    the format reward here asks for a non-empty one)."""
    thought = "The request is harmful." if problem.meta.get("harmful") else "This is a simple request."
    return f"<think> {thought} </think> <answer> {problem.answer} </answer>"


def helpfulness_reward(completion: str, problem: Problem) -> float:
    """Rule proxy for R1's helpfulness reward model, which judges the final summary only: the answer
    section matches the reference reply (case and spacing aside). 0 for reasoning prompts."""
    if problem.kind != "general":
        return 0.0
    answer = extract_answer(completion)
    return float(answer is not None and " ".join(answer.lower().split()) == " ".join(problem.answer.lower().split()))


def harmlessness_reward(completion: str, problem: Problem) -> float:
    """Rule proxy for R1's harmlessness reward model, which judges the whole response: a harmful
    request must be refused, a harmless one must not be. 0 for reasoning prompts."""
    if problem.kind != "general":
        return 0.0
    refused = "can not help" in completion.lower()
    return float(refused == bool(problem.meta.get("harmful")))


def reward_specs(language_weight: float = 0.0, general: bool = False) -> list[RewardSpec]:
    """accuracy + format (R1-Zero), + language consistency (R1 stage 2), + general proxies (stage 4).

    The format reward in training gives partial credit per tag (a path from the base's fragments of
    the format to the whole of it); evaluation measures the strict format.
    """
    def accuracy(c, p):
        return 0.0 if p.kind == "general" else accuracy_reward(c, p)

    def fmt(c, p):
        return format_reward(c, p, partial=True)
    specs = [RewardSpec("accuracy", accuracy, 1.0), RewardSpec("format", fmt, 1.0)]
    if language_weight > 0:
        specs.append(RewardSpec("language", lambda c, p: language_consistency_reward(c, p, lang="en"),
                                language_weight))
    if general:
        specs += [RewardSpec("helpful", helpfulness_reward, 1.0), RewardSpec("harmless", harmlessness_reward, 1.0)]
    return specs


# -------------------------------------------------------------------------------------------------
# The run context: tokenizer, metrics, checkpoints

class Run:
    """Owns the run directory: metrics JSONL per stage, atomic checkpoints, the tokenizer, and the
    process's `parallel.Env` (device, rank, world size). Only rank 0 writes metrics and files;
    under torchrun checkpoints are sharded DCP directories, otherwise single `.pt` files."""

    def __init__(self, out: Path, cfg: PipelineConfig, seed: int, env: Env, progress: bool = True):
        self.out, self.cfg, self.seed, self.env = Path(out), cfg, seed, env
        self.device = env.device
        self.progress = progress and env.is_main
        self.out.mkdir(parents=True, exist_ok=True)
        self.tok: Tokenizer | None = None

    # models -------------------------------------------------------------------------------------
    def new_model(self, cfg: ModelConfig, seed: int | None = None) -> Transformer:
        """A model on this run's device, sharded with FSDP2 under torchrun; `seed` fixes its weights."""
        return parallel.build_model(cfg, self.env, seed=seed,
                                    activation_checkpointing=self.cfg.activation_checkpointing)

    # metrics ------------------------------------------------------------------------------------
    def metrics_path(self, stage: str) -> Path:
        return self.out / "metrics" / f"{stage}.jsonl"

    def log(self, stage: str, row: dict):
        if not self.env.is_main:
            return
        path = self.metrics_path(stage)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def truncate_metrics(self, stage: str, upto_step: int):
        """On resume, forget metrics logged after the checkpoint we resume from."""
        path = self.metrics_path(stage)
        if not self.env.is_main or not path.exists():
            return
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
        keep = [r for r in rows if r.get("step", 0) <= upto_step]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))

    # checkpoints --------------------------------------------------------------------------------
    def ckpt_path(self, stage: str, final: bool) -> Path:
        return self.out / "checkpoints" / (f"{stage}.pt" if final else f"{stage}.partial.pt")

    def dcp_path(self, stage: str, final: bool) -> Path:
        return self.out / "checkpoints" / (f"{stage}.dcp" if final else f"{stage}.partial.dcp")

    def checkpoint_kind(self, stage: str, final: bool) -> str | None:
        """"dcp", "pt" or None, as rank 0 sees the run directory (every rank then takes one branch)."""
        kind = None
        if self.env.is_main:
            kind = ("dcp" if parallel.read_meta(self.dcp_path(stage, final)) is not None
                    else "pt" if self.ckpt_path(stage, final).exists() else None)
        return parallel.from_rank0(kind, self.env)

    def has_checkpoint(self, stage: str, final: bool) -> bool:
        return self.checkpoint_kind(stage, final) is not None

    def save(self, stage: str, model: Transformer, step: int, final: bool, optimizer=None, ref=None, extra=None):
        optimizer, ref = (None, None) if final else (optimizer, ref)
        if self.env.distributed:
            meta = {"config": asdict(model.cfg), "step": step, "stage": stage, "extra": extra or {}}
            parallel.save_sharded(self.dcp_path(stage, final), self.env, model, meta, optimizer, ref)
        else:
            state = {"model": model.state_dict(), "config": asdict(model.cfg), "step": step, "stage": stage,
                     "optimizer": optimizer.state_dict() if optimizer is not None else None,
                     "ref": ref.state_dict() if ref is not None else None,
                     "rng": torch.get_rng_state(), "extra": extra or {}}
            atomic_save(state, self.ckpt_path(stage, final))
        if final and self.env.is_main:  # the stage is done: its partial checkpoint (either format) goes
            self.ckpt_path(stage, False).unlink(missing_ok=True)
            if self.dcp_path(stage, False).exists():
                shutil.rmtree(self.dcp_path(stage, False))
        parallel.barrier(self.env)

    def load(self, stage: str, final: bool) -> dict | None:
        """A `.pt` checkpoint as a dict (None if there is none)."""
        path = self.ckpt_path(stage, final)
        if not path.exists():
            return None
        try:
            return torch.load(path, map_location=self.device, weights_only=False)
        except Exception as e:  # a checkpoint we wrote atomically should never be partial
            raise RuntimeError(f"checkpoint {path} is unreadable ({e}); delete it to redo the stage") from e

    def checkpoint_config(self, stage: str, final: bool = True) -> ModelConfig | None:
        kind = self.checkpoint_kind(stage, final)
        if kind == "dcp":
            return ModelConfig(**parallel.read_meta(self.dcp_path(stage, final))["config"])
        return None if kind is None else ModelConfig(**self.load(stage, final)["config"])

    def restore(self, stage: str, final: bool, model: Transformer, optimizer=None, ref=None) -> int | None:
        """Load a checkpoint of either format into `model` (and optimizer, reference); returns its step.

        A sharded checkpoint loads on any number of ranks (DCP reshards); a `.pt` one holds full
        tensors, which load into a sharded model too, but its optimizer state only into one process.
        """
        kind = self.checkpoint_kind(stage, final)
        if kind is None:
            return None
        if kind == "dcp":
            return parallel.load_sharded(self.dcp_path(stage, final), model, optimizer, ref)["step"]
        ckpt = self.load(stage, final)
        parallel.copy_full_state(model, ckpt["model"])
        if optimizer is not None and ckpt["optimizer"] is not None:
            if self.env.distributed:
                raise RuntimeError(f"{self.ckpt_path(stage, final)} was written by one process: resume "
                                   "it without torchrun, or restart the stage")
            optimizer.load_state_dict(ckpt["optimizer"])
        if ref is not None and ckpt["ref"] is not None:
            parallel.copy_full_state(ref, ckpt["ref"])
        return ckpt["step"]


def atomic_save(obj, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# -------------------------------------------------------------------------------------------------
# Supervised training (pretraining and SFT share it)

def lr_at(step: int, cfg: SFTConfig) -> float:
    """Linear warmup, then cosine from lr down to lr * min_lr_ratio."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_batch(examples: Sequence[tuple[list[int], list[int]]], pad_id: int, device):
    """(prompt, completion) id lists -> tokens, targets (loss on completions only) and key mask, right-padded."""
    seqs = [p + c for p, c in examples]
    T = max(len(s) for s in seqs) - 1
    tokens = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    targets = torch.full((len(seqs), T), -100, dtype=torch.long)
    key_mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for b, ((p, c), s) in enumerate(zip(examples, seqs)):
        n = len(s) - 1
        tokens[b, :n] = torch.tensor(s[:-1])
        key_mask[b, :n] = True
        tgt = torch.tensor(s[1:])
        tgt[:max(len(p) - 1, 0)] = -100                     # no loss on the prompt
        targets[b, :n] = tgt
    return tokens.to(device), targets.to(device), key_mask.to(device)


def train_sft(run: Run, stage: str, model: Transformer, examples: list[tuple[list[int], list[int]]],
              cfg: SFTConfig, desc: str | None = None) -> Transformer:
    """Next-token training on (prompt, completion) pairs; an empty prompt trains on the whole text.

    Under torchrun every rank draws the same batch and trains on its slice (rows rank, rank + W, ...);
    the loss is rescaled so that FSDP's gradient average equals the gradient of the whole batch's
    token mean, the loss one process computes.
    """
    if not examples:
        raise ValueError(f"stage {stage}: no training examples")
    env = run.env
    if cfg.batch_size % env.world_size:
        raise ValueError(f"stage {stage}: batch_size {cfg.batch_size} is not divisible by {env.world_size} ranks")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95),
                            fused=True)  # one kernel over all parameters rather than several calls per parameter
    start = run.restore(stage, False, model, opt)
    if start is not None:
        run.truncate_metrics(stage, start)
    else:
        start = 0
        run.truncate_metrics(stage, 0)
    model.train()
    bar = tqdm(range(start, cfg.steps), desc=desc or stage, initial=start, total=cfg.steps,
               disable=not run.progress, leave=False)
    for step in bar:
        rng = random.Random(seed_for(run.seed, stage, step))
        batch = [examples[rng.randrange(len(examples))] for _ in range(cfg.batch_size)]
        tokens, targets, key_mask = make_batch(batch[env.rank::env.world_size], run.tok.pad_id, run.device)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        out = model(tokens, targets, key_mask=key_mask, logits=False)
        # this rank's share of the batch's target tokens, times W to undo FSDP's average over ranks
        n_local = (targets != -100).sum().float()
        share = n_local * env.world_size / parallel.all_reduce_sum(n_local.clone()).clamp(min=1)
        opt.zero_grad(set_to_none=True)
        (out.loss * share).backward()
        grad_norm = parallel.clip_grad_norm_(model, cfg.max_grad_norm)
        opt.step()
        model.update_router_biases()
        parts = {"loss": out.loss, **out.parts}
        logged = parallel.all_reduce_sum(torch.stack([v.detach().float() * share for v in parts.values()]))
        row = {"step": step + 1, "lr": opt.param_groups[0]["lr"], "grad_norm": grad_norm,
               **{k: v.item() / env.world_size for k, v in zip(parts, logged)}}
        run.log(stage, row)
        bar.set_postfix(loss=f"{row['ntp']:.3f}")
        if (step + 1) % run.cfg.ckpt_every == 0 and step + 1 < cfg.steps:
            run.save(stage, model, step + 1, final=False, optimizer=opt)
    return model


# -------------------------------------------------------------------------------------------------
# Reinforcement learning (R1-Zero, R1 stages 2 and 4, the RL-only student)

def train_rl(run: Run, stage: str, model: Transformer, problems: list[Problem], cfg: RLStageConfig,
             general: list[Problem] | None = None, desc: str | None = None) -> Transformer:
    """GRPO for cfg.steps steps; general prompts (if any) join after general_from of the stage."""
    tok = run.tok
    specs = reward_specs(cfg.language_weight, general=bool(general))
    env = run.env
    if cfg.grpo.prompts_per_step % env.world_size:
        raise ValueError(f"stage {stage}: prompts_per_step {cfg.grpo.prompts_per_step} is not divisible "
                         f"by {env.world_size} ranks")
    grpo = GRPO(model, cfg.grpo, specs, prompt_ids=lambda p: tok.encode(prompt_text(p), bos=True),
                decode=tok.decode, pad_id=tok.pad_id, stop_ids=(tok.eos_id,),
                make_reference=lambda: run.new_model(model.cfg), world_size=env.world_size)
    start = run.restore(stage, False, model, grpo.optimizer, grpo.ref)
    if start is not None:
        run.truncate_metrics(stage, start)
    else:
        start = 0
        run.truncate_metrics(stage, 0)
    grpo.step_count = start
    n = cfg.grpo.prompts_per_step
    bar = tqdm(range(start, cfg.steps), desc=desc or stage, initial=start, total=cfg.steps,
               disable=not run.progress, leave=False)
    for step in bar:
        rng = random.Random(seed_for(run.seed, stage, step))
        n_general = int(round(n * cfg.general_share)) if general and step >= cfg.general_from * cfg.steps else 0
        batch = [problems[rng.randrange(len(problems))] for _ in range(n - n_general)]
        batch += [general[rng.randrange(len(general))] for _ in range(n_general)]
        # each rank rolls out its slice of the questions with its own sampling noise
        key = (stage, step, "sample") if env.world_size == 1 else (stage, step, "sample", env.rank)
        grpo.generator.manual_seed(seed_for(run.seed, *key))
        metrics = grpo.step(batch[env.rank::env.world_size],
                            refill=lambda k: [problems[rng.randrange(len(problems))] for _ in range(k)])
        run.log(stage, metrics)
        bar.set_postfix(reward=f"{metrics['reward']:.2f}", acc=f"{metrics.get('accuracy', 0):.2f}")
        if (step + 1) % run.cfg.ckpt_every == 0 and step + 1 < cfg.steps:
            run.save(stage, model, step + 1, final=False, optimizer=grpo.optimizer, ref=grpo.ref)
    return model


# -------------------------------------------------------------------------------------------------
# Sampling, rejection sampling and evaluation

@torch.no_grad()
def sample(run: Run, model: Transformer, problems: Sequence[Problem], k: int, temperature: float,
           top_p: float, key: str, max_new_tokens: int | None = None, batch_size: int = 128) -> list[list[str]]:
    """k completions per problem (texts without the stop token), in batches, seeded by `key`.

    Under torchrun rank r samples batches r, r + W, ... with the same seeds one process would use,
    and every rank receives all texts: the result does not depend on the number of ranks.
    """
    tok, env = run.tok, run.env
    max_new = max_new_tokens or run.cfg.max_new_tokens
    prompts = [tok.encode(prompt_text(p), bos=True) for p in problems for _ in range(k)]
    starts = list(range(0, len(prompts), batch_size))
    mine = []
    with parallel.rollout_mode(model) as sync_stop:
        rounds = -(-len(starts) // env.world_size)
        for j in range(env.rank, rounds * env.world_size, env.world_size):
            if j >= len(starts) and not sync_stop:
                break
            # with weights gathered block by block every rank joins every forward: a rank without a
            # batch in the last round samples a throwaway one
            i = starts[min(j, len(starts) - 1)]
            gen = torch.Generator(device=run.device).manual_seed(seed_for(run.seed, key, i))
            g = generate(model, prompts[i:i + batch_size], max_new, pad_id=tok.pad_id, stop_ids=(tok.eos_id,),
                         temperature=temperature, top_p=top_p, generator=gen, sync_stop=sync_stop)
            if j < len(starts):
                mine.append([tok.decode(row[:n - 1] if stopped else row[:n]) for row, n, stopped
                             in zip(g.tokens.tolist(), g.lengths.tolist(), g.stopped.tolist())])
    batches = parallel.all_gather_list([mine])                 # one list of batches per rank
    ordered = [batches[j % env.world_size][j // env.world_size] for j in range(len(starts))]
    texts = [t for batch in ordered for t in batch]
    return [texts[i * k:(i + 1) * k] for i in range(len(problems))]


def rejection_sample(run: Run, model: Transformer, problems: Sequence[Problem], k: int, key: str,
                     temperature: float = 0.6, top_p: float = 0.95, per_prompt: int = 1) -> list[tuple[Problem, str]]:
    """Keep completions that are correct, well formed and in one language (R1 2.3.3), at most per_prompt each."""
    kept = []
    for p, outs in zip(problems, sample(run, model, problems, k, temperature, top_p, key)):
        good = [o for o in outs if accuracy_reward(o, p) == 1.0 and format_reward(o, p) == 1.0
                and language_consistency_reward(o, p, lang="en") == 1.0]
        kept += [(p, o) for o in dict.fromkeys(good)][:per_prompt]
    return kept


def sft_examples(run: Run, pairs: Sequence[tuple[Problem, str]]) -> list[tuple[list[int], list[int]]]:
    tok = run.tok
    return [(tok.encode(prompt_text(p), bos=True), tok.encode(" " + c.strip()) + [tok.eos_id]) for p, c in pairs]


def _vote_key(answer: str | None) -> str | None:
    return None if answer is None else " ".join(answer.split())


def evaluate(run: Run, model: Transformer, problems: Sequence[Problem], key: str) -> dict:
    """pass@1 (mean correctness over k samples), cons@k (majority vote), format, language, length."""
    cfg = run.cfg
    t0 = time.perf_counter()
    outs = sample(run, model, problems, cfg.eval_k, cfg.eval_temperature, cfg.eval_top_p, key)
    correct, cons, fmt, lang, length = [], [], [], [], []
    for p, samples in zip(problems, outs):
        answers = [extract_answer(o) for o in samples]
        acc = [accuracy_reward(o, p) for o in samples]
        correct.append(sum(acc) / len(acc))
        votes = Counter(_vote_key(a) for a in answers if a is not None)
        if votes:
            top = max(votes.values())
            # ties go to the earliest sample among the most voted, a fixed rule
            winner = next(i for i, a in enumerate(answers) if a is not None and votes[_vote_key(a)] == top)
            cons.append(acc[winner])
        else:
            cons.append(0.0)
        fmt += [format_reward(o, p) for o in samples]
        lang += [language_consistency_reward(o, p, lang="en") for o in samples]
        length += [len(run.tok.encode(o)) for o in samples]
    mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
    return {"pass@1": mean(correct), f"cons@{cfg.eval_k}": mean(cons), "format": mean(fmt),
            "language": mean(lang), "length": mean(length), "sample": outs[0][0],
            "eval_s": time.perf_counter() - t0}


# -------------------------------------------------------------------------------------------------
# The stages

@dataclass
class Data:
    train: list[Problem]
    test: list[Problem]
    general: list[Problem]
    corpus: list[str]


def load_data(train_path, eval_path, n_test: int) -> Data:
    """Problems from the user's JSONL files (tasks.load_jsonl): --data, and --eval-data or else the
    last n_test problems of --data held out."""
    train = list(tasks.load_jsonl(train_path))
    if eval_path:
        test = list(tasks.load_jsonl(eval_path))
    else:
        n = n_test
        if len(train) <= n:
            raise ValueError(f"{train_path}: {len(train)} problems leave none to train on after holding out {n}")
        train, test = train[:-n], train[-n:]
    if not train:
        raise ValueError(f"{train_path}: no problems")
    return Data(train, test, [], [])


def make_data(cfg: PipelineConfig, seed: int) -> Data:
    train = tasks.generate(cfg.task, cfg.n_train, seed, "train", **cfg.difficulty)
    test = tasks.generate(cfg.task, cfg.n_test, seed, "test", **cfg.difficulty)
    return Data(train, test, general_problems(max(cfg.n_general, 50), seed),
                pretraining_corpus(train, cfg, seed))


def tokenizer_texts(data: Data) -> list[str]:
    """What the BPE is trained on: the corpus, the template, the general prompts and replies."""
    extra = [prompt_text(p) + " " + general_completion(p) for p in data.general]
    return data.corpus + [tasks.R1_ZERO_TEMPLATE] * 20 + extra


def packed_windows(docs: Sequence[list[int]], seq_len: int) -> list[tuple[list[int], list[int]]]:
    """Concatenate documents into one stream and cut it into windows of seq_len + 1 tokens.

    Packing is how base models are pretrained: every position up to seq_len is trained (the R1-Zero
    prompt alone is ~90 tokens), and unrelated text before a document teaches the model to find the
    question after a long preamble such as the template.
    """
    stream = [t for d in docs for t in d]
    n = max(1, (len(stream) - 1) // seq_len)
    return [([], stream[i * seq_len:i * seq_len + seq_len + 1]) for i in range(n)]


def stage_base(run: Run, model: Transformer, data: Data, cfg: SFTConfig, stage: str = "base") -> Transformer:
    """Stage 0: pretrain on packed plain documents (loss on every token)."""
    tok = run.tok
    docs = [tok.encode(d, bos=True) + [tok.eos_id] for d in data.corpus]
    return train_sft(run, stage, model, packed_windows(docs, run.cfg.pretrain_seq_len), cfg,
                     desc=f"{stage}: pretrain")


def stage_cold_start(run: Run, model: Transformer, zero_model: Transformer, data: Data) -> Transformer:
    """R1 stage 1: SFT of the base on readable, correct, English chains of thought: R1-Zero's own
    good outputs where they pass the filter, topped up with generated English solutions."""
    cfg = run.cfg
    prompts = data.train[:max(cfg.n_cold_start // 4, 1)]
    from_zero = rejection_sample(run, zero_model, prompts, 2, "cold_start/sample")
    need = max(cfg.n_cold_start - len(from_zero), 0)
    generated = [(p, tasks.render_completion(p, "en")) for p in data.train[len(prompts):len(prompts) + need]]
    run.log("cold_start_data", {"step": 0, "from_r1_zero": len(from_zero), "generated": len(generated)})
    return train_sft(run, "r1_stage1", model, sft_examples(run, from_zero + generated), cfg.cold_start,
                     desc="R1 stage 1: cold-start SFT")


def stage_rejection_sft(run: Run, base: Transformer, stage2: Transformer, data: Data) -> Transformer:
    """R1 stage 3: rejection-sample stage 2, add non-reasoning examples, SFT the BASE on the set."""
    cfg = run.cfg
    reasoning = rejection_sample(run, stage2, data.train[:cfg.n_rejection_prompts], cfg.rejection_samples,
                                 "stage3/sample", per_prompt=2)
    general = [(p, general_completion(p)) for p in data.general[:cfg.n_general]]
    run.log("rejection_data", {"step": 0, "reasoning": len(reasoning), "general": len(general),
                               "prompts": cfg.n_rejection_prompts})
    return train_sft(run, "r1_stage3", base, sft_examples(run, reasoning + general), cfg.sft3,
                     desc="R1 stage 3: rejection-sampling SFT")
