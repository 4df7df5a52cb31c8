"""The pipeline's contract: every stage runs and leaves its artifacts, kill -9 + --resume changes
nothing, and bad command lines fail with clear errors. Runs the micro preset (a few steps per stage)."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train

ROOT = Path(__file__).resolve().parent.parent
STAGES = train.MODEL_STAGES


def run_cli(out, *extra, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), "--size", "micro", "--out", str(out),
                           "--quiet", "--threads", "1", *extra], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("micro")
    result = run_cli(out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_micro_pipeline_writes_every_artifact(micro_run):
    for stage in STAGES:
        assert (micro_run / "checkpoints" / f"{stage}.pt").exists(), stage
        assert not (micro_run / "checkpoints" / f"{stage}.partial.pt").exists(), stage
        assert (micro_run / "eval" / f"{stage}.json").exists(), stage
    for name in ("tokenizer.json", "config.json", "timings.json", "results.md", "rl_curves.png", "sft_loss.png"):
        assert (micro_run / name).exists(), name
    results = (micro_run / "results.md").read_text()
    for stage in STAGES:
        assert train.TITLES[stage] in results


def test_every_metric_is_finite(micro_run):
    for path in (micro_run / "metrics").glob("*.jsonl"):
        for line in path.read_text().splitlines():
            for key, value in json.loads(line).items():
                if isinstance(value, (int, float)):
                    assert math.isfinite(value), (path.name, key)
    for stage in STAGES:
        result = json.loads((micro_run / "eval" / f"{stage}.json").read_text())
        for key in ("pass@1", "cons@2", "format", "language", "length"):
            assert math.isfinite(result[key]) and result[key] >= 0, (stage, key)
        assert 0 <= result["pass@1"] <= 1 and 0 <= result["format"] <= 1


def test_rl_metrics_log_reward_accuracy_length_and_kl(micro_run):
    for stage in train.RL_STAGES:
        rows = [json.loads(line) for line in (micro_run / "metrics" / f"{stage}.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
        for key in ("reward", "accuracy", "format", "len_mean", "kl", "clip_frac", "entropy"):
            assert key in rows[-1], (stage, key)


def test_checkpoints_hold_what_a_resume_needs(micro_run):
    ckpt = torch.load(micro_run / "checkpoints" / "r1_zero.pt", weights_only=False)
    assert {"model", "config", "stage"} <= set(ckpt)
    assert any(k.endswith("gate.bias") for k in ckpt["model"])  # aux-loss-free balancing biases


def test_kill_and_resume_gives_the_same_results(micro_run, tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "train.py"), "--size", "micro", "--out", str(out), "--quiet", "--threads", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = out / "checkpoints" / "r1_stage2.partial.pt"  # in the middle of an RL stage
    deadline = time.time() + 240
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "checkpoints" / "student_rl.pt").exists(), "the run finished before it was killed"
    result = run_cli(out, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in STAGES:
        a = json.loads((micro_run / "eval" / f"{stage}.json").read_text())
        b = json.loads((out / "eval" / f"{stage}.json").read_text())
        a.pop("eval_s"), b.pop("eval_s")
        assert a == b, stage
    final_a = torch.load(micro_run / "checkpoints" / "student_rl.pt", weights_only=False)["model"]
    final_b = torch.load(out / "checkpoints" / "student_rl.pt", weights_only=False)["model"]
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_existing_run_is_not_overwritten_without_resume(micro_run):
    result = run_cli(micro_run)
    assert result.returncode != 0 and "--resume" in result.stderr


@pytest.mark.parametrize("argv,message", [
    (["--size", "huge"], "invalid choice"),
    (["--stage", "r2"], "invalid choice"),
    (["--seed", "-1"], "--seed"),
    (["--set", "r1_zero.steps"], "KEY=VALUE"),
    (["--set", "r1_zero.stepz=3"], "stepz"),
    (["--set", "r1_zero.steps=three"], "three"),
    (["--set", "r1_zero.grpo.loss_agg=mean"], "loss_agg"),
    (["--set", "model=giant"], "giant"),
    (["--set", "eval_k=0"], "eval_k"),
    (["--size", "full"], "init-from"),
    (["--ask", "What is 1 + 1?"], "--init-from"),
    (["--init-from", "/nonexistent.pt"], "no such file"),
])
def test_bad_flags_and_overrides_fail_with_a_clear_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        train.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_overrides_are_typed_and_nested():
    args, cfg = train.parse_args(["--size", "micro", "--set", "r1_zero.grpo.lr=0.01", "--set", "eval_k=3",
                                  "--set", "difficulty={\"n_operands\": 2, \"max_value\": 5}"])
    assert cfg.r1_zero.grpo.lr == 0.01 and cfg.eval_k == 3 and cfg.difficulty["max_value"] == 5


def test_ask_answers_from_a_checkpoint(micro_run):
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--ask", "What is 2 + 3?", "--init-from",
                             str(micro_run / "checkpoints" / "r1_stage4.pt"), "--max-new-tokens", "8"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
