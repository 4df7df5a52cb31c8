"""Scale-out claims, on CPU with gloo: FSDP2 over `torchrun --nproc_per_node=2` follows the one-process
trajectory (SFT and GRPO), sharded checkpoints resume on another world size, the pipeline runs under
torchrun, and the memory plan of the 671B model is the hand-computed one."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import parallel
import train
from model import get_config

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "dist_worker.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def launch(n: int, script, *args, timeout=300) -> subprocess.CompletedProcess:
    """n = 0: one plain process (no torchrun, no FSDP); n >= 1: torchrun with n ranks (FSDP2)."""
    cmd = [sys.executable, str(script), *map(str, args)] if n == 0 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
         str(script), *map(str, args)]
    result = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def worker(n: int, tmp_path, *args) -> dict:
    out = tmp_path / f"worker-{n}-{abs(hash(args))}.json"
    launch(n, WORKER, *args, "--out", out)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One plain process, no FSDP: the reference trajectories."""
    return worker(0, tmp_path_factory.mktemp("single"), "sft", "grpo")


def test_two_ranks_follow_the_single_process_trajectory(single, tmp_path):
    two = worker(2, tmp_path, "sft", "grpo")
    assert two["world_size"] == 2
    for mode in ("sft", "grpo"):
        assert two[mode]["losses"] == pytest.approx(single[mode]["losses"], rel=1e-5, abs=1e-6), mode
        assert two[mode]["norm"] == pytest.approx(single[mode]["norm"], rel=1e-6), mode
        assert len(set(single[mode]["losses"])) > 1  # the weights moved between steps
    assert two["grpo"]["tokens"] == single["grpo"]["tokens"]   # sampling from shards: the same tokens
    assert two["grpo"]["blocks_agree"]


def test_mixed_precision_and_activation_checkpointing(single, tmp_path):
    """bf16 compute over fp32 shards (the GPU setting) stays near the fp32 trajectory; recomputation
    changes nothing. Exercises the dtype paths of training, the shared-prompt cache and sampling."""
    bf16 = worker(2, tmp_path, "grpo", "--bf16", "--ac")["grpo"]
    assert bf16["losses"] == pytest.approx(single["grpo"]["losses"], rel=0.05, abs=1e-3)
    assert bf16["norm"] == pytest.approx(single["grpo"]["norm"], rel=1e-3)
    assert len(bf16["tokens"]) == 3 and bf16["blocks_agree"]


def test_sharded_checkpoint_resumes_on_another_world_size(single, tmp_path):
    """Saved on 2 ranks -> resumed on 1 -> saved -> resumed on 2: the uninterrupted losses."""
    a, b = tmp_path / "on2", tmp_path / "on1"
    first = worker(2, tmp_path, "sft", "--sft-steps", "0:2", "--save", a)["sft"]
    assert sorted(p.name for p in a.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    second = worker(1, tmp_path, "sft", "--sft-steps", "2:3", "--load", a, "--save", b)["sft"]
    assert sorted(p.name for p in b.glob("*.distcp")) == ["__0_0.distcp"]
    third = worker(2, tmp_path, "sft", "--sft-steps", "3:4", "--load", b)["sft"]
    losses = first["losses"] + second["losses"] + third["losses"]
    assert losses == pytest.approx(single["sft"]["losses"], rel=1e-5, abs=1e-6)
    assert third["norm"] == pytest.approx(single["sft"]["norm"], rel=1e-6)


def test_grpo_resumes_from_a_sharded_checkpoint_on_another_world_size(single, tmp_path):
    """Policy, AdamW (with no state for the untrained MTP module) and reference saved on 2 ranks,
    resumed in one process: the remaining updates are the uninterrupted ones."""
    ckpt = tmp_path / "grpo"
    first = worker(2, tmp_path, "grpo", "--grpo-steps", "0:2", "--save", ckpt)["grpo"]
    rest = worker(0, tmp_path, "grpo", "--grpo-steps", "2:3", "--load", ckpt)["grpo"]
    assert first["losses"] + rest["losses"] == pytest.approx(single["grpo"]["losses"], rel=1e-5, abs=1e-6)
    assert rest["norm"] == pytest.approx(single["grpo"]["norm"], rel=1e-6)


FOLDED_ROLLOUTS = """
import json, sys
import torch
sys.path.insert(0, ROOT_DIR)
import parallel
from model import generate, get_config, has_dtensors

env = parallel.setup("cpu")
cfg = get_config("micro", qk_nope_head_dim=32, v_head_dim=32)  # wide enough for folding to pay
out = {}
for dtype in (torch.float32, torch.bfloat16):
    model = parallel.build_model(cfg, env, seed=0, param_dtype=dtype).eval()
    with parallel.rollout_mode(model, gather_all=True) as sync_stop:
        runs = {fold: generate(model, [[1, 2, 3], [4, 5]], 6, pad_id=0, temperature=0, sync_stop=sync_stop,
                               fold=fold) for fold in (None, False)}
        out[str(dtype)] = {"folds": model.folding_pays() and not has_dtensors(model) and not sync_stop,
                           **{str(f): g.tokens.tolist() for f, g in runs.items()},
                           "logprobs": [g.logprobs[:, 0].tolist() for g in runs.values()]}
if env.rank == 0:
    json.dump(out, open(sys.argv[1], "w"))
parallel.teardown(env)
"""


def test_rollouts_fold_the_gathered_weights_in_fp32_and_bf16(tmp_path):
    # rollout_mode gathers every block whole: generate folds them (bf16 under mixed precision) and
    # decodes what the unfolded step decodes (fp32: the same greedy tokens; bf16: the same first token).
    script, out = tmp_path / "folded.py", tmp_path / "folded.json"
    script.write_text(FOLDED_ROLLOUTS.replace("ROOT_DIR", repr(str(ROOT))))
    launch(2, script, out)
    r = json.loads(out.read_text())
    fp32, bf16 = r["torch.float32"], r["torch.bfloat16"]
    assert fp32["folds"] and bf16["folds"]
    assert fp32["None"] == fp32["False"]
    assert [row[0] for row in bf16["None"]] == [row[0] for row in bf16["False"]]
    assert all(abs(a - b) < 0.05 for a, b in zip(*bf16["logprobs"]))


def run_train(n: int, out, *args):
    return launch(n, ROOT / "train.py", "--size", "micro", "--out", out, "--quiet", "--threads", "1", *args)


def metrics(out, stage):
    return [json.loads(line) for line in (out / "metrics" / f"{stage}.jsonl").read_text().splitlines()]


def test_pipeline_stages_under_torchrun(tmp_path):
    """Stage 0 on 2 ranks logs the one-process losses and samples the one-process evaluation; its
    sharded checkpoint then feeds R1-Zero in a plain process. (GRPO stages on 2 ranks: the
    --size full test below.)"""
    one, two = tmp_path / "one", tmp_path / "two"
    run_train(0, one, "--stage", "base")
    run_train(2, two, "--stage", "base")
    assert (two / "checkpoints" / "base.dcp" / "meta.json").exists()
    assert not (two / "checkpoints" / "base.pt").exists()
    a, b = metrics(one, "base"), metrics(two, "base")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", "ntp", "mtp", "grad_norm"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-4), key
    for key in ("pass@1", "format", "length"):  # same weights, same per-batch seeds: same samples
        assert json.loads((two / "eval" / "base.json").read_text())[key] == pytest.approx(
            json.loads((one / "eval" / "base.json").read_text())[key], abs=1e-9)
    answer = launch(0, ROOT / "train.py", "--ask", "What is 2 + 3?", "--init-from",
                    two / "checkpoints" / "base.dcp", "--max-new-tokens", "6", "--threads", "1")
    assert answer.returncode == 0
    (two / "checkpoints" / "junk.pt").write_bytes(b"not a checkpoint")
    bad = subprocess.run([sys.executable, str(ROOT / "train.py"), "--ask", "2 + 3?", "--init-from",
                          str(two / "checkpoints" / "junk.pt")], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert bad.returncode != 0 and "cannot load this checkpoint" in bad.stderr
    run_train(0, two, "--stage", "r1_zero")                  # DCP -> one process
    rows = metrics(two, "r1_zero")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["reward"]) for r in rows)
    assert (two / "checkpoints" / "r1_zero.pt").exists()


# -------------------------------------------------------------------------------------------------
# The memory plan, by hand

GIB = 1024 ** 3


def test_dry_run_full_matches_hand_calculation():
    cfg = get_config("full")
    plan = parallel.memory_plan(cfg, "full", 1024, 141)
    n = 671_026_419_200 + 11_610_068_224                       # main model + MTP module, trained together
    assert plan.rows["parameters (fp32, sharded)"] == 4 * n // 1024
    assert plan.rows["gradients (fp32, sharded)"] == 4 * n // 1024
    assert plan.rows["AdamW m, v (fp32, sharded)"] == 8 * n // 1024
    assert plan.rows["reference model (fp32, sharded)"] == 4 * n // 1024
    # the largest FSDP unit: an MoE block = attention + 2 norms + MoE layer, minus the 256 router
    # biases (a buffer, not gathered), in bf16, the current block and the prefetched next one
    block = 187_107_328 + 14_336 + 11_320_164_608 - 256
    assert plan.rows["gathered blocks (bf16)"] == 2 * 2 * block
    assert plan.rows["block gradients (bf16 + fp32 for reduce-scatter)"] == 6 * block
    # activations with recomputation: 62 bf16 block inputs per token + one MoE block's saved tensors
    attn = 2 * 7168 + (2 * 1536 + 2 * 128 * 192) + (576 + 512 + 128 * 256 + 128 * 192 + 128 * 128) + 128 * 128
    moe = 2 * 7168 + 8 * (2 * 7168 + 3 * 2048) + 3 * 2048 + 2 * 2 * 256
    act = 4096 * 2 * (7168 * 62 + attn + moe)
    assert plan.rows["activations"] == act
    assert plan.rows["logits + grad (fp32)"] == 4096 * 129280 * 4 * 2 * 2
    assert plan.rows["rollout KV cache (bf16)"] == 8 * 32768 * 70_272  # 512 questions x 16 / 1024 GPUs
    assert plan.total == 20 * n // 1024 + 4 * block + max(6 * block + act + 4096 * 129280 * 16, 8 * 32768 * 70_272)
    assert plan.fits
    # on 80 GiB GPUs a gathered MoE block, the next one and the block's gradients alone exceed a GPU
    assert (4 + 6) * block > 80 * GIB
    assert parallel.smallest_world(cfg, "full", 80) is None
    smallest = parallel.smallest_world(cfg, "full", 141)
    assert smallest.world_size % 8 == 0 and smallest.fits
    assert not parallel.memory_plan(cfg, "full", smallest.world_size - 8, 141).fits


def test_parameters_with_fewer_rows_than_ranks_split_along_their_widest_dimension():
    assert parallel.shard_dim((256, 2048, 7168), 64) == 0       # whole experts per rank
    assert parallel.shard_dim((256, 2048, 7168), 512) == 2      # 256 experts over 512 ranks
    assert parallel.shard_dim((256, 7168), 512) == 1            # the router
    assert parallel.shard_dim((256, 2048, 7168), 440) == 0      # no even split: FSDP pads dim 0
    assert parallel.shard_dim((129280, 7168), 512) == 0


def test_dry_run_command_prints_the_plan(capsys):
    assert train.main(["--size", "full", "--dry-run", "--gpus", "1024", "--gpu-mem", "141"]) == 0
    text = capsys.readouterr().out
    assert "671,026,419,200 parameters" in text and "1024 GPUs x 141 GiB" in text and "fits" in text
    assert train.main(["--size", "full", "--dry-run", "--gpus", "512"]) == 0
    assert "DOES NOT FIT" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        train.main(["--size", "full", "--dry-run", "--gpu-mem", "-1"])


def test_full_size_command_on_a_small_checkpoint(tmp_path):
    """`torchrun train.py --size full` as a user runs it, on a Hugging Face checkpoint directory small
    enough for a CPU: 2 ranks load it shard by shard (meta device, then each rank's slices), evaluate
    it, run R1-Zero on JSONL problems with the released tokenizer, and write sharded checkpoints."""
    import torch

    import hf
    import tasks
    from model import Transformer
    from tests.test_hf import released_splits, train_tokenizer
    ckpt, out = tmp_path / "V3-Base", tmp_path / "run"
    torch.manual_seed(0)
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    theirs = train_tokenizer(tok_dir / "tokenizer.json", released_splits())
    model = Transformer(get_config("micro", vocab_size=theirs.get_vocab_size(), max_seq_len=1024))
    hf.save_hf_checkpoint(model, ckpt, extra_config={"bos_token_id": theirs.token_to_id(hf.BOS_TOKEN),
                                                     "eos_token_id": theirs.token_to_id(hf.EOS_TOKEN)})
    (ckpt / "tokenizer.json").write_text((tok_dir / "tokenizer.json").read_text())
    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps({"question": p.question, "answer": p.answer}) + "\n"
                            for p in tasks.generate("arith", 12, 0, "train")))
    sets = ["r1_zero.steps=2", "r1_zero.grpo.prompts_per_step=2", "r1_zero.grpo.group_size=2",
            "r1_zero.grpo.n_minibatches=1", "r1_zero.grpo.max_new_tokens=6", "max_new_tokens=6",
            "n_test=2", "eval_k=2", "ckpt_every=1"]
    launch(2, ROOT / "train.py", "--size", "full", "--init-from", ckpt, "--data", data, "--out", out, "--quiet",
           "--threads", "1", *[x for s in sets for x in ("--set", s)])
    for stage in ("base", "r1_zero"):
        assert (out / "checkpoints" / f"{stage}.dcp" / "meta.json").exists()
        assert (out / "eval" / f"{stage}.json").exists()
    assert [r["step"] for r in metrics(out, "r1_zero")] == [1, 2]
    assert "R1-Zero" in (out / "results.md").read_text()
    loaded = Transformer(model.cfg)                    # the base as the 2 ranks loaded it == the checkpoint
    parallel.load_sharded(out / "checkpoints" / "base.dcp", loaded)
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
