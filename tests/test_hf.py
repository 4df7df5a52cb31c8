"""Claims of hf.py: Hugging Face checkpoints and tokenizers load into model.py and compute exactly
what transformers and tokenizers compute, and what model.py saves loads back into them."""

import json
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from hf import (BOS_TOKEN, DEEPSEEK_V3_SPLITS, FREE_FIELDS, INDEX, R1_CHAT_TEMPLATE, CheckpointError,
                config_from_hf, config_to_hf, dequantize_fp8, format_r1_chat, hf_name,
                load_hf_checkpoint, load_hf_tokenizer, per_expert, save_hf_checkpoint)
from model import ModelConfig, Transformer, get_config


def transformers():
    return pytest.importorskip("transformers")


def scramble(model, seed=0):
    """Weights large enough that routing and attention are far from uniform, norms away from 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        biases = [(n, b) for n, b in model.named_buffers() if n.endswith("bias")]  # router bias b_i
        for name, t in list(model.named_parameters()) + biases:
            if "norm" in name:
                t.copy_(1 + 0.2 * torch.randn(t.shape, generator=g))
            elif name.endswith("bias"):
                t.copy_(0.5 * torch.randn(t.shape, generator=g))
            else:
                t.copy_(0.15 * torch.randn(t.shape, generator=g))
    return model


def tokens(vocab, shape=(2, 40), seed=1):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def read_tensors(path):
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def rewrite(path, tensors, config=None):
    """Replace a checkpoint's weights by `tensors` in one shard (and optionally its config)."""
    for file in path.glob("*.safetensors"):
        file.unlink()
    save_file(tensors, str(path / "model-00001-of-00001.safetensors"), metadata={"format": "pt"})
    (path / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": {k: "model-00001-of-00001.safetensors"
                                                                         for k in tensors}}))
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))


def by_hf_name(model):
    """The model's tensors under their checkpoint names, a stacked expert weight as one per expert."""
    return {hf_name(sub, model.cfg.n_layers): t if e is None else t[e]
            for name, t in model.state_dict().items() for sub, e in per_expert(name, t)}


def micro(seed=0, **overrides):
    torch.manual_seed(seed)
    return scramble(Transformer(get_config("micro", **overrides)), seed).eval()


# ------------------------------------------------------------------------------------------------
# Configuration

# The released DeepSeek-V3 (and R1) config.json, and DeepSeek-V2-Lite's.
RELEASED_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "attention_bias": False,
    "attention_dropout": 0.0, "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1,
    "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02,
    "intermediate_size": 18432, "kv_lora_rank": 512, "max_position_embeddings": 163840,
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
    "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "q_lora_rank": 1536,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06, "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid",
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "seq_aux": True, "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
}
RELEASED_V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "first_k_dense_replace": 1,
    "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 10944, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1,
    "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16,
    "num_experts_per_tok": 6, "num_hidden_layers": 27, "num_key_value_heads": 16, "q_lora_rank": None,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06, "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "routed_scaling_factor": 1.0, "scoring_func": "softmax", "tie_word_embeddings": False, "topk_group": 1,
    "topk_method": "greedy", "v_head_dim": 128, "vocab_size": 102400,
}


def architecture(cfg: ModelConfig) -> dict:
    return {k: v for k, v in vars(cfg).items() if k not in FREE_FIELDS}


@pytest.mark.parametrize("released,preset", [(RELEASED_V3, "full"), (RELEASED_V2_LITE, "16B")])
def test_released_configs_map_to_the_presets(released, preset):
    cfg = config_from_hf(released)
    assert architecture(cfg) == architecture(get_config(preset))
    assert cfg.max_seq_len == 163840


@pytest.mark.parametrize("preset", ["micro", "tiny", "full", "236B", "16B"])
def test_config_round_trips_through_config_json(preset):
    cfg = get_config(preset)
    back = config_from_hf(json.loads(json.dumps(config_to_hf(cfg))))
    assert architecture(back) == architecture(cfg)
    assert back.max_seq_len == cfg.max_seq_len and back.init_std == cfg.init_std


def test_config_to_hf_builds_the_transformers_config():
    tf = transformers()
    cfg = get_config("full")
    hf = tf.DeepseekV3Config(**config_to_hf(cfg))
    assert (hf.hidden_size, hf.n_group, hf.topk_group, hf.first_k_dense_replace) == (7168, 8, 4, 3)
    assert hf.rope_parameters["rope_type"] == "yarn" and hf.rope_parameters["mscale_all_dim"] == 1.0
    assert hf.num_nextn_predict_layers == 1 and hf.num_key_value_heads == 128


@pytest.mark.parametrize("field,value,named", [
    ("model_type", "llama", "model_type"),
    ("norm_topk_prob", False, "norm_topk_prob"),
    ("topk_method", "greedy", "topk_method"),
    ("scoring_func", "softmax", "scoring_func"),
    ("tie_word_embeddings", True, "tie_word_embeddings"),
    ("rope_interleave", False, "rope_interleave"),
    ("rope_scaling", dict(RELEASED_V3["rope_scaling"], mscale=0.707), "mscale_all_dim"),
    ("rope_scaling", dict(RELEASED_V3["rope_scaling"], type="dynamic"), "dynamic"),
    ("hidden_act", "gelu", "hidden_act"),
])
def test_unrepresentable_config_is_an_error_naming_the_field(field, value, named):
    with pytest.raises(CheckpointError, match=named):
        config_from_hf({**RELEASED_V3, field: value})


def test_v2_renormalised_softmax_is_an_error():
    with pytest.raises(CheckpointError, match="norm_topk_prob"):
        config_from_hf({**RELEASED_V2_LITE, "norm_topk_prob": True})


def test_tensor_names_follow_the_released_checkpoint():
    assert hf_name("layers.0.attn.wkv_a.weight", 61) == "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    assert hf_name("layers.3.ffn.experts.255.w1.weight", 61) == "model.layers.3.mlp.experts.255.gate_proj.weight"
    assert hf_name("layers.3.ffn.gate.bias", 61) == "model.layers.3.mlp.gate.e_score_correction_bias"
    assert hf_name("mtp.0.eh_proj.weight", 61) == "model.layers.61.eh_proj.weight"
    assert hf_name("mtp.0.norm.weight", 61) == "model.layers.61.shared_head.norm.weight"
    assert hf_name("mtp.0.block.ffn.shared_experts.w2.weight", 61) == \
        "model.layers.61.mlp.shared_experts.down_proj.weight"
    # model.py stacks the routed experts; the checkpoint has one tensor per expert and projection.
    assert per_expert("layers.3.ffn.experts.w1", torch.empty(256, 4, 2))[255] == (
        "layers.3.ffn.experts.255.w1.weight", 255)
    assert per_expert("layers.3.ffn.shared_experts.w1.weight", torch.empty(4, 2)) == [
        ("layers.3.ffn.shared_experts.w1.weight", None)]
    cfg = get_config("tiny", mtp_depth=2)
    with torch.device("meta"):
        names = [hf_name(sub, cfg.n_layers) for n, t in Transformer(cfg).state_dict().items()
                 for sub, _ in per_expert(n, t)]
    assert len(set(names)) == len(names)
    assert "model.layers.5.enorm.weight" in names and "model.layers.0.mlp.down_proj.weight" in names
    assert "model.layers.5.mlp.experts.7.up_proj.weight" in names


# ------------------------------------------------------------------------------------------------
# Logits parity with transformers

HF_TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
               num_attention_heads=2, num_key_value_heads=2, n_routed_experts=8, num_experts_per_tok=2,
               first_k_dense_replace=1, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
               max_position_embeddings=128)
YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32,
            beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707)
HF_CASES = {
    # sigmoid routing over 4 groups keeping 2, router bias, q_lora, YaRN
    "v3_sigmoid_groups_bias_yarn": ("DeepseekV3", dict(HF_TINY, n_group=4, topk_group=2, q_lora_rank=16,
                                                       n_shared_experts=1, routed_scaling_factor=2.5,
                                                       num_nextn_predict_layers=0, rope_parameters=YARN)),
    # softmax routing without q_lora, max-scored groups (V2)
    "v2_softmax_groups_no_q_lora": ("DeepseekV2", dict(HF_TINY, n_group=4, topk_group=2, q_lora_rank=None,
                                                       topk_method="group_limited_greedy", n_shared_experts=2,
                                                       routed_scaling_factor=1.5, num_experts_per_tok=3,
                                                       rope_theta=5000.0)),
    # softmax top-k without groups, q_lora and YaRN (V2-Lite-like)
    "v2_softmax_greedy_yarn": ("DeepseekV2", dict(HF_TINY, q_lora_rank=16, topk_method="greedy", n_shared_experts=1,
                                                  rope_parameters=YARN)),
}


@pytest.fixture(scope="module", params=sorted(HF_CASES))
def hf_checkpoint(request, tmp_path_factory):
    tf = transformers()
    family, kwargs = HF_CASES[request.param]
    torch.manual_seed(0)
    reference = getattr(tf, f"{family}ForCausalLM")(getattr(tf, f"{family}Config")(**kwargs)).eval()
    scramble(reference)
    path = tmp_path_factory.mktemp(request.param)
    reference.save_pretrained(path)
    return tf, family, reference, path


def test_hf_checkpoint_loads_with_identical_logits(hf_checkpoint):
    _, _, reference, path = hf_checkpoint
    model = load_hf_checkpoint(path).eval()
    x = tokens(96)
    with torch.no_grad():
        expected = reference(x).logits
        for impl in ("naive", "absorbed"):
            assert (model(x, attn_impl=impl).logits - expected).abs().max() <= 1e-4
    assert expected.std() > 0.3  # far from a constant: the comparison has teeth


def test_hf_model_saved_by_model_py_loads_back_identically(hf_checkpoint, tmp_path):
    tf, family, reference, path = hf_checkpoint
    save_hf_checkpoint(load_hf_checkpoint(path), tmp_path / "out")
    back, info = getattr(tf, f"{family}ForCausalLM").from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    x = tokens(96)
    with torch.no_grad():
        assert torch.equal(back.eval()(x).logits, reference(x).logits)


@pytest.mark.parametrize("variant", ["v3", "v2"])
def test_saved_checkpoint_loads_in_transformers_with_identical_logits(variant, tmp_path):
    tf = transformers()
    overrides = {} if variant == "v3" else dict(score_func="softmax", use_router_bias=False, q_lora_rank=0,
                                                route_scale=1.0, n_expert_groups=1, n_limited_groups=1)
    model = micro(**overrides)
    save_hf_checkpoint(model, tmp_path / "ckpt", max_shard_bytes=20_000)
    assert len(list((tmp_path / "ckpt").glob("model-*-of-*.safetensors"))) > 1
    family = "DeepseekV3" if variant == "v3" else "DeepseekV2"
    theirs, info = getattr(tf, f"{family}ForCausalLM").from_pretrained(tmp_path / "ckpt", output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    # transformers has no MTP module: the only keys it leaves are those of the MTP layer.
    assert info["unexpected_keys"] and all(k.startswith("model.layers.2.") for k in info["unexpected_keys"])
    x = tokens(64)
    with torch.no_grad():
        assert (theirs.eval()(x).logits - model(x).logits).abs().max() <= 1e-4


# ------------------------------------------------------------------------------------------------
# MTP, FP8, partial loading

def test_mtp_layer_loads_into_mtp_and_round_trips(tmp_path):
    model = micro()
    save_hf_checkpoint(model, tmp_path / "a")
    saved = read_tensors(tmp_path / "a")
    layer = model.cfg.n_layers
    for part in ["enorm", "hnorm", "eh_proj", "shared_head.norm", "shared_head.head", "embed_tokens",
                 "self_attn.kv_b_proj", "mlp.experts.7.up_proj", "mlp.gate"]:
        assert f"model.layers.{layer}.{part}.weight" in saved
    assert torch.equal(saved[f"model.layers.{layer}.shared_head.head.weight"], saved["lm_head.weight"])

    loaded = load_hf_checkpoint(tmp_path / "a")
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    save_hf_checkpoint(loaded, tmp_path / "b")
    again = read_tensors(tmp_path / "b")
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)

    skipped = load_hf_checkpoint(tmp_path / "a", mtp_depth=0)
    assert len(skipped.mtp) == 0
    x = tokens(64)
    with torch.no_grad():
        assert torch.equal(skipped(x).logits, model(x).logits)


def quantise_fp8(w, block=128):
    """Per-block fp8 e4m3 with a float32 scale: w ~ q * scale (the release's weight_scale_inv)."""
    rows, cols = math.ceil(w.shape[0] / block), math.ceil(w.shape[1] / block)
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    scale = torch.empty(rows, cols)
    reference = torch.empty(w.shape)
    for i in range(rows):
        for j in range(cols):
            sl = (slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block))
            scale[i, j] = w[sl].abs().max() / 448.0
            q[sl] = (w[sl] / scale[i, j]).to(torch.float8_e4m3fn)
            reference[sl] = q[sl].float() * scale[i, j]
    return q, scale, reference


def test_fp8_checkpoint_dequantises_on_load(tmp_path):
    # inter_dim 200 and vocab 300: weights span several 128-blocks with cropped edges.
    model = micro(inter_dim=200, vocab_size=300, dim=160)
    save_hf_checkpoint(model, tmp_path)
    tensors, reference = read_tensors(tmp_path), {}
    for key in list(tensors):
        if ("self_attn" in key or "mlp" in key or "eh_proj" in key) and key.endswith("proj.weight"):
            q, scale, reference[key] = quantise_fp8(tensors[key].float())
            tensors[key], tensors[key[:-len("weight")] + "weight_scale_inv"] = q, scale
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = RELEASED_V3["quantization_config"]
    rewrite(tmp_path, tensors, config)
    assert any(t.shape[0] > 128 and t.shape[0] % 128 for k, t in reference.items())

    loaded = load_hf_checkpoint(tmp_path)
    by_hf = by_hf_name(loaded)
    assert any(".experts." in key for key in reference)
    for key, expected in reference.items():
        assert torch.equal(by_hf[key], expected), key
    assert torch.equal(by_hf["lm_head.weight"], model.head.weight)

    w = torch.randn(300, 200)
    q, scale, expected = quantise_fp8(w)
    assert torch.equal(dequantize_fp8(q, scale), expected)
    assert (expected - w).abs().max() < 0.07 * w.abs().max()


def test_keep_loads_only_the_selected_parameters_on_a_meta_model(tmp_path):
    model = micro()
    save_hf_checkpoint(model, tmp_path)
    part = load_hf_checkpoint(tmp_path, keep=lambda name: name.startswith("layers.1."), dtype=torch.bfloat16)
    for name, p in part.named_parameters():
        if name.startswith("layers.1."):
            assert p.dtype == torch.bfloat16 and torch.equal(p, model.get_parameter(name).bfloat16())
        else:
            assert p.is_meta, name
    assert part.layers[1].ffn.gate.bias.dtype == torch.float32  # the router bias stays fp32
    assert not part.rope_cos.is_meta and torch.equal(part.rope_cos, model.rope_cos)


def test_loading_into_an_existing_model_copies_in_place(tmp_path):
    model = micro()
    save_hf_checkpoint(model, tmp_path)
    target = micro(seed=5)
    weight = target.layers[0].attn.wq_b.weight
    assert load_hf_checkpoint(tmp_path, model=target) is target
    assert target.layers[0].attn.wq_b.weight is weight and torch.equal(weight, model.layers[0].attn.wq_b.weight)
    with pytest.raises(CheckpointError, match="n_heads"):
        load_hf_checkpoint(tmp_path, model=Transformer(get_config("micro", n_heads=4)))


def test_a_dtensor_parameter_receives_its_shard(tmp_path):
    dist = torch.distributed
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group of its own")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    model = micro()
    save_hf_checkpoint(model, tmp_path)
    try:
        dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    except Exception as e:  # e.g. a sandbox where gloo cannot resolve the host name
        pytest.skip(f"no single-process gloo group here: {e}")
    try:
        target = micro(seed=5)
        mesh = init_device_mesh("cpu", (1,))
        linear, experts = target.layers[0].attn.wq_b, target.layers[1].ffn.experts
        linear.weight = torch.nn.Parameter(distribute_tensor(linear.weight.detach(), mesh, [Shard(0)]))
        experts.w2 = torch.nn.Parameter(distribute_tensor(experts.w2.detach(), mesh, [Shard(0)]))  # FSDP2's layout
        load_hf_checkpoint(tmp_path, model=target)
        assert torch.equal(linear.weight.full_tensor(), model.layers[0].attn.wq_b.weight)
        assert torch.equal(experts.w2.full_tensor(), model.layers[1].ffn.experts.w2)
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------
# Errors

@pytest.fixture
def saved_micro(tmp_path):
    save_hf_checkpoint(micro(), tmp_path / "ckpt", max_shard_bytes=20_000)
    return tmp_path / "ckpt"


def test_missing_tensor_is_an_error_listing_it(saved_micro):
    tensors = read_tensors(saved_micro)
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"], tensors["model.norm.weight"]
    rewrite(saved_micro, tensors)
    with pytest.raises(CheckpointError, match=r"missing \(2\)") as e:
        load_hf_checkpoint(saved_micro)
    assert "model.layers.1.mlp.experts.3.up_proj.weight" in str(e.value) and "model.norm.weight" in str(e.value)


def test_missing_mtp_layer_suggests_skipping_it(saved_micro):
    rewrite(saved_micro, {k: v for k, v in read_tensors(saved_micro).items() if not k.startswith("model.layers.2.")})
    with pytest.raises(CheckpointError, match="mtp_depth=0"):
        load_hf_checkpoint(saved_micro)
    assert len(load_hf_checkpoint(saved_micro, mtp_depth=0).mtp) == 0


def test_unexpected_and_mis_shaped_tensors_are_errors_listing_them(saved_micro):
    tensors = read_tensors(saved_micro)
    tensors["model.layers.0.self_attn.rotary.weight"] = torch.zeros(3)
    tensors["model.layers.1.mlp.gate.weight"] = torch.zeros(8, 31)
    rewrite(saved_micro, tensors)
    with pytest.raises(CheckpointError) as e:
        load_hf_checkpoint(saved_micro)
    message = str(e.value)
    assert "unexpected (1)" in message and "model.layers.0.self_attn.rotary.weight" in message
    assert "model.layers.1.mlp.gate.weight: checkpoint (8, 31), model (8, 32)" in message


def test_fp8_weight_without_its_scale_is_an_error(saved_micro):
    tensors = read_tensors(saved_micro)
    tensors["model.layers.0.self_attn.o_proj.weight"] = tensors["model.layers.0.self_attn.o_proj.weight"].to(
        torch.float8_e4m3fn)
    rewrite(saved_micro, tensors)
    with pytest.raises(CheckpointError, match="o_proj.weight: F8_E4M3 without .*o_proj.weight_scale_inv"):
        load_hf_checkpoint(saved_micro)


def test_truncated_safetensors_is_an_error_naming_the_file(saved_micro):
    shard = sorted(saved_micro.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=shard.name + ".*truncated"):
        load_hf_checkpoint(saved_micro)


def test_shard_missing_from_disk_or_index_is_an_error_naming_it(saved_micro):
    index = json.loads((saved_micro / INDEX).read_text())
    key, shard = next(iter(index["weight_map"].items()))
    del index["weight_map"][key]
    (saved_micro / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"{key}: in the file, absent from the index"):
        load_hf_checkpoint(saved_micro)
    (saved_micro / shard).unlink()
    with pytest.raises(CheckpointError, match=f"{shard}: listed in {INDEX} but missing"):
        load_hf_checkpoint(saved_micro)


def test_unsupported_quantisation_or_architecture_is_an_error(saved_micro):
    config = json.loads((saved_micro / "config.json").read_text())
    (saved_micro / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(CheckpointError, match="unsupported quantisation.*gptq"):
        load_hf_checkpoint(saved_micro)
    (saved_micro / "config.json").write_text(json.dumps({**config, "model_type": "qwen2_moe"}))
    with pytest.raises(CheckpointError, match="unsupported architecture.*qwen2_moe"):
        load_hf_checkpoint(saved_micro)


def test_failed_save_leaves_the_previous_checkpoint_intact(saved_micro):
    before = read_tensors(saved_micro)
    with torch.device("meta"):
        broken = Transformer(get_config("micro"))
    with pytest.raises(CheckpointError, match="meta"):
        save_hf_checkpoint(broken, saved_micro)
    assert read_tensors(saved_micro).keys() == before.keys()
    assert all(torch.equal(t, before[k]) for k, t in read_tensors(saved_micro).items())
    (saved_micro / "tokenizer.json").write_text("{}")
    save_hf_checkpoint(micro(seed=3), saved_micro, max_shard_bytes=10**9)
    assert torch.equal(load_hf_checkpoint(saved_micro).head.weight, micro(seed=3).head.weight)
    assert sorted(p.name for p in saved_micro.iterdir()) == [
        "config.json", "model-00001-of-00001.safetensors", INDEX, "tokenizer.json"]  # old shards gone
    assert [p.name for p in saved_micro.parent.iterdir()] == [saved_micro.name]  # no temporary directories left


# ------------------------------------------------------------------------------------------------
# Tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 3:45pm; they'll arrive at 10,000 ft!",
    "深度求索发布了新的推理模型，它在数学和代码任务上表现出色。我们来验证一下。",
    "こんにちは、世界！カタカナ・ひらがなを混ぜて書きます。ラーメンが好きです。",
    "مرحبا بالعالم، كيف حالك اليوم؟ الأرقام ٣٤٥ و 678.",
    "Привет, мир! Это проверка токенизатора. नमस्ते दुनिया, कैसे हो? 안녕하세요 세계.",
    "Emoji: 👩‍💻 🎉❤️ 👍🏽 🇫🇷 — “quotes” ‘single’ … ¿qué? «ça va» ＦＵＬＬ１２３",
    "def f(x):\n    return x**2  # square\n\n\tif a != b:\n        print(f'{a}: {b!r}')\n",
    "Numbers 1234567 3.14159 0.001 2025-01-20 ²³ Ⅻ and whitespace   runs\n\n\n  and\t\ttabs   \n",
    "<think>\nLet me add 12 and 30: 12 + 30 = 42.\n</think>\nThe answer is 42.",
]
SAMPLES = CORPUS + [
    "<｜begin▁of▁sentence｜>You are helpful.<｜User｜>What is 7*6?<｜Assistant｜><think>\n6*7=42</think>42"
    "<｜end▁of▁sentence｜>",
    "unseen words: supercalifragilistic 量子纠缠 ゾンビ ثلاثاء 9876543210 \u200b\u200d\x00\x07 \u3099\u3040\u30fb\u309b",
    "   leading spaces and trailing   ", "\n\n\n", "", "a", "1", "中", " 中 1 a",
]
SPECIAL = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"]
ADDED_SPECIAL = ["<｜User｜>", "<｜Assistant｜>"]
ADDED_PLAIN = ["<think>", "</think>"]


# The pre-tokenizer of DeepSeek-V3's (and R1's) tokenizer.json, as the file spells it.
RELEASED_PRE_TOKENIZER = r"""{"type": "Sequence", "pretokenizers": [
 {"type": "Split", "pattern": {"Regex": "\\p{N}{1,3}"}, "behavior": "Isolated", "invert": false},
 {"type": "Split", "pattern": {"Regex": "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"}, "behavior": "Isolated",
  "invert": false},
 {"type": "Split", "pattern": {"Regex": "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"},
  "behavior": "Isolated", "invert": false},
 {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]}"""


def released_splits():
    return [step["pattern"]["Regex"] for step in json.loads(RELEASED_PRE_TOKENIZER)["pretokenizers"][:-1]]


def train_tokenizer(path, splits, use_regex=False, vocab_size=700):
    """Train a byte-level BPE with `tokenizers`; a split is a regex, or ("literal", text)."""
    tk = pytest.importorskip("tokenizers")
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    tok = tk.Tokenizer(models.BPE())
    steps = [pre_tokenizers.Split(r[1] if isinstance(r, tuple) else Regex(r), behavior="isolated") for r in splits]
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        steps + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 3, trainer)
    tok.add_special_tokens(ADDED_SPECIAL)
    tok.add_tokens(ADDED_PLAIN)
    tok.save(str(path))
    return tok


@pytest.fixture(scope="module")
def deepseek_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    theirs = train_tokenizer(path, released_splits())
    assert json.loads(path.read_text())["pre_tokenizer"]["pretokenizers"][2]["pattern"]["Regex"] == \
        json.loads(RELEASED_PRE_TOKENIZER)["pretokenizers"][2]["pattern"]["Regex"]
    return theirs, load_hf_tokenizer(path)


def test_released_pre_tokenizer_is_recognised():
    assert tuple(released_splits()) == DEEPSEEK_V3_SPLITS


def test_imported_tokenizer_gives_identical_ids(deepseek_tokenizer):
    theirs, ours = deepseek_tokenizer
    assert ours.n_vocab == theirs.get_vocab_size()
    for text in SAMPLES:
        ids = theirs.encode(text, add_special_tokens=False).ids
        assert ours.encode(text, allowed_special="all") == ids, text
        assert ours.decode(ids) == text
    assert ours.encode("<｜User｜><think>", allowed_special="all") == [theirs.token_to_id("<｜User｜>"),
                                                                      theirs.token_to_id("<think>")]


PIECES = list("aZé\u0301 \n\r\t1٣²中文のカ・ー\u3099\u3040\u309b\u30a0!'-.<>_\u200d\u200b\x00😀\u00a0\u3000ｱ") + [
    "<｜User｜>", "<think>", "ing", "  ", "123456"]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=30))
def test_imported_tokenizer_matches_on_random_text(deepseek_tokenizer, pieces):
    theirs, ours = deepseek_tokenizer
    text = "".join(pieces)
    assert ours.encode(text, allowed_special="all") == theirs.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("splits,use_regex", [
    ([], True),                                                                   # GPT-2's ByteLevel regex
    ([r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
      r"\s+(?!\S)|\s+"], False),                                                  # a GPT-4-style split
    ([r"\p{L}+"], False),                                                         # one that leaves gaps
    ([("literal", ".")], False),                                                  # a literal string
])
def test_single_split_tokenizers_give_identical_ids(tmp_path, splits, use_regex):
    theirs = train_tokenizer(tmp_path / "tokenizer.json", splits, use_regex, vocab_size=400)
    ours = load_hf_tokenizer(tmp_path)
    for text in SAMPLES:
        assert ours.encode(text, allowed_special="all") == theirs.encode(text, add_special_tokens=False).ids, text


def test_unsupported_tokenizer_is_an_error(tmp_path):
    train_tokenizer(tmp_path / "tokenizer.json", [r"\p{N}", r"\p{L}+"], vocab_size=300)
    with pytest.raises(CheckpointError, match="2 successive regex splits"):
        load_hf_tokenizer(tmp_path / "tokenizer.json")
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    spec["model"]["type"] = "WordPiece"
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match="WordPiece"):
        load_hf_tokenizer(tmp_path / "tokenizer.json")


# ------------------------------------------------------------------------------------------------
# Chat format

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "<think>\n2+2=4\n</think>\n\n4"},
    {"role": "user", "content": "And 3+3?"},
]


def test_r1_chat_opens_the_assistant_turn_with_think():
    assert format_r1_chat(CHAT) == (
        "<｜begin▁of▁sentence｜>Be brief.<｜User｜>What is 2+2?<｜Assistant｜>\n\n4<｜end▁of▁sentence｜>"
        "<｜User｜>And 3+3?<｜Assistant｜><think>\n")
    assert format_r1_chat(CHAT[:2], add_generation_prompt=False) == \
        "<｜begin▁of▁sentence｜>Be brief.<｜User｜>What is 2+2?"
    assert "\uff5c" in format_r1_chat([]) and "\u2581" in format_r1_chat([])  # full-width bar, lower block
    with pytest.raises(ValueError, match="tool"):
        format_r1_chat([{"role": "tool", "content": "x"}])


def test_r1_chat_template_renders_like_format_r1_chat():
    jinja2 = pytest.importorskip("jinja2")
    template = jinja2.Environment().from_string(R1_CHAT_TEMPLATE)
    for messages in (CHAT, CHAT[:2], CHAT[1:], []):
        for gen in (True, False):
            rendered = template.render(messages=messages, add_generation_prompt=gen, bos_token=BOS_TOKEN)
            assert rendered == format_r1_chat(messages, gen)
