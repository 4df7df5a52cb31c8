"""Distillation of R1 into a small dense student (R1 paper, section 2.4 and the 4.1 comparison).

The teacher (the stage-4 model) writes the distillation set by rejection sampling, as in R1 stage 3:
correct, well-formed, single-language answers to training prompts, plus the non-reasoning examples.
A dense student (model.py with every FFN dense and no MTP) is pretrained on the same corpus as the
teacher's base, then trained on that set by SFT only, no RL, as the paper's distilled models are.
For the paper's comparison (its Table 6: RL alone on Qwen-32B-Base reaches 47.0 on AIME, distillation
72.6), the same student base is also trained by RL alone with the R1-Zero recipe.
"""

from __future__ import annotations

from model import Transformer, dense_config, get_config
from stages import (Data, Run, general_completion, rejection_sample, sft_examples, stage_base,
                    train_rl, train_sft)


def student_config(run: Run):
    """The main preset with every FFN dense, no MTP, and the student overrides (smaller width/depth)."""
    cfg = run.cfg
    main = get_config(cfg.model, **{**cfg.model_overrides, "vocab_size": run.tok.vocab_size})
    overrides = dict(cfg.student)
    return dense_config(main, **overrides)


def new_student(run: Run, seed: int) -> Transformer:
    return run.new_model(student_config(run), seed=seed)


def student_base(run: Run, data: Data, seed: int) -> Transformer:
    """Pretrain the student on the teacher base's corpus: the student's own "base model"."""
    return stage_base(run, new_student(run, seed), data, run.cfg.student_pretrain, stage="student_base")


def distillation_set(run: Run, teacher: Transformer, data: Data):
    cfg = run.cfg
    reasoning = rejection_sample(run, teacher, data.train[:cfg.n_rejection_prompts], cfg.rejection_samples,
                                 "distill/sample", per_prompt=2)
    general = [(p, general_completion(p)) for p in data.general[:cfg.n_general]]
    run.log("distill_data", {"step": 0, "reasoning": len(reasoning), "general": len(general)})
    return reasoning + general


def distill(run: Run, teacher: Transformer, student: Transformer, data: Data) -> Transformer:
    """SFT of the student base on the teacher's rejection-sampled outputs."""
    return train_sft(run, "student_distill", student, sft_examples(run, distillation_set(run, teacher, data)),
                     run.cfg.distill_sft, desc="distil: student SFT")


def rl_only(run: Run, student: Transformer, data: Data) -> Transformer:
    """The same student base trained by the R1-Zero recipe alone (accuracy + format rewards)."""
    return train_rl(run, "student_rl", student, data.train, run.cfg.student_rl, desc="student RL only")
