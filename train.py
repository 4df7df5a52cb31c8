"""The command line: `python train.py --size tiny` runs the whole DeepSeek-R1 pipeline and reports it.

Order: tokenizer, stage 0 (base), R1-Zero, R1 stages 1-4, the student's base, the distilled student
and the RL-only student; each model is evaluated on the held-out split; at the end come PNG plots
and results.md. Every stage writes an atomic checkpoint, so `--resume` after any interruption
(kill -9 included) continues from the last checkpoint and finishes with the same results.
`--ask "What is 3 + 4 * 2?" --init-from RUN/checkpoints/r1_stage4.pt` asks a trained model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

import distill
import hf
import parallel
import stages
from model import ModelConfig, Transformer, get_config
from stages import Data, PipelineConfig, Run
from tokenizer import Tokenizer

MODEL_STAGES = ["base", "r1_zero", "r1_stage1", "r1_stage2", "r1_stage3", "r1_stage4",
                "student_base", "student_distill", "student_rl"]
TITLES = {"base": "base (stage 0)", "r1_zero": "R1-Zero", "r1_stage1": "R1 stage 1 (cold start)",
          "r1_stage2": "R1 stage 2 (reasoning RL)", "r1_stage3": "R1 stage 3 (rejection SFT)",
          "r1_stage4": "R1 stage 4 (all-scenario RL)", "student_base": "student base",
          "student_distill": "student, distilled", "student_rl": "student, RL only"}
RL_STAGES = ["r1_zero", "r1_stage2", "r1_stage4", "student_rl"]
FULL_STAGES = ["base", "r1_zero"]   # --size full: V3-Base from --init-from, then R1-Zero on --data


# -------------------------------------------------------------------------------------------------
# Arguments and overrides

def parse_value(text: str, current):
    """Convert an override string to the type of the field it replaces."""
    if isinstance(current, bool):
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"expected true/false, got {text!r}")
    if isinstance(current, int):
        return int(text)
    if isinstance(current, float):
        return float(text)
    if isinstance(current, (dict, list)):
        return json.loads(text)
    return text


def apply_override(cfg, path: str, text: str):
    """`r1_zero.grpo.lr=1e-3` -> a new config with that field replaced; unknown fields are errors."""
    head, _, rest = path.partition(".")
    names = {f.name for f in dataclasses.fields(cfg)}
    if head not in names:
        raise ValueError(f"unknown setting {path!r}: {type(cfg).__name__} has no field {head!r} "
                         f"(fields: {', '.join(sorted(names))})")
    current = getattr(cfg, head)
    if rest:
        if not dataclasses.is_dataclass(current):
            raise ValueError(f"setting {path!r}: {head!r} has no sub-fields")
        return dataclasses.replace(cfg, **{head: apply_override(current, rest, text)})
    if dataclasses.is_dataclass(current):
        raise ValueError(f"setting {path!r} names a group; set one of its fields, e.g. {head}.steps")
    try:
        value = parse_value(text, current)
    except (ValueError, json.JSONDecodeError) as e:
        raise ValueError(f"setting {path}={text!r}: {e}") from None
    return dataclasses.replace(cfg, **{head: value})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="DeepSeek-R1 from scratch: the whole pipeline in one command.")
    p.add_argument("--size", default="tiny", choices=["micro", "tiny", "full"], help="model and pipeline preset")
    p.add_argument("--stage", default="all", choices=["all", *MODEL_STAGES, "report"],
                   help="run one stage (its inputs must exist in --out) or all")
    p.add_argument("--out", default=None, help="run directory (default runs/<size>)")
    p.add_argument("--resume", action="store_true", help="continue a run in --out from its checkpoints")
    p.add_argument("--seed", type=int, default=0, help="fixes data, initialisation and sampling")
    p.add_argument("--init-from", default=None, help="a checkpoint (.pt) to use as the base model, or "
                   "with --ask the model to ask; with --size full a Hugging Face checkpoint directory")
    p.add_argument("--data", default=None, help="--size full: JSONL of training problems (question, answer)")
    p.add_argument("--eval-data", default=None, help="--size full: JSONL of held-out problems "
                   "(default: the last n_test problems of --data)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a pipeline setting, e.g. --set r1_zero.steps=40 --set r1_zero.grpo.lr=1e-3")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--ask", default=None, metavar="QUESTION", help="answer a question with --init-from's model")
    p.add_argument("--max-new-tokens", type=int, default=None, help="with --ask: the answer's budget")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    d = p.add_argument_group("memory plan (--dry-run: print per-GPU memory for --size and exit)")
    d.add_argument("--dry-run", action="store_true", help="print the FSDP memory plan, train nothing")
    d.add_argument("--gpus", type=int, default=0, help="world size to plan for (0 = the smallest that fits)")
    d.add_argument("--gpu-mem", type=float, default=80.0, help="memory per GPU in GiB")
    d.add_argument("--micro-batch", type=int, default=1, help="sequences per GPU per forward")
    d.add_argument("--seq-len", type=int, default=4096, help="training sequence length")
    d.add_argument("--rollout-seqs", type=int, default=8192, help="sequences per rollout, all GPUs (R1-Zero: 512 x 16)")
    d.add_argument("--rollout-len", type=int, default=32768, help="prompt + completion tokens per rollout sequence")
    d.add_argument("--no-activation-checkpointing", action="store_true", help="plan without recomputation")
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.seed < 0:
        parser.error("--seed must be non-negative")
    if args.threads < 0:
        parser.error("--threads must be non-negative")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be >= 1")
    if args.ask is not None and not args.init_from:
        parser.error("--ask needs --init-from CHECKPOINT")
    if args.init_from and not Path(args.init_from).exists():
        parser.error(f"--init-from {args.init_from}: no such file or directory")
    if args.device and args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        parser.error(f"--device must be cpu or cuda, got {args.device!r}")
    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    for name in ("gpus", "micro_batch", "seq_len", "rollout_seqs", "rollout_len"):
        if getattr(args, name) < (0 if name == "gpus" else 1):
            parser.error(f"--{name.replace('_', '-')} must be {'>= 0' if name == 'gpus' else '>= 1'}")
    if not args.gpu_mem > 0:
        parser.error("--gpu-mem must be > 0")
    if args.dry_run:
        return args, None
    if args.ask is None and args.size == "full":
        if not args.init_from or not (Path(args.init_from) / "config.json").exists():
            parser.error("--size full starts from a DeepSeek-V3-Base checkpoint: pass --init-from DIR "
                         "(a Hugging Face checkpoint directory with config.json and tokenizer.json)")
        if not args.data:
            parser.error("--size full trains on your problems: pass --data FILE.jsonl")
        if args.stage not in FULL_STAGES + ["all", "report"]:
            parser.error(f"--size full runs {' and '.join(FULL_STAGES)} (the checkpoint, evaluated, and "
                         f"R1-Zero); stage {args.stage} needs cold-start and SFT data this project does not have")
    for path in (args.data, args.eval_data):
        if path and not Path(path).is_file():
            parser.error(f"{path}: no such file")
    if (args.data or args.eval_data) and args.size != "full":
        parser.error("--data and --eval-data are for --size full; micro and tiny generate their problems")
    cfg = stages.pipeline_preset(args.size) if args.ask is None else None
    for item in args.set:
        key, eq, value = item.partition("=")
        if not eq or not key:
            parser.error(f"--set expects KEY=VALUE, got {item!r}")
        try:
            cfg = apply_override(cfg, key.strip(), value.strip())
        except (ValueError, TypeError) as e:
            parser.error(str(e))
    if cfg is not None:
        try:  # config constructors validate their fields
            get_config(cfg.model, **{**cfg.model_overrides, "vocab_size": cfg.vocab_size})
            for sub in (cfg.r1_zero, cfg.reasoning_rl, cfg.all_rl, cfg.student_rl):
                dataclasses.replace(sub.grpo)
        except (ValueError, TypeError) as e:
            parser.error(str(e))
        if cfg.eval_k < 1 or cfg.n_test < 1 or cfg.n_train < 1 or cfg.max_new_tokens < 1:
            parser.error("eval_k, n_test, n_train and max_new_tokens must be >= 1")
    args.out = Path(args.out or f"runs/{args.size}")
    return args, cfg


# -------------------------------------------------------------------------------------------------
# Pipeline

def model_from_checkpoint(path: Path, new_model) -> Transformer:
    """The model of a pipeline checkpoint: a `.pt` file, or a `.dcp` directory written under torchrun.
    new_model(config) builds the empty (possibly sharded) model to load into."""
    if path.is_dir():
        meta = parallel.read_meta(path)
        if meta is None:
            raise SystemExit(f"{path}: not a checkpoint (a .pt file or a .dcp directory with meta.json)")
        model = new_model(ModelConfig(**meta["config"]))
        parallel.load_sharded(path, model)
        return model
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        model = new_model(ModelConfig(**ckpt["config"]))
        parallel.copy_full_state(model, ckpt["model"])
    except Exception as e:  # not ours, truncated, or from an incompatible version
        raise SystemExit(f"{path}: cannot load this checkpoint ({type(e).__name__}: {e})") from None
    return model


class Pipeline:
    def __init__(self, args, cfg: PipelineConfig, env: parallel.Env):
        self.args, self.cfg, self.env = args, cfg, env
        self.run = Run(args.out, cfg, args.seed, env, progress=not args.quiet)
        self.timings_path = args.out / "timings.json"
        self.timings = json.loads(self.timings_path.read_text()) if self.timings_path.exists() else {}
        self.full = args.size == "full"
        self.stages = FULL_STAGES if self.full else MODEL_STAGES
        self.data: Data = (stages.load_data(args.data, args.eval_data, cfg.n_test) if self.full
                           else stages.make_data(cfg, args.seed))

    def say(self, text: str):
        if not self.args.quiet and self.env.is_main:
            print(text, flush=True)

    def setup_tokenizer(self):
        if self.full:  # the released tokenizer, as the checkpoint was trained with it
            self.run.tok = hf.HFTokenizer(Path(self.args.init_from) / "tokenizer.json")
            return
        path = self.args.out / "tokenizer.json"
        if self.env.is_main and not path.exists():
            Tokenizer.train(stages.tokenizer_texts(self.data), self.cfg.vocab_size).save(path)
        if self.env.is_main:
            atomic_json(self.args.out / "config.json", {"seed": self.args.seed, "size": self.args.size,
                                                         "world_size": self.env.world_size,
                                                         "pipeline": dataclasses.asdict(self.cfg)})
        parallel.barrier(self.env)  # the other ranks read what rank 0 trained
        self.run.tok = Tokenizer.load(path)

    def model_config(self) -> ModelConfig:
        return get_config(self.cfg.model, **{**self.cfg.model_overrides, "vocab_size": self.run.tok.vocab_size})

    def done(self, stage: str) -> bool:
        return self.run.has_checkpoint(stage, final=True)

    def get(self, stage: str) -> Transformer:
        cfg = self.run.checkpoint_config(stage)
        if cfg is None:
            raise SystemExit(f"stage {stage!r} has no checkpoint in {self.args.out}; run it first "
                             f"(--stage {stage} or --stage all)")
        model = self.run.new_model(cfg)
        self.run.restore(stage, True, model)
        return model

    def new_model(self, seed_key: str) -> Transformer:
        return self.run.new_model(self.model_config(), seed=stages.seed_for(self.args.seed, seed_key))

    def build(self, stage: str) -> Transformer:
        """Train one stage from its inputs (resuming a partial checkpoint if there is one)."""
        run, data, cfg = self.run, self.data, self.cfg
        if stage == "base":
            if self.full:  # meta device -> shards -> each rank reads its slices of each tensor
                model = run.new_model(hf.config_from_hf(json.loads((Path(self.args.init_from) / "config.json").read_text())))
                return parallel.load_hf_sharded(model, self.args.init_from, self.env)
            if self.args.init_from:
                return model_from_checkpoint(Path(self.args.init_from), run.new_model)
            return stages.stage_base(run, self.new_model("init/base"), data, cfg.pretrain)
        if stage == "r1_zero":
            return stages.train_rl(run, "r1_zero", self.get("base"), data.train, cfg.r1_zero, desc="R1-Zero")
        if stage == "r1_stage1":
            return stages.stage_cold_start(run, self.get("base"), self.get("r1_zero"), data)
        if stage == "r1_stage2":
            return stages.train_rl(run, "r1_stage2", self.get("r1_stage1"), data.train, cfg.reasoning_rl,
                                   desc="R1 stage 2: reasoning RL")
        if stage == "r1_stage3":
            return stages.stage_rejection_sft(run, self.get("base"), self.get("r1_stage2"), data)
        if stage == "r1_stage4":
            return stages.train_rl(run, "r1_stage4", self.get("r1_stage3"), data.train, cfg.all_rl,
                                   general=data.general, desc="R1 stage 4: all-scenario RL")
        if stage == "student_base":
            return distill.student_base(run, data, stages.seed_for(self.args.seed, "init/student"))
        if stage == "student_distill":
            return distill.distill(run, self.get("r1_stage4"), self.get("student_base"), data)
        if stage == "student_rl":
            return distill.rl_only(run, self.get("student_base"), data)
        raise ValueError(stage)

    def run_stage(self, stage: str):
        if self.done(stage) and (self.args.resume or self.args.stage == "all"):
            self.say(f"[{stage}] done already, skipping")
        else:
            (self.args.out / "eval" / f"{stage}.json").unlink(missing_ok=True)
            t0 = time.perf_counter()
            model = self.build(stage)
            self.run.save(stage, model, step=-1, final=True)
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - t0
            if self.env.is_main:
                atomic_json(self.timings_path, self.timings)
        self.evaluate(stage)

    def evaluate(self, stage: str):
        path = self.args.out / "eval" / f"{stage}.json"
        if parallel.from_rank0(path.exists(), self.env):
            return json.loads(path.read_text())
        model = self.get(stage).eval()
        result = stages.evaluate(self.run, model, self.data.test, f"eval/{stage}")
        if self.env.is_main:
            atomic_json(path, result)
        parallel.barrier(self.env)
        self.say(f"[{stage}] pass@1 {result['pass@1']:.3f}  cons@{self.cfg.eval_k} "
                 f"{result[f'cons@{self.cfg.eval_k}']:.3f}  format {result['format']:.3f}  "
                 f"language {result['language']:.3f}  length {result['length']:.1f}")
        return result

    def main(self):
        out = self.args.out
        has_work = (out / "checkpoints").exists() and any((out / "checkpoints").iterdir())
        if has_work and not self.args.resume and self.args.stage == "all":
            raise SystemExit(f"{out} already holds a run: pass --resume to continue it, or another --out")
        t0 = time.perf_counter()
        self.setup_tokenizer()
        todo = self.stages if self.args.stage == "all" else [] if self.args.stage == "report" else [self.args.stage]
        for stage in todo:
            self.run_stage(stage)
        if self.args.stage in ("all", "report") and self.env.is_main:
            write_report(out, self.cfg, self.data, self.timings)
            self.say(f"results: {out / 'results.md'}  (this invocation: {time.perf_counter() - t0:.0f} s)")


def atomic_json(path: Path, obj):
    stages.atomic_write_text(path, json.dumps(obj, indent=1))


# -------------------------------------------------------------------------------------------------
# Plots and results.md

def read_metrics(out: Path, stage: str) -> list[dict]:
    path = out / "metrics" / f"{stage}.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def write_plots(out: Path) -> list[str]:
    from matplotlib.figure import Figure  # not pyplot: leave the caller's backend alone
    made = []
    panels = [("reward", "reward"), ("accuracy", "accuracy"), ("len_mean", "response length (tokens)"), ("kl", "KL to reference")]
    rl = {s: read_metrics(out, s) for s in RL_STAGES}
    rl = {s: rows for s, rows in rl.items() if rows}
    if rl:
        fig = Figure(figsize=(18, 4))
        axes = fig.subplots(1, 4)
        for ax, (key, label) in zip(axes, panels):
            for stage, rows in rl.items():
                ax.plot([r["step"] for r in rows], [r.get(key, float("nan")) for r in rows], label=TITLES[stage])
            ax.set_xlabel("RL step")
            ax.set_title(label)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "rl_curves.png", dpi=110)
        made.append("rl_curves.png")
    sft = {s: read_metrics(out, s) for s in ["base", "r1_stage1", "r1_stage3", "student_base", "student_distill"]}
    sft = {s: rows for s, rows in sft.items() if rows}
    if sft:
        fig = Figure(figsize=(7, 4))
        ax = fig.subplots()
        for stage, rows in sft.items():
            ax.plot([r["step"] for r in rows], [r["ntp"] for r in rows], label=TITLES[stage])
        ax.set_xlabel("step")
        ax.set_ylabel("next-token loss")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "sft_loss.png", dpi=110)
        made.append("sft_loss.png")
    return made


def write_report(out: Path, cfg: PipelineConfig, data: Data, timings: dict):
    plots = write_plots(out)
    k = cfg.eval_k
    lines = ["# Results", "",
             f"Held-out split: {len(data.test)} `{cfg.task}` problems never seen in training; each model "
             f"samples k = {k} completions per problem at temperature {cfg.eval_temperature}, top-p "
             f"{cfg.eval_top_p}, with the R1-Zero template. pass@1 is the mean correctness over the k "
             f"samples, cons@{k} the correctness of the majority answer, language the share of English "
             "words in the chain of thought, length the mean completion length in tokens.", "",
             f"| model | pass@1 | cons@{k} | format | language | length | wall time (s) |",
             "|---|---|---|---|---|---|---|"]
    samples = []
    for stage in MODEL_STAGES:
        path = out / "eval" / f"{stage}.json"
        if not path.exists():
            continue
        r = json.loads(path.read_text())
        lines.append(f"| {TITLES[stage]} | {r['pass@1']:.3f} | {r[f'cons@{k}']:.3f} | {r['format']:.3f} | "
                     f"{r['language']:.3f} | {r['length']:.1f} | {timings.get(stage, float('nan')):.0f} |")
        samples.append((stage, r["sample"]))
    total = sum(timings.values())
    lines += ["", f"Total training wall time (stages only): {total:.0f} s.", ""]
    lines += [f"![{p}]({p})" for p in plots] + [""]
    if data.test:
        lines += ["## One held-out question, every model", "", f"Question: `{data.test[0].question}` "
                  f"(answer {data.test[0].answer})", ""]
        for stage, text in samples:
            lines += [f"**{TITLES[stage]}**", "", "```", text.strip() or "(empty)", "```", ""]
    stages.atomic_write_text(out / "results.md", "\n".join(lines))


# -------------------------------------------------------------------------------------------------
# Asking a trained model

def ask(args):
    ckpt_path = Path(args.init_from)
    tok_path = ckpt_path.resolve().parent.parent / "tokenizer.json"
    if not tok_path.exists():
        raise SystemExit(f"no tokenizer.json next to the run of {ckpt_path}")
    tok = Tokenizer.load(tok_path)
    env = parallel.Env(torch.device("cpu"), torch.float32)
    model = model_from_checkpoint(ckpt_path, lambda cfg: parallel.build_model(cfg, env)).eval()
    from model import generate
    problem = stages.Problem(args.ask, "")
    prompt = tok.encode(stages.prompt_text(problem), bos=True)
    g = generate(model, [prompt], args.max_new_tokens or 128, pad_id=tok.pad_id, stop_ids=(tok.eos_id,),
                 temperature=0.6, top_p=0.95, generator=torch.Generator().manual_seed(args.seed))
    n = int(g.lengths[0])
    print(tok.decode(g.tokens[0, :n - 1 if g.stopped[0] else n].tolist()).strip())


def dry_run(args) -> str:
    """The memory plan of FSDP2 training for --size: for --gpus, or the smallest world that fits."""
    cfg = get_config(args.size)
    kw = dict(micro_batch=args.micro_batch, seq_len=args.seq_len, rollout_seqs=args.rollout_seqs,
              rollout_len=args.rollout_len, activation_checkpointing=not args.no_activation_checkpointing)
    if args.gpus:
        plan = parallel.memory_plan(cfg, args.size, args.gpus, args.gpu_mem, **kw)
    else:
        plan = parallel.smallest_world(cfg, args.size, args.gpu_mem, per_node=1 if args.size != "full" else 8, **kw)
        if plan is None:
            return f"{args.size}: no world size up to 16,384 GPUs of {args.gpu_mem:g} GiB fits this plan"
    return plan.table()


def main(argv=None):
    args, cfg = parse_args(argv)
    if args.dry_run:
        print(dry_run(args))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ask is not None:
        return ask(args)
    env = parallel.setup(args.device)
    try:
        Pipeline(args, cfg, env).main()
    except BaseException:
        parallel.teardown(env, completed=False)
        raise
    parallel.teardown(env)


if __name__ == "__main__":
    sys.exit(main())
