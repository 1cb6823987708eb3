"""From options (a preset plus explicit paths) to a ready `Pipeline`.

Every preset loads through the same code: real weights come from the Hub and LAVIS's URLs, the `tiny` preset first
writes a small random model to the cache in the same layouts, then loads it like any other.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn

from .errors import InputError, WeightsError
from .pipeline import Pipeline
from .presets import DEFAULT_PRESET, Preset, get_preset
from .templates import get_template
from .tokenizer import SentencePieceTokenizer, train_tokenizer
from .vision import (
    VisionEncoder, load_encoder, load_lavis_encoder, save_encoder, tiny_qformer_config, tiny_vision_config,
)
from .weights import (
    PROJECTION_FILE, cache_dir, conversion_key, download_url, hub_file, hub_snapshot, load_projection,
    save_projection,
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
QUANTIZATIONS = ("none", "int8", "nf4")
CONVERTED_CONFIG = "minigpt4_ja.json"


@dataclass
class ModelOptions:
    """What to load. Explicit paths override the preset; with all four given nothing is downloaded."""

    preset: str = DEFAULT_PRESET
    llm: str | None = None  # Hub id or local folder (config, weights, spiece.model, tokenizer_config.json)
    eva_vit: str | None = None  # LAVIS eva_vit_g.pth
    qformer: str | None = None  # LAVIS blip2_pretrained_flant5xxl.pth
    projection: str | None = None  # MiniGPT-4 checkpoint.pth or our projection.safetensors
    weights: str | None = None  # a folder (or Hub repo) written by `convert`: encoder + projection
    template: str | None = None
    dtype: str | None = None
    quantization: str | None = None
    device: str | None = None

    @classmethod
    def from_namespace(cls, namespace) -> "ModelOptions":
        return cls(**{f.name: getattr(namespace, f.name) for f in fields(cls) if hasattr(namespace, f.name)})


@dataclass(frozen=True)
class Precision:
    device: torch.device
    llm_dtype: torch.dtype
    quantization: str
    half_precision_vit: bool  # fp16 ViT on GPU, as LAVIS runs it; fp32 on CPU

    @property
    def label(self) -> str:
        dtype = str(self.llm_dtype).replace("torch.", "")
        return f"{self.quantization} ({dtype} activations)" if self.quantization != "none" else dtype


def resolve_precision(device: str | None, dtype: str | None, quantization: str | None) -> Precision:
    """Defaults: on CUDA an int8 LLM with fp16 activations and an fp16 ViT (the Space's design); fp32 on CPU."""
    try:
        resolved = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as err:
        raise InputError(f"unknown device {device!r} ({err})") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' was asked for, but PyTorch sees no CUDA GPU here")
    on_gpu = resolved.type == "cuda"
    quantization = quantization or ("int8" if on_gpu else "none")
    if quantization not in QUANTIZATIONS:
        raise InputError(f"unknown quantization {quantization!r}; choose one of: {', '.join(QUANTIZATIONS)}")
    dtype = dtype or ("float16" if on_gpu else "float32")
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    return Precision(resolved, DTYPES[dtype], quantization, half_precision_vit=on_gpu)


# ---------------------------------------------------------------- the tiny preset, materialised in real layouts

TINY_VERSION = "v1"


def tiny_llm_config(vocab_size: int, context_length: int = 2048):
    from transformers import GPTNeoXConfig

    # Shaped like rinna's GPT-NeoX (rotary on all dims, sequential residual, untied head, bos 2 / eos 3), but small.
    return GPTNeoXConfig(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
        max_position_embeddings=context_length, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                 "partial_rotary_factor": 1.0},
        use_parallel_residual=False, tie_word_embeddings=False, bos_token_id=2, eos_token_id=3, pad_token_id=0,
        hidden_dropout=0.0, attention_dropout=0.0,
    )


def write_tiny_model(folder: Path, seed: int = 0, context_length: int = 2048) -> Path:
    """Write a random, seeded model in the real layouts: an LLM folder like rinna's repo, and a converted-weights
    folder (encoder + projection) like `convert` writes. Same seed, same files."""
    from transformers import GPTNeoXForCausalLM

    llm_dir, weights_dir = folder / "llm", folder / "weights"
    tokenizer = SentencePieceTokenizer.from_pretrained(train_tokenizer(llm_dir))
    torch.manual_seed(seed)
    llm = GPTNeoXForCausalLM(tiny_llm_config(tokenizer.vocab_size, context_length))
    llm.save_pretrained(llm_dir)
    torch.manual_seed(seed + 1)
    encoder = VisionEncoder(tiny_vision_config(), tiny_qformer_config())
    nn.init.normal_(encoder.query_tokens, std=0.02)
    save_encoder(encoder, weights_dir)
    torch.manual_seed(seed + 2)
    projection = nn.Linear(encoder.output_size, llm.config.hidden_size)
    save_projection(projection.weight, projection.bias, weights_dir / PROJECTION_FILE,
                    {"llm": "tiny", "template": "bilingual", "note": "random"})
    write_converted_config(weights_dir, llm="tiny", template="bilingual")
    return folder


def tiny_model_dir(seed: int = 0, context_length: int = 2048) -> Path:
    """The cached tiny model, written once per (seed, context, torch version); safe with parallel test workers."""
    name = f"tiny-{TINY_VERSION}-seed{seed}-ctx{context_length}-torch{torch.__version__.split('+')[0]}"
    target = cache_dir() / name
    if (target / "weights" / CONVERTED_CONFIG).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
    try:
        write_tiny_model(scratch, seed, context_length)
        try:
            os.replace(scratch, target)
        except OSError:  # another process won the race
            pass
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


# ---------------------------------------------------------------- converted folders

def write_converted_config(folder: Path, llm: str, template: str, sources: dict | None = None) -> None:
    config = {"format": "minigpt4_ja", "version": 1, "llm": llm, "template": template, "sources": sources or {}}
    (Path(folder) / CONVERTED_CONFIG).write_text(json.dumps(config, indent=1, ensure_ascii=False), encoding="utf-8")


def read_converted_config(folder: Path) -> dict:
    path = folder / CONVERTED_CONFIG
    if not path.is_file():
        raise WeightsError(f"{folder} is not a converted MiniGPT-4 folder: {CONVERTED_CONFIG} is missing")
    return json.loads(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------- the three parts

def load_vision_encoder(options: ModelOptions, preset: Preset, weights_dir: Path | None) -> VisionEncoder:
    if options.eva_vit or options.qformer:
        if not (options.eva_vit and options.qformer):
            raise InputError("--eva-vit and --qformer go together: give both LAVIS files")
        return _converted_lavis_encoder(Path(options.eva_vit), Path(options.qformer))
    if weights_dir is not None:
        return load_encoder(weights_dir)
    if preset.eva_vit is None or preset.qformer is None:
        raise InputError(f"preset {preset.name} names no vision weights: pass --eva-vit and --qformer")
    return _converted_lavis_encoder(download_url(preset.eva_vit), download_url(preset.qformer))


def _converted_lavis_encoder(eva_vit: Path, qformer: Path) -> VisionEncoder:
    """LAVIS files are converted to safetensors once; later starts memory-map the converted file."""
    for path, what in ((eva_vit, "EVA ViT"), (qformer, "Q-Former")):
        if not path.is_file():
            raise WeightsError(f"{what} file {path} does not exist")
    converted = cache_dir() / "converted" / conversion_key(eva_vit, qformer)
    try:
        return load_encoder(converted)
    except WeightsError:
        pass
    encoder = load_lavis_encoder(eva_vit, qformer)
    try:
        save_encoder(encoder, converted)
    except OSError as err:
        warnings.warn(f"could not cache the converted encoder in {converted}: {err}")
    return encoder


def load_llm(source: str, precision: Precision):
    """GPT-NeoX via transformers (Hub id or folder) with bitsandbytes int8/nf4 when asked, plus rinna's tokenizer."""
    from transformers import BitsAndBytesConfig, GPTNeoXForCausalLM

    kwargs: dict = {"dtype": precision.llm_dtype}
    if precision.quantization == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    elif precision.quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=precision.llm_dtype)
    if precision.quantization != "none" or precision.device.type != "cpu":
        kwargs["device_map"] = {"": precision.device}
    tokenizer_dir = hub_snapshot(source, ["spiece.model", "tokenizer_config.json"])
    tokenizer = SentencePieceTokenizer.from_pretrained(tokenizer_dir)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
            llm = GPTNeoXForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError, RuntimeError, ImportError) as err:
        raise WeightsError(f"could not load the LLM {source!r} ({err})") from err
    return llm.eval().requires_grad_(False), tokenizer


def projection_source(options: ModelOptions, preset: Preset, weights_dir: Path | None) -> Path | None:
    if options.projection:
        return Path(options.projection)
    if weights_dir is not None and (weights_dir / PROJECTION_FILE).is_file():
        return weights_dir / PROJECTION_FILE
    if preset.projection is not None:
        return hub_file(preset.projection)
    return None


def missing_projection_message(preset: Preset) -> str:
    return (f"preset {preset.name} has no published projection (rinna released one only for "
            f"bilingual-gpt-neox-4b). Train one with `python -m minigpt4_ja train --preset {preset.name} "
            "--data ... --output-dir runs/x`, then pass --projection runs/x/projection.safetensors")


def build_projection(source: Path | None, in_features: int, out_features: int) -> nn.Linear:
    """The trained Linear from `source`, or a fresh one (zero bias) to be trained when there is none."""
    projection = nn.Linear(in_features, out_features)
    if source is None:
        nn.init.zeros_(projection.bias)
        return projection
    weights, _ = load_projection(source, in_features, out_features)
    projection.load_state_dict(weights)
    return projection


# ---------------------------------------------------------------- everything together

def load_pipeline(options: ModelOptions, require_projection: bool = True) -> Pipeline:
    preset = get_preset(options.preset)
    precision = resolve_precision(options.device, options.dtype, options.quantization)
    weights_dir, llm_source, template_name = None, options.llm or preset.llm, preset.template
    if options.weights:
        weights_dir = hub_snapshot(options.weights, ["*.json", "*.safetensors"])
        converted = read_converted_config(weights_dir)
        llm_source, template_name = options.llm or converted["llm"], converted.get("template", template_name)
    if preset.random_weights:
        tiny = tiny_model_dir()
        weights_dir = weights_dir or tiny / "weights"
        if llm_source == "tiny":
            llm_source = str(tiny / "llm")
    template = get_template(options.template or template_name)

    # The projection is looked up first: a preset without one fails before gigabytes are downloaded.
    source = projection_source(options, preset, weights_dir)
    if source is None and require_projection:
        raise WeightsError(missing_projection_message(preset))
    encoder = load_vision_encoder(options, preset, weights_dir)
    encoder.place(precision.device, precision.half_precision_vit)
    llm, tokenizer = load_llm(llm_source, precision)
    projection = build_projection(source, encoder.output_size, llm.config.hidden_size)
    projection = projection.to(precision.device).eval().requires_grad_(False)
    description = f"{preset.name}: LLM {llm_source}, {precision.label} on {precision.device}, template {template.name}"
    return Pipeline(encoder, projection, llm, tokenizer, template, description=description,
                    projection_source=str(source) if source else None)


def convert(options: ModelOptions, out: str | Path) -> Path:
    """Write the encoder and projection as one folder (push it to the Hub and load it with --weights)."""
    preset = get_preset(options.preset)
    out = Path(out)
    weights_dir = None
    llm_source = options.llm or preset.llm
    if preset.random_weights:
        weights_dir = tiny_model_dir() / "weights"
    if options.weights:
        weights_dir = hub_snapshot(options.weights, ["*.json", "*.safetensors"])
    encoder = load_vision_encoder(options, preset, weights_dir)
    save_encoder(encoder, out)
    source = projection_source(options, preset, weights_dir)
    if source is not None:
        weights, _ = load_projection(source, encoder.output_size, None)
        save_projection(weights["weight"], weights["bias"], out / PROJECTION_FILE,
                        {"llm": llm_source, "template": options.template or preset.template})
    sources = {"eva_vit": options.eva_vit or (preset.eva_vit and preset.eva_vit.url),
               "qformer": options.qformer or (preset.qformer and preset.qformer.url),
               "projection": str(source) if source else None}
    write_converted_config(out, llm=llm_source if not preset.random_weights or options.llm else "tiny",
                           template=options.template or preset.template, sources=sources)
    return out

