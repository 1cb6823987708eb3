"""The converted BLIP-2 image side equals LAVIS's forward, computed independently (tests/lavis_reference.py) from
small random files written in LAVIS's real layouts (tests/weight_fixtures.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import lavis_reference as ref
from weight_fixtures import (
    DEEPER, EVA_HEAD_DIM, TINY, eva_vit_state_dict, qformer_state_dict, save_blip2_checkpoint, save_eva_vit,
    write_lavis_pair, write_rinna_checkpoint,
)
from minigpt4_ja import vision
from minigpt4_ja.images import preprocess

ATOL = RTOL = 1e-5  # fp32 against fp32; the measured gap is about 4e-6, a wrong eps or block is 1e-3 and more
SIZES = {"tiny": TINY, "deeper": DEEPER, "eva-head-dim": EVA_HEAD_DIM}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Conversions and downloads go to a per-test cache, never the user's."""
    monkeypatch.setenv("MINIGPT4_JA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def lavis_pair(tmp_path_factory):
    """name -> (eva_vit_g.pth, blip2_pretrained_flant5xxl.pth), written once per session."""
    made: dict = {}

    def get(name: str):
        if name not in made:
            made[name] = write_lavis_pair(tmp_path_factory.mktemp(f"lavis-{name}"), SIZES[name])
        return made[name]

    return get


@pytest.fixture(scope="session")
def pixels() -> torch.Tensor:
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1234))


@pytest.fixture(scope="session")
def reference(lavis_pair, pixels):
    """name -> (image_embeds, queries) from the LAVIS re-implementation."""
    made: dict = {}

    def get(name: str):
        if name not in made:
            eva, qformer = lavis_pair(name)
            sizes = SIZES[name]
            made[name] = ref.encode_image(
                ref.load_eva_state_dict(eva), ref.load_blip2_state_dict(qformer), pixels,
                vit_depth=sizes.vit_depth, vit_heads=sizes.vit_heads, qformer_heads=sizes.qformer_heads,
                cross_attention_freq=sizes.cross_attention_freq)
        return made[name]

    return get


def encode(encoder: vision.VisionEncoder, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return encoder.vision_model(pixel_values=pixels).last_hidden_state, encoder(pixels)


def assert_matches_reference(encoder, pixels, expected) -> None:
    image_embeds, queries = encode(encoder, pixels)
    assert queries.shape == (pixels.shape[0], 32, 768) and queries.dtype == torch.float32
    torch.testing.assert_close(image_embeds, expected[0], atol=ATOL, rtol=RTOL, msg="ln_vision(ViT) differs from LAVIS")
    torch.testing.assert_close(queries, expected[1], atol=ATOL, rtol=RTOL, msg="Q-Former queries differ from LAVIS")


# ---------------------------------------------------------------- the reference itself is sharp enough

def test_reference_tells_apart_the_details_that_matter(lavis_pair, pixels, reference):
    """Guards the equality tests: each LAVIS detail moves the reference output far beyond the tolerance."""
    eva, qformer = lavis_pair("deeper")
    eva_sd, blip2_sd = ref.load_eva_state_dict(eva), ref.load_blip2_state_dict(qformer)
    base = dict(vit_depth=DEEPER.vit_depth, vit_heads=DEEPER.vit_heads, qformer_heads=12, cross_attention_freq=2)
    embeds, queries = reference("deeper")
    variants = {
        "ln_vision eps 1e-6 (transformers' default)": dict(ln_vision_eps=1e-6),
        "all 4 blocks (the last one included)": dict(vit_depth=DEEPER.vit_depth + 1),
        "ViT heads x2": dict(vit_heads=DEEPER.vit_heads * 2),
        "Q-Former heads /2": dict(qformer_heads=6),
        "cross-attention every 4th layer": dict(cross_attention_freq=4),
    }
    for label, change in variants.items():
        other_embeds, other_queries = ref.encode_image(eva_sd, blip2_sd, pixels, **(base | change))
        gap = max((other_embeds - embeds).abs().max().item(), (other_queries - queries).abs().max().item())
        assert gap > 30 * ATOL, f"{label}: the reference moves only {gap:.2e}; the fixtures are too weak to test it"


# ---------------------------------------------------------------- equality with LAVIS

@pytest.mark.parametrize("name", list(SIZES))
def test_lavis_encoder_equals_reference(name, lavis_pair, pixels, reference):
    """vision.load_lavis_encoder (architecture read from the files' shapes) computes LAVIS's forward."""
    sizes = SIZES[name]
    encoder = vision.load_lavis_encoder(*lavis_pair(name)).place("cpu", half_precision_vit=False)
    assert encoder.vision_model.config.num_hidden_layers == sizes.vit_depth  # all but the file's last block
    cross = [i for i, layer in enumerate(encoder.qformer.encoder.layer) if layer.has_cross_attention]
    assert cross == list(range(0, sizes.qformer_layers, sizes.cross_attention_freq))
    assert_matches_reference(encoder, pixels, reference(name))


def test_tiny_files_fit_the_library_tiny_configs(lavis_pair, pixels, reference):
    """The TINY fixture files load strictly into VisionEncoder(tiny_vision_config(), tiny_qformer_config())."""
    eva, qformer = lavis_pair("tiny")
    encoder = vision.VisionEncoder(vision.tiny_vision_config(), vision.tiny_qformer_config())
    state_dict = (vision.convert_eva_vit(vision.read_eva_vit_file(eva), encoder.vision_model.config.num_hidden_layers)
                  | vision.convert_blip2_qformer(vision.read_qformer_file(qformer)))
    vision.load_state_dict_checked(encoder, state_dict, "tiny LAVIS files")
    assert_matches_reference(encoder.place("cpu", half_precision_vit=False), pixels, reference("tiny"))


def test_cli_convert_of_lavis_files_equals_reference(lavis_pair, pixels, reference, tmp_path, capsys):
    """`python -m minigpt4_ja convert --eva-vit F --qformer F --projection checkpoint.pth --out DIR`, then the
    converted folder loads to the same encoder as LAVIS's forward, and the same projection as rinna's file."""
    from minigpt4_ja import cli, loading
    from minigpt4_ja.presets import DEFAULT_PRESET, get_preset
    from minigpt4_ja.weights import PROJECTION_FILE, load_projection

    eva, qformer = lavis_pair("eva-head-dim")
    checkpoint = write_rinna_checkpoint(tmp_path / "checkpoint.pth", hidden=48)
    out = tmp_path / "converted"
    argv = ["convert", "--eva-vit", str(eva), "--qformer", str(qformer), "--projection", str(checkpoint),
            "--out", str(out)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert_matches_reference(vision.load_encoder(out).place("cpu", False), pixels, reference("eva-head-dim"))
    weights, _ = load_projection(out / PROJECTION_FILE, 768, 48)
    saved = torch.load(checkpoint, weights_only=True)["model"]
    assert torch.equal(weights["weight"], saved["llama_proj.weight"])
    assert torch.equal(weights["bias"], saved["llama_proj.bias"])
    # and the model-loading path (--eva-vit/--qformer on ask, chat, embed) gives the same encoder
    options = loading.ModelOptions(eva_vit=str(eva), qformer=str(qformer))
    encoder = loading.load_vision_encoder(options, get_preset(DEFAULT_PRESET), None).place("cpu", False)
    assert_matches_reference(encoder, pixels, reference("eva-head-dim"))


# ---------------------------------------------------------------- the details, one by one

def test_last_eva_block_is_ignored(lavis_pair, pixels, tmp_path):
    """BLIP-2 uses 39 of EVA-g's 40 blocks: the file's last block never reaches the model."""
    eva, qformer = lavis_pair("tiny")
    last = TINY.vit_depth  # index of the extra block
    original = vision.load_lavis_encoder(eva, qformer).place("cpu", False)
    assert not any(f"layers.{last}." in key for key in original.state_dict())

    other = eva_vit_state_dict(TINY, seed=99)
    changed_last = vision.load_lavis_encoder(save_eva_vit(
        {k: (other[k] if k.startswith(f"blocks.{last}.") else v) for k, v in eva_vit_state_dict(TINY).items()},
        tmp_path / "last_changed.pth"), qformer).place("cpu", False)
    changed_used = vision.load_lavis_encoder(save_eva_vit(
        {k: (other[k] if k.startswith(f"blocks.{last - 1}.") else v) for k, v in eva_vit_state_dict(TINY).items()},
        tmp_path / "used_changed.pth"), qformer).place("cpu", False)

    with torch.no_grad():
        baseline = original(pixels)
        assert torch.equal(changed_last(pixels), baseline)
        assert not torch.allclose(changed_used(pixels), baseline, atol=1e-3)  # the check can see a block change


def test_qkv_bias_is_q_bias_zeros_v_bias(lavis_pair):
    eva, qformer = lavis_pair("tiny")
    raw = ref.load_eva_state_dict(eva)
    encoder = vision.load_lavis_encoder(eva, qformer).place("cpu", False)
    width = TINY.vit_width
    for i, layer in enumerate(encoder.vision_model.encoder.layers):
        bias = layer.self_attn.qkv.bias
        assert bias.shape == (3 * width,)
        assert torch.equal(bias[:width], raw[f"blocks.{i}.attn.q_bias"].float()), f"layer {i}: q part"
        assert torch.count_nonzero(bias[width:2 * width]) == 0, f"layer {i}: the K part must be zero"
        assert torch.equal(bias[2 * width:], raw[f"blocks.{i}.attn.v_bias"].float()), f"layer {i}: v part"
        assert torch.equal(layer.self_attn.qkv.weight, raw[f"blocks.{i}.attn.qkv.weight"].float())


def test_ln_vision_has_eps_1e5_and_runs_in_fp32(lavis_pair, pixels, reference, monkeypatch):
    eva, qformer = lavis_pair("tiny")
    raw = ref.load_blip2_state_dict(qformer)
    encoder = vision.load_lavis_encoder(eva, qformer)
    ln = encoder.vision_model.post_layernorm
    assert ln.eps == 1e-5
    assert torch.equal(ln.weight.float(), raw["ln_vision.weight"]) and torch.equal(ln.bias.float(), raw["ln_vision.bias"])
    assert all(layer.layer_norm1.eps == 1e-6 and layer.layer_norm2.eps == 1e-6
               for layer in encoder.vision_model.encoder.layers)

    # fp16 in, fp16 out, arithmetic in fp32 (LAVIS's `LayerNorm` subclass in blip2.py)
    x = (torch.randn(2, 257, TINY.vit_width, generator=torch.Generator().manual_seed(5)) * 0.05).half()
    with torch.no_grad():
        out = ln(x)
    assert out.dtype == torch.float16
    expected = F.layer_norm(x.float(), (TINY.vit_width,), raw["ln_vision.weight"], raw["ln_vision.bias"], 1e-5).half()
    assert torch.equal(out, expected)

    # In the half-precision placement (fp16 ViT under fp16 autocast, as LAVIS runs on GPU) ln_vision still sees fp32.
    encoder.place("cpu", half_precision_vit=True)
    seen = []
    layer_norm = F.layer_norm

    def spy(input, normalized_shape, weight=None, bias=None, eps=1e-5):
        seen.append((eps, input.dtype, None if weight is None else weight.dtype))
        return layer_norm(input, normalized_shape, weight, bias, eps)

    with monkeypatch.context() as patch, torch.no_grad():
        patch.setattr(F, "layer_norm", spy)
        queries = encoder(pixels)
    ln_vision_calls = {(dtype, weight_dtype) for eps, dtype, weight_dtype in seen if eps == 1e-5}
    assert ln_vision_calls == {(torch.float32, torch.float32)}, seen
    assert any(dtype == torch.float16 for eps, dtype, _ in seen if eps == 1e-6), "the ViT should run in fp16 here"
    assert queries.dtype == torch.float32
    torch.testing.assert_close(queries, reference("tiny")[1], atol=3e-2, rtol=1e-2)


def test_t5_proj_and_buffers_are_ignored(lavis_pair, pixels, tmp_path):
    """t5_proj (BLIP-2's own projection to T5) and position_ids are not part of the encoder: other values, another
    shape, or none at all give the same encoder."""
    eva, qformer = lavis_pair("tiny")
    original = vision.load_lavis_encoder(eva, qformer).place("cpu", False)
    assert not any("t5" in key or "language" in key or "position_ids" in key for key in original.state_dict())

    model = qformer_state_dict(TINY)
    g = torch.Generator().manual_seed(3)
    other_t5 = model | {"t5_proj.weight": torch.randn(4096, 768, generator=g), "t5_proj.bias": torch.randn(4096, generator=g),
                        "Qformer.bert.embeddings.position_ids": torch.zeros(1, 7, dtype=torch.long)}
    without = {k: v for k, v in model.items() if not k.startswith("t5_proj.") and "position_ids" not in k}
    with torch.no_grad():
        baseline = original(pixels)
        for label, state in (("other t5_proj", other_t5), ("no t5_proj", without)):
            encoder = vision.load_lavis_encoder(eva, save_blip2_checkpoint(state, tmp_path / f"{label}.pth"))
            assert torch.equal(encoder.place("cpu", False)(pixels), baseline), label


def test_preprocess_equals_blip2_eval_processor():
    """Blip2ImageEvalProcessor: Resize((224, 224), BICUBIC) (a squash, no crop), ToTensor, Normalize(CLIP)."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (171, 300, 3), dtype=np.uint8)
    ramp = np.linspace(0, 255, 300, dtype=np.float64)[None, :, None].repeat(171, 0).repeat(3, 2)
    image = Image.fromarray(((noise * 0.5 + ramp * 0.5)).astype(np.uint8), "RGB")  # not square: 300x171

    def hand_written(img: Image.Image) -> torch.Tensor:
        resized = img.resize((224, 224), Image.Resampling.BICUBIC)
        tensor = torch.from_numpy(np.array(resized)).permute(2, 0, 1).float().div(255)  # ToTensor
        mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
        std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
        return ((tensor - mean) / std).unsqueeze(0)

    out = preprocess(image)
    assert out.shape == (1, 3, 224, 224) and out.dtype == torch.float32
    assert torch.equal(out, hand_written(image))
    # and it is not the bilinear, or the crop-then-resize, variant
    assert not torch.equal(out, hand_written(image.resize((224, 224), Image.Resampling.BILINEAR)))
    assert not torch.equal(out, hand_written(image.crop((64, 0, 235, 171))))


def test_save_and_load_encoder_round_trip(lavis_pair, pixels, tmp_path):
    eva, qformer = lavis_pair("deeper")
    encoder = vision.load_lavis_encoder(eva, qformer)
    vision.save_encoder(encoder, tmp_path / "enc")
    loaded = vision.load_encoder(tmp_path / "enc")
    before, after = encoder.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert before[key].dtype == after[key].dtype and torch.equal(before[key], after[key]), key
    assert loaded.vision_model.post_layernorm.eps == 1e-5
    assert loaded.config_dict == encoder.config_dict
    encoder.place("cpu", False)
    loaded.place("cpu", False)
    with torch.no_grad():
        assert torch.equal(loaded(pixels), encoder(pixels))
