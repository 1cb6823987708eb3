"""`python -m minigpt4_ja bench` on the tiny preset: it runs, writes every figure, compares configurations, and its
random-weights builder and bandwidth arithmetic are right. No assertion depends on how fast anything was."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from minigpt4_ja import bench
from minigpt4_ja.cli import build_parser
from minigpt4_ja.errors import InputError


REPO = Path(__file__).resolve().parents[1]
FIELDS = ("startup_s", "image_encode_s", "time_to_first_token_s", "decode_tokens_per_s", "peak_memory_mb",
          "multi_turn_speedup")
FAST = ["--preset", "tiny", "--repeats", "2", "--warmup", "1", "--new-tokens", "6"]


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def check_result(result: dict, turn: int = 6) -> None:
    assert not result.get("error"), result.get("error")
    for field in FIELDS:
        assert positive(result[field]), (field, result[field])
    spread = result["spread"]
    for field in ("image_encode_s", "time_to_first_token_s", "decode_tokens_per_s"):
        summary = spread[field]
        assert len(summary["runs"]) == 2
        assert summary["min"] <= summary["median"] <= summary["max"]
        assert summary["q1"] <= summary["q3"]
    # The speedup is the ratio of two measured times to first token, both kept.
    reencode, reuse = result[f"turn{turn}_ttft_reencode_s"], result[f"turn{turn}_ttft_reuse_s"]
    assert positive(reencode) and positive(reuse)
    assert result["multi_turn"]["ttft_reencode_s"] == reencode
    assert result["multi_turn"]["ttft_reuse_s"] == reuse
    assert result["multi_turn_speedup"] == pytest.approx(reencode / reuse)
    assert len(spread[f"turn{turn}_ttft_reencode_s"]["runs"]) == 2
    # At turn 6 the reused session really served most of the history from its cache.
    assert result["multi_turn"]["turn"] == turn
    assert 0 < result["multi_turn"]["reused_tokens"] < result["multi_turn"]["prompt_tokens"]
    assert result["new_tokens"] == [6, 6]  # the answer length is pinned
    assert result["llm_weight_bytes"] > result["bytes_per_token"] > 0


def test_cli_writes_every_field_and_a_table(tmp_path):
    """The real command line, each configuration in its own worker process."""
    out = tmp_path / "out.json"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    run = subprocess.run([sys.executable, "-m", "minigpt4_ja", "bench", *FAST, "--bandwidth-limit",
                          "--json", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text(encoding="utf-8"))
    [result] = report["results"]
    check_result(result)
    assert result["name"] == "float32" and result["device"] == "cpu"
    assert result["peak_memory_kind"].startswith("process peak RSS")
    machine = report["machine"]
    assert machine["cpu"] and machine["cpu_cores"] >= 1 and "gpu" in machine
    assert set(report["versions"]) == {"torch", "transformers", "bitsandbytes"}
    assert report["versions"]["torch"] == torch.__version__
    assert report["settings"]["repeats"] == 2
    # --bandwidth-limit: a measured bandwidth, and the bound computed from it and the weight bytes.
    bandwidth = report["bandwidth"]["cpu"]["copy_gb_s"]
    assert positive(bandwidth) and result["bandwidth_gb_s"] == bandwidth
    assert result["bound_tokens_per_s"] == pytest.approx(bandwidth * 1e9 / result["bytes_per_token"])
    assert result["fraction_of_bound"] == pytest.approx(result["decode_tokens_per_s"] / result["bound_tokens_per_s"])
    # The Markdown table goes to stdout, one row per configuration, with the machine under it.
    lines = run.stdout.splitlines()
    assert lines[0].startswith("| config |") and "decode tok/s" in lines[0] and "bound tok/s" in lines[0]
    assert [line for line in lines if line.startswith("| float32")]
    assert any(line.startswith("Machine: ") for line in lines)
    assert "loading tiny" in run.stderr  # progress goes to stderr, never into the table


def test_config_list_compares_float32_and_int8(tmp_path, capsys):
    """A list gives one row per configuration; bitsandbytes runs int8 on CPU. Random weights of the tiny
    architecture go through the same writer and loader as the real-size ones."""
    out = tmp_path / "out.json"
    args = build_parser().parse_args(["bench", *FAST, "--configs", "float32,int8", "--in-process", "--random-weights",
                                      "--random-dir", str(tmp_path / "random"), "--json", str(out)])
    assert bench.main(args) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert [r["name"] for r in report["results"]] == ["float32", "int8"]
    for result in report["results"]:
        check_result(result)
    float32, int8 = report["results"]
    assert (float32["quantization"], int8["quantization"]) == ("none", "int8")
    assert int8["llm_weight_bytes"] < float32["llm_weight_bytes"]  # int8 weights really are smaller
    assert report["random_model"]["llm_config"]["num_hidden_layers"] == 2
    assert report["settings"]["random_weights"] is True
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| config")]
    assert len(rows) == 2 and rows[0].startswith("| float32") and rows[1].startswith("| int8")
    # A second call reuses the random model written in --random-dir.
    assert (tmp_path / "random" / bench.RANDOM_MARKER).is_file()


def test_random_builder_real_architecture_and_small_override():
    # The real sizes, checked on the meta device (no memory): rinna's 4B GPT-NeoX as the issue lists it.
    config = bench.random_llm_config("bilingual-4b")
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (36, 2816, 22)
    assert (config.intermediate_size, config.vocab_size, config.max_position_embeddings) == (11264, 65536, 2048)
    assert config.rope_parameters["partial_rotary_factor"] == 1.0 and config.use_parallel_residual is False
    assert config.tie_word_embeddings is False and (config.bos_token_id, config.eos_token_id) == (2, 3)
    assert bench.random_llm_config("japanese-3.6b").vocab_size == 32000
    from transformers import GPTNeoXForCausalLM

    with torch.device("meta"):
        parameters = sum(p.numel() for p in GPTNeoXForCausalLM(config).parameters())
    assert 3.7e9 < parameters < 3.9e9  # "3.8B parameters"
    vision = bench.random_encoder_config("bilingual-4b")
    assert vision["vision_config"]["num_hidden_layers"] == 39 and vision["vision_config"]["hidden_size"] == 1408
    assert vision["vision_config"]["patch_size"] == 14 and vision["vision_config"]["image_size"] == 224
    assert vision["qformer_config"]["num_hidden_layers"] == 12 and vision["num_query_tokens"] == 32

    # The builder itself, on a small override of the same architecture: real vocabulary, few thin layers.
    small = bench.random_llm_config("bilingual-4b", num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                    intermediate_size=256)
    llm = bench.build_random_llm(small, torch.float32, "cpu", seed=0)
    assert len(llm.gpt_neox.layers) == 2 and llm.config.hidden_size == 64
    assert llm.get_input_embeddings().weight.shape == (65536, 64)
    assert llm.get_output_embeddings().weight.shape == (65536, 64)
    assert all(p.device.type == "cpu" and torch.isfinite(p).all() for p in llm.parameters())
    norm = llm.gpt_neox.layers[0].input_layernorm
    assert torch.equal(norm.weight, torch.ones(64)) and torch.equal(norm.bias, torch.zeros(64))
    weight = llm.gpt_neox.layers[0].mlp.dense_h_to_4h.weight
    assert 0 < weight.abs().max() <= 0.02 and weight.std() > 0.005
    # The rotary frequencies, left empty by to_empty, are computed again: a forward pass gives finite logits.
    rotary = llm.gpt_neox.rotary_emb
    expected, _ = rotary.compute_default_rope_parameters(small)
    assert torch.allclose(rotary.inv_freq, expected)
    with torch.no_grad():
        logits = llm(torch.tensor([[2, 100, 65535]])).logits
    assert logits.shape == (1, 3, 65536) and torch.isfinite(logits).all()
    # Same seed, same weights.
    again = bench.build_random_llm(small, torch.float32, "cpu", seed=0)
    assert torch.equal(again.get_input_embeddings().weight, llm.get_input_embeddings().weight)


def test_random_weights_with_a_vocabulary_larger_than_the_tokenizer(tmp_path):
    """Random weights keep the real vocabulary (65,536 rows) with a small tokenizer: sampled ids beyond its pieces
    must still decode, and the model is loaded through the normal loader from the written folders."""
    described = bench.write_random_model("tiny", tmp_path, llm_overrides={"vocab_size": 65536})
    assert described["llm_config"]["vocab_size"] == 65536 and described["tokenizer_vocab"] < 65536
    assert (tmp_path / "llm" / "spiece.model").is_file() and (tmp_path / "weights" / "projection.safetensors").is_file()
    spec = dict(name="wide", preset="tiny", llm=described["llm_dir"], weights=described["weights_dir"], repeats=1,
                warmup=0, new_tokens=6, turn=3, seed=0, device="cpu")
    result = bench.run_config(spec, log=lambda message: None)
    assert result["new_tokens"] == [6] and "folded" in result["tokenizer_note"]
    assert positive(result["decode_tokens_per_s"]) and positive(result["multi_turn_speedup"])
    # Written once, then reused.
    again = bench.write_random_model("tiny", tmp_path, llm_overrides={"vocab_size": 65536})
    assert again.pop("reused") is True and again == described


def test_random_encoder_builder_fills_every_weight():
    encoder = bench.build_random_encoder(bench.random_encoder_config("tiny"), "cpu")
    assert encoder.vision_model.config.num_hidden_layers == 2
    assert all(p.device.type == "cpu" and torch.isfinite(p).all() for p in encoder.parameters())
    with torch.no_grad():
        out = encoder(torch.zeros(1, 3, 224, 224))
    assert out.shape == (1, 32, 768) and torch.isfinite(out).all()


def test_bandwidth_math_on_known_numbers():
    # 2 GB of weights read per token at 320 GB/s (a T4) -> at most 160 tokens/s.
    assert bench.bandwidth_bound(320.0, 2_000_000_000) == pytest.approx(160.0)
    assert bench.bandwidth_bound(4800.0, 8_000_000_000) == pytest.approx(600.0)
    with pytest.raises(ValueError):
        bench.bandwidth_bound(100.0, 0)

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(1000, 16)  # 64,000 B; one 64 B row is read per token
            self.proj = nn.Linear(16, 16)  # 1,024 + 64 B
            self.head = nn.Linear(16, 1000, bias=False, dtype=torch.float16)  # 32,000 B

        def get_input_embeddings(self):
            return self.embed

    counted = bench.llm_weight_bytes(Tiny())
    assert counted["llm_weight_bytes"] == 64_000 + 1_088 + 32_000
    assert counted["bytes_per_token"] == 64 + 1_088 + 32_000


def test_quantized_bytes_include_the_scales(tiny_pipeline):
    from minigpt4_ja.loading import load_pipeline, ModelOptions

    int8 = load_pipeline(ModelOptions(preset="tiny", quantization="int8", device="cpu"), require_projection=False)
    linear = int8.llm.gpt_neox.layers[0].mlp.dense_h_to_4h
    weight = linear.weight
    assert weight.dtype == torch.int8
    assert bench.tensor_bytes(weight) == weight.numel() + weight.SCB.numel() * weight.SCB.element_size()
    full = bench.llm_weight_bytes(tiny_pipeline.llm)["llm_weight_bytes"]
    assert bench.llm_weight_bytes(int8.llm)["llm_weight_bytes"] < full


def test_summary_and_config_parsing():
    summary = bench.summarize([3.0, 1.0, 2.0, float("nan"), 4.0])
    assert summary["median"] == 2.5 and (summary["min"], summary["max"]) == (1.0, 4.0)
    assert summary["q1"] == 1.75 and summary["q3"] == 3.25 and summary["runs"] == [3.0, 1.0, 2.0, 4.0]
    assert bench.summarize([])["median"] is None

    configs = bench.parse_configs("float32,bfloat16,float16,int8,nf4", device="cpu")
    assert [(c.name, c.dtype, c.quantization, c.device) for c in configs] == [
        ("float32", "float32", "none", "cpu"), ("bfloat16", "bfloat16", "none", "cpu"),
        ("float16", "float16", "none", "cpu"), ("int8", None, "int8", "cpu"), ("nf4", None, "nf4", "cpu")]
    [config] = bench.parse_configs("nf4+bfloat16@cuda:1")
    assert (config.dtype, config.quantization, config.device) == ("bfloat16", "nf4", "cuda:1")
    [single] = bench.parse_configs(None, dtype="bfloat16", quantization="int8")
    assert (single.dtype, single.quantization) == ("bfloat16", "int8")
    for bad in ("float64", "int4", "int8+float64", "float32,float32", ","):
        with pytest.raises(InputError):
            bench.parse_configs(bad)


def test_bad_arguments_are_one_line_errors(capsys):
    from minigpt4_ja.cli import main

    assert main(["bench", "--preset", "tiny", "--repeats", "0"]) == 2
    assert "--repeats must be at least 1" in capsys.readouterr().err
    assert main(["bench", "--preset", "tiny", "--configs", "float64"]) == 2
    assert "unknown --configs item" in capsys.readouterr().err
