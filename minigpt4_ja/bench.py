"""`python -m minigpt4_ja bench`: how fast and how big each configuration is.

For each configuration (dtype / quantization / device) it measures:

* `startup_s`: loading the pipeline from local files (the cache, or the converted safetensors), once;
* `image_encode_s`: ViT + Q-Former + projection for one image (already decoded);
* `time_to_first_token_s`: one question about one (already encoded) image, until the first answer token;
* `decode_tokens_per_s`: tokens per second after the first, at batch 1;
* `peak_memory_mb`: CUDA peak allocated on a GPU, the process peak RSS on CPU;
* `multi_turn_speedup`: time to first token at turn 6 when the whole history is re-encoded (MiniGPT-4's way,
  `reuse_cache=False`) divided by the same with the KV cache kept between turns.

Every timed figure is the median of `--repeats` runs after `--warmup` runs; the JSON keeps each run and the spread
(min, max, quartiles), the machine, and the library versions. Each configuration runs in its own worker process
(unless `--in-process`), so peak memory is per configuration and two 4B models never share the RAM.

`--random-weights` builds the real architecture of a preset with random weights (nothing is downloaded), writes it
in the real layouts (rinna-style LLM folder, fp16 like rinna's checkpoint; a converted encoder folder), and loads it
through the normal loader, so int8/nf4 quantization and the cold start are the real ones.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import json
import logging
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import InputError

# ---------------------------------------------------------------- what is asked

QUESTION = "この画像について説明してください。"
# A plausible chat before the measured turn: short questions, MiniGPT-4-length answers. The first turn holds the image.
HISTORY = [
    ("この画像について説明してください。",
     "猫がソファの上で寝ています。写真には赤い車と青い空が写っています。コーヒーカップが木のテーブルに置かれています。"),
    ("猫はどんな体勢をしていますか？", "横になっています。猫がソファの上で寝ています。"),
    ("What can you see?", "a cat on a table with a laptop. A photo of a dog running on the beach."),
    ("写真には何色がありますか？", "赤 青 白 黒 緑 黄色。写真には赤い車と青い空が写っています。"),
    ("宇宙飛行士はいますか？", "いいえ。宇宙飛行士が宇宙服を着て、旗の前に立っています。An astronaut in a white space suit."),
    ("ロケットはありますか？", "ロケットが煙を上げながら打ち上げられています。A rocket launch."),
]
FOLLOW_UP = "{n}. 猫はどんな体勢をしていますか？"  # varies at its start, as a new question does

FIELDS = ("startup_s", "image_encode_s", "time_to_first_token_s", "decode_tokens_per_s", "peak_memory_mb",
          "multi_turn_speedup")
KNOWN_BANDWIDTHS_GB_S = {"NVIDIA T4": 320.0, "NVIDIA H200": 4800.0}

# rinna's GPT-NeoX configs (research notes, §3.1): only the vocabulary differs between the two presets.
RINNA_GPT_NEOX = dict(
    hidden_size=2816, num_hidden_layers=36, num_attention_heads=22, intermediate_size=11264,
    max_position_embeddings=2048, hidden_act="gelu", layer_norm_eps=1e-5, use_parallel_residual=False,
    tie_word_embeddings=False, bos_token_id=2, eos_token_id=3, pad_token_id=0,
)
RANDOM_LLM_ARCHITECTURES = {
    "bilingual-4b": dict(RINNA_GPT_NEOX, vocab_size=65536),
    "japanese-3.6b": dict(RINNA_GPT_NEOX, vocab_size=32000),
}


# ---------------------------------------------------------------- configurations

@dataclass(frozen=True)
class BenchConfig:
    name: str
    dtype: str | None
    quantization: str | None
    device: str | None


def parse_configs(text: str | None, dtype: str | None = None, quantization: str | None = None,
                  device: str | None = None) -> list[BenchConfig]:
    """`float32,bfloat16,int8,nf4+bfloat16,float16@cuda:1` -> configurations.

    An item is a dtype (no quantization) or a quantization (activations in `--dtype`, else the device default),
    optionally `+DTYPE` for a quantization's activations and `@DEVICE`. Without a list, one configuration is built
    from --dtype / --quantization / --device.
    """
    from .loading import DTYPES, QUANTIZATIONS

    if not text:
        name = quantization if quantization and quantization != "none" else (dtype or "default")
        if quantization and quantization != "none" and dtype:
            name += f"+{dtype}"
        return [BenchConfig(name, dtype, quantization, device)]
    configs = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        body, _, item_device = item.partition("@")
        head, _, extra_dtype = body.partition("+")
        if head in DTYPES and not extra_dtype:
            config = BenchConfig(item, head, "none", item_device or device)
        elif head in QUANTIZATIONS:
            if extra_dtype and extra_dtype not in DTYPES:
                raise InputError(f"unknown dtype {extra_dtype!r} in --configs item {item!r}; "
                                 f"choose one of: {', '.join(DTYPES)}")
            config = BenchConfig(item, extra_dtype or dtype, head, item_device or device)
        else:
            raise InputError(f"unknown --configs item {item!r}: use a dtype ({', '.join(DTYPES)}) or a quantization "
                             f"({', '.join(QUANTIZATIONS)}), optionally QUANT+DTYPE and @DEVICE")
        configs.append(config)
    if not configs:
        raise InputError("--configs is empty")
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise InputError(f"--configs names a configuration twice: {text}")
    return configs


# ---------------------------------------------------------------- statistics, machine

def summarize(values: list[float]) -> dict:
    """Median and spread of repeated measurements (NaNs, from runs that could not give the figure, are left out)."""
    runs = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not runs:
        return {"median": None, "min": None, "max": None, "q1": None, "q3": None, "runs": []}
    if len(runs) >= 2:
        q1, _, q3 = statistics.quantiles(runs, n=4, method="inclusive")
    else:
        q1 = q3 = runs[0]
    return {"median": statistics.median(runs), "min": min(runs), "max": max(runs), "q1": q1, "q3": q3, "runs": runs}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError):
        pass
    return None


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> dict:
    gpus = []
    if torch.cuda.is_available():
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu": cpu_model(), "cpu_cores": os.cpu_count(), "usable_cores": usable,
        "torch_threads": torch.get_num_threads(), "memory_gb": _memory_gb(), "gpu": gpus or None,
        "cuda": torch.version.cuda, "platform": platform.platform(), "python": platform.python_version(),
    }


def versions() -> dict:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "bitsandbytes": package_version("bitsandbytes")}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated by PyTorch on `device`. CPU: the process's peak resident set (ru_maxrss, KiB on Linux)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # macOS reports bytes


# ---------------------------------------------------------------- the bandwidth bound

def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a weight occupies, quantization state included (bitsandbytes' int8 row scales, nf4 absmax and code)."""
    total = tensor.numel() * tensor.element_size()
    scales = getattr(tensor, "SCB", None)
    if isinstance(scales, torch.Tensor):
        total += scales.numel() * scales.element_size()
    state = getattr(tensor, "quant_state", None)
    while state is not None:
        for name in ("absmax", "code"):
            part = getattr(state, name, None)
            if isinstance(part, torch.Tensor):
                total += part.numel() * part.element_size()
        state = getattr(state, "state2", None)
    return total


def llm_weight_bytes(llm: nn.Module) -> dict:
    """All the LLM's weight bytes, and the bytes one decode step reads: every weight except the input embedding
    table, of which only one row per token is read. (The KV cache read, small at these lengths, is not counted.)"""
    total = sum(tensor_bytes(p) for p in llm.parameters())
    embedding = llm.get_input_embeddings().weight
    per_token = total - tensor_bytes(embedding) + embedding.shape[1] * embedding.element_size()
    return {"llm_weight_bytes": total, "bytes_per_token": per_token}


def bandwidth_bound(bandwidth_gb_s: float, bytes_per_token: int) -> float:
    """Decode at batch 1 reads every weight once per token: tokens/s can be at most bandwidth / bytes per token."""
    if bytes_per_token <= 0:
        raise ValueError("bytes_per_token must be positive")
    return bandwidth_gb_s * 1e9 / bytes_per_token


def measure_bandwidth(device: torch.device | str, size_mb: int = 1024, repeats: int = 10) -> dict:
    """Copy bandwidth of `device` in GB/s (1e9 bytes): copy a `size_mb` MiB tensor into another already allocated
    (a clone without the allocation), counting the bytes read and the bytes written, as STREAM's copy does. Like
    STREAM, the figure is the best run (it bounds what decoding can reach); the spread is kept."""
    device = torch.device(device)
    source = torch.empty(size_mb * 2**20 // 4, dtype=torch.float32, device=device).fill_(1.0)
    target = torch.empty_like(source).fill_(0.0)  # touched once, so no run pays for page faults
    moved = 2 * source.numel() * source.element_size()
    speeds = []
    for i in range(repeats + 1):  # the first is a warm-up
        _sync(device)
        start = time.perf_counter()
        target.copy_(source)
        _sync(device)
        elapsed = time.perf_counter() - start
        if i:
            speeds.append(moved / elapsed / 1e9)
    del source, target
    if device.type == "cuda":
        torch.cuda.empty_cache()
    summary = summarize(speeds)
    return {"device": str(device), "buffer_mb": size_mb, "copy_gb_s": summary["max"], "spread": summary}


# ---------------------------------------------------------------- random weights of the real architecture

def random_llm_config(preset: str, tokenizer_vocab: int | None = None, **overrides):
    """The GPT-NeoX config of `preset` (rinna's real shapes, or the tiny preset's, whose vocabulary is its
    tokenizer's), with optional overrides of any field."""
    from transformers import GPTNeoXConfig

    from .loading import tiny_llm_config

    if preset == "tiny":
        config = tiny_llm_config(tokenizer_vocab or 512)
        for key, value in overrides.items():
            setattr(config, key, value)
        return config
    if preset not in RANDOM_LLM_ARCHITECTURES:
        raise InputError(f"--random-weights knows no architecture for preset {preset!r}; "
                         f"choose one of: {', '.join([*RANDOM_LLM_ARCHITECTURES, 'tiny'])}")
    values = dict(RANDOM_LLM_ARCHITECTURES[preset])
    values.update(overrides)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0}  # rotary_pct 1.0
    return GPTNeoXConfig(rope_parameters=rope, hidden_dropout=0.0, attention_dropout=0.0, **values)


def random_encoder_config(preset: str) -> dict:
    from .vision import NUM_QUERY_TOKENS, qformer_config, tiny_qformer_config, tiny_vision_config, vit_g_config

    if preset == "tiny":
        vision, qformer = tiny_vision_config(), tiny_qformer_config()
    else:
        vision, qformer = vit_g_config(), qformer_config()
    return {"vision_config": vision.to_dict(), "qformer_config": qformer.to_dict(),
            "num_query_tokens": NUM_QUERY_TOKENS}


@torch.no_grad()
def fill_random_(module: nn.Module, seed: int = 0, scale: float = 0.02, chunk: int = 1 << 22) -> nn.Module:
    """Cheap random weights: LayerNorms 1/0, everything else small uniform noise copied in chunks from one seeded
    pool (generating fresh random numbers for 4B weights takes minutes on a small CPU; copying takes seconds)."""
    generator = torch.Generator().manual_seed(seed)
    pool = (torch.rand(chunk + 4099, generator=generator) * 2 - 1) * scale
    norms = {id(t) for m in module.modules() if isinstance(m, nn.LayerNorm)
             for t in (m.weight, m.bias) if t is not None}
    count = 0
    for name, tensor in module.named_parameters():
        if id(tensor) in norms:
            tensor.fill_(1.0 if name.endswith("weight") else 0.0)
            continue
        flat = tensor.view(-1)
        for start in range(0, flat.numel(), chunk):
            piece = flat[start:start + chunk]
            offset = (count * 2654435761) % 4099
            piece.copy_(pool[offset:offset + piece.numel()])
            count += 1
    return module


@torch.no_grad()
def _reset_rotary_buffers(llm: nn.Module, device) -> None:
    """`to_empty` leaves the non-persistent rotary frequency buffers uninitialised: compute them again."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for module in llm.modules():
        if hasattr(module, "inv_freq") and hasattr(module, "rope_type") and hasattr(module, "config"):
            init = (module.compute_default_rope_parameters if module.rope_type == "default"
                    else ROPE_INIT_FUNCTIONS[module.rope_type])
            inv_freq, _ = init(module.config, device)
            module.inv_freq = inv_freq.to(device)
            if hasattr(module, "original_inv_freq"):
                module.original_inv_freq = inv_freq.clone().to(device)


def build_random_llm(config, dtype: torch.dtype = torch.float16, device: str | torch.device = "cpu", seed: int = 0):
    """GPT-NeoX of `config` with random weights: built on the meta device, materialised with `to_empty`, filled."""
    from transformers import GPTNeoXForCausalLM

    with torch.device("meta"):
        llm = GPTNeoXForCausalLM(config)
    llm = llm.to(dtype=dtype).to_empty(device=device)
    fill_random_(llm, seed=seed)
    _reset_rotary_buffers(llm, device)
    llm.config.dtype = dtype
    return llm.eval().requires_grad_(False)


def build_random_encoder(config: dict, device: str | torch.device = "cpu", seed: int = 1):
    """ViT + Q-Former (real ViT-g/14 + BERT-base Q-Former unless `config` says otherwise), random, in fp32."""
    from .vision import build_vision_encoder

    encoder = build_vision_encoder(config).to_empty(device=device)
    return fill_random_(encoder, seed=seed).eval().requires_grad_(False)


RANDOM_MARKER = "bench_random.json"


def write_random_model(preset: str, folder: str | Path, seed: int = 0, llm_overrides: dict | None = None,
                       log=lambda message: None) -> dict:
    """Write a random model of `preset`'s architecture in the real layouts: `llm/` like rinna's repo (fp16
    safetensors, spiece.model, tokenizer_config.json) and `weights/` like `convert` writes. A folder already holding
    the same description is reused. Returns the description (paths, shapes, build time)."""
    from .loading import write_converted_config
    from .presets import get_preset
    from .tokenizer import SentencePieceTokenizer, train_tokenizer
    from .vision import save_encoder
    from .weights import PROJECTION_FILE, save_projection

    preset_info = get_preset(preset)
    folder = Path(folder)
    llm_dir, weights_dir = folder / "llm", folder / "weights"
    encoder_config = random_encoder_config(preset)
    wanted = {"preset": preset, "seed": seed, "llm_overrides": llm_overrides or {}, "format": 1,
              "vision_layers": encoder_config["vision_config"]["num_hidden_layers"]}
    marker = folder / RANDOM_MARKER
    if marker.is_file():
        existing = json.loads(marker.read_text(encoding="utf-8"))
        if existing.get("wanted") == wanted:
            log(f"reusing the random {preset} model in {folder}")
            return {**existing, "reused": True}
    started = time.perf_counter()
    tokenizer = SentencePieceTokenizer.from_pretrained(train_tokenizer(llm_dir))
    config = random_llm_config(preset, tokenizer_vocab=tokenizer.vocab_size, **(llm_overrides or {}))
    # A tokenizer much smaller than the real one: its ids are valid rows of the real-size embedding anyway.
    assert tokenizer.vocab_size <= config.vocab_size
    log(f"building a random {preset} LLM ({config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"vocab {config.vocab_size}) in fp16")
    llm = build_random_llm(config, torch.float16, "cpu", seed)
    llm_parameters = sum(p.numel() for p in llm.parameters())
    llm.save_pretrained(llm_dir)
    hidden = config.hidden_size
    del llm
    log(f"building a random encoder ({encoder_config['vision_config']['num_hidden_layers']} ViT blocks + Q-Former)")
    encoder = build_random_encoder(encoder_config, "cpu", seed + 1)
    encoder_parameters = sum(p.numel() for p in encoder.parameters())
    save_encoder(encoder, weights_dir)
    output_size = encoder.output_size
    del encoder
    torch.manual_seed(seed + 2)
    projection = nn.Linear(output_size, hidden)
    save_projection(projection.weight, projection.bias, weights_dir / PROJECTION_FILE,
                    {"llm": preset, "template": preset_info.template, "note": "random (bench)"})
    write_converted_config(weights_dir, llm=str(llm_dir), template=preset_info.template)
    description = {
        "wanted": wanted, "folder": str(folder), "llm_dir": str(llm_dir), "weights_dir": str(weights_dir),
        "build_s": time.perf_counter() - started, "llm_parameters": llm_parameters,
        "encoder_parameters": encoder_parameters,
        "llm_config": {k: getattr(config, k) for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                                      "intermediate_size", "vocab_size", "max_position_embeddings",
                                                      "use_parallel_residual")},
        "tokenizer_vocab": tokenizer.vocab_size,
    }
    marker.write_text(json.dumps(description, indent=1), encoding="utf-8")
    return description


# ---------------------------------------------------------------- one configuration

@contextlib.contextmanager
def _generate_overrides(llm, **extra):
    """Add keyword arguments to the library's `llm.generate` calls for the duration (an instance attribute,
    removed afterwards). With a static cache, the session's DynamicCache is left out of the call."""
    original = llm.generate

    def generate(*args, **kwargs):
        kwargs.update(extra)
        if extra.get("cache_implementation"):
            kwargs.pop("past_key_values", None)
        return original(*args, **kwargs)

    llm.generate = generate
    try:
        yield
    finally:
        del llm.generate


def _timed_stream(stream) -> tuple[object, list[float]]:
    """Consume a ReplyStream, noting when each piece of text (one per new token) arrived."""
    stamps = []
    for _ in stream:
        stamps.append(time.perf_counter())
    return stream.reply, stamps


def _decode_rate(stamps: list[float]) -> float:
    """Tokens per second after the first: (n - 1) tokens in the time between the first and the last."""
    if len(stamps) < 2 or stamps[-1] <= stamps[0]:
        return float("nan")
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def bench_image(path: str | None):
    from PIL import Image

    from .images import load_image

    if path:
        return load_image(path)
    import numpy as np

    rng = np.random.default_rng(0)  # a photo-sized noise image: the encoder's cost does not depend on content
    return Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8), mode="RGB")


def measure_multi_turn(pipeline, embedding, reuse_cache: bool, turn: int, settings, repeats: int,
                       warmup: int) -> dict:
    """Time to first token at `turn`: the earlier turns (the image in the first) are given with their answers, a
    priming question fills the cache (in reuse mode) and warms up, then each run asks a new question and undoes it."""
    from .chat import Turn

    session = pipeline.chat(reuse_cache=reuse_cache)
    history = [HISTORY[i % len(HISTORY)] for i in range(turn - 1)]
    session.turns = [Turn(question=q, images=[embedding] if i == 0 else [], answer=a)
                     for i, (q, a) in enumerate(history)]
    times, last = [], None
    for i in range(max(1, warmup) + repeats):
        reply, _ = _timed_stream(session.stream(FOLLOW_UP.format(n=i + 1), settings))
        session.undo()
        if i >= max(1, warmup):
            times.append(reply.time_to_first_token_s if reply.time_to_first_token_s is not None else float("nan"))
            last = reply
    session.reset()
    return {"summary": summarize(times), "prompt_tokens": last.prompt_tokens if last else None,
            "reused_tokens": last.reused_tokens if last else None}


class FoldedTokenizer:
    """For random weights: the LLM has the real vocabulary (65,536 rows for rinna's 4B) but the tokenizer is a small
    one trained here, so sampled ids beyond its pieces are folded back into range when decoded. The model still
    computes and samples over every row, as the real one does."""

    def __init__(self, tokenizer, llm_vocab_size: int):
        self.tokenizer, self.llm_vocab_size = tokenizer, llm_vocab_size

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def decode(self, ids) -> str:
        size = self.tokenizer.vocab_size
        return self.tokenizer.decode([int(i) % size for i in ids])


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(fragment in str(record.msg) for fragment in self.fragments)


def _quiet_bitsandbytes() -> None:
    """bitsandbytes logs "MatMul8bitLt: inputs will be cast ..." on every int8 matmul with fp32 inputs."""
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropMessages) for f in logger.filters):
        logger.addFilter(_DropMessages("MatMul8bitLt"))


def run_config(spec: dict, log=None) -> dict:
    """Load one configuration and measure it. `spec`: model options and the measurement settings."""
    from .generation import GenerationSettings
    from .loading import ModelOptions, load_pipeline, resolve_precision

    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    name = spec["name"]
    _quiet_bitsandbytes()
    precision = resolve_precision(spec.get("device"), spec.get("dtype"), spec.get("quantization"))
    device = precision.device
    if device.type == "cuda":
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats(device)
    repeats, warmup, new_tokens = spec["repeats"], spec["warmup"], spec["new_tokens"]
    result: dict = {"name": name, "device": str(device), "dtype": str(precision.llm_dtype).replace("torch.", ""),
                    "quantization": precision.quantization, "precision": precision.label}

    options = ModelOptions(**{k: spec.get(k) for k in ("preset", "llm", "eva_vit", "qformer", "projection", "weights",
                                                       "template", "dtype", "quantization", "device")})
    log(f"[{name}] loading {options.preset} ({precision.label} on {device})")
    started = time.perf_counter()
    pipeline = load_pipeline(options, require_projection=False)
    _sync(device)
    result["startup_s"] = time.perf_counter() - started
    result["description"] = pipeline.description
    if pipeline.llm.config.vocab_size > pipeline.tokenizer.vocab_size:  # random weights: a small tokenizer
        pipeline.tokenizer = FoldedTokenizer(pipeline.tokenizer, pipeline.llm.config.vocab_size)
        result["tokenizer_note"] = (f"the tokenizer has {pipeline.tokenizer.vocab_size} pieces, the LLM "
                                    f"{pipeline.llm.config.vocab_size} rows: sampled ids are folded when decoded")
    result.update(llm_weight_bytes(pipeline.llm))
    log(f"[{name}] loaded in {result['startup_s']:.2f} s; LLM weights {result['llm_weight_bytes'] / 2**20:.0f} MiB")

    image = bench_image(spec.get("image"))
    spreads: dict = {}

    encode_times, embedding = [], None
    for i in range(warmup + repeats):
        _sync(device)
        started = time.perf_counter()
        embedding = pipeline.encode_image(image)
        _sync(device)
        if i >= warmup:
            encode_times.append(time.perf_counter() - started)
    spreads["image_encode_s"] = summarize(encode_times)
    log(f"[{name}] image encode {spreads['image_encode_s']['median']:.3f} s")

    settings = GenerationSettings(max_new_tokens=new_tokens, seed=spec.get("seed", 0))
    overrides: dict = {"min_new_tokens": new_tokens}  # the answer length is pinned, whatever random weights say
    compiled = False
    if spec.get("compile"):
        if device.type == "cuda":
            # A static cache: transformers then compiles the decode step with torch.compile (generate's auto-compile).
            overrides["cache_implementation"] = "static"
            warmup = max(warmup, 1)  # the first run compiles
            quantizer = getattr(pipeline.llm, "hf_quantizer", None)
            compiled = quantizer is None or bool(getattr(quantizer, "is_compileable", False))
            if not compiled:
                result["compile_note"] = f"static cache; {precision.quantization} weights are not compilable"
        else:
            result["compile_note"] = f"--compile needs CUDA; {device.type} ran the default dynamic-cache path"
    result["compiled"] = compiled
    ttfts, rates, counts, prompt_tokens = [], [], [], None
    with _generate_overrides(pipeline.llm, **overrides):
        for i in range(warmup + repeats):
            session = pipeline.chat(reuse_cache=False)
            session.add_image(embedding)
            reply, stamps = _timed_stream(session.stream(QUESTION, settings))
            session.reset()
            if i >= warmup:
                ttfts.append(reply.time_to_first_token_s if reply.time_to_first_token_s is not None else float("nan"))
                rates.append(_decode_rate(stamps))
                counts.append(len(reply.token_ids))
                prompt_tokens = reply.prompt_tokens
    spreads["time_to_first_token_s"] = summarize(ttfts)
    spreads["decode_tokens_per_s"] = summarize(rates)
    result["question_prompt_tokens"] = prompt_tokens
    result["new_tokens"] = counts
    log(f"[{name}] TTFT {spreads['time_to_first_token_s']['median']:.3f} s, "
        f"decode {spreads['decode_tokens_per_s']['median'] or float('nan'):.2f} tokens/s")

    turn = spec.get("turn", 6)
    short = GenerationSettings(max_new_tokens=1, seed=spec.get("seed", 0))  # only the first token is timed
    multi = {}
    for label, reuse in (("reencode", False), ("reuse", True)):
        measured = measure_multi_turn(pipeline, embedding, reuse, turn, short, repeats, warmup)
        spreads[f"turn{turn}_ttft_{label}_s"] = measured["summary"]
        multi[label] = measured
    reencode = spreads[f"turn{turn}_ttft_reencode_s"]["median"]
    reuse_ttft = spreads[f"turn{turn}_ttft_reuse_s"]["median"]
    result["multi_turn"] = {
        "turn": turn, "ttft_reencode_s": reencode, "ttft_reuse_s": reuse_ttft,
        "prompt_tokens": multi["reencode"]["prompt_tokens"], "reused_tokens": multi["reuse"]["reused_tokens"],
    }
    result["multi_turn_speedup"] = reencode / reuse_ttft if reencode and reuse_ttft else None
    log(f"[{name}] turn {turn} TTFT re-encode {reencode:.3f} s, reuse {reuse_ttft:.3f} s")

    for key, summary in spreads.items():
        result[key] = summary["median"]
    result["spread"] = spreads
    result["peak_memory_mb"] = peak_memory_mb(device)
    result["peak_memory_kind"] = ("torch.cuda.max_memory_allocated" if device.type == "cuda"
                                  else "process peak RSS (ru_maxrss)")
    del pipeline, embedding
    return result


def _add_bound(result: dict, bandwidth: dict | None) -> None:
    if not bandwidth or "bytes_per_token" not in result or result.get("error"):
        return
    measured = bandwidth.get(result["device"])
    if not measured or not measured.get("copy_gb_s"):
        return
    bound = bandwidth_bound(measured["copy_gb_s"], result["bytes_per_token"])
    result["bandwidth_gb_s"] = measured["copy_gb_s"]
    result["bound_tokens_per_s"] = bound
    decode = result.get("decode_tokens_per_s")
    result["fraction_of_bound"] = decode / bound if decode else None


# ---------------------------------------------------------------- isolation: one worker process per configuration

def run_task(spec: dict) -> dict:
    """One unit of work: measure a configuration, measure copy bandwidth, or write the random model."""
    task = spec.get("task", "config")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # the log stays readable; the figures say how long things took
    if task == "bandwidth":
        return measure_bandwidth(spec["device"])
    if task == "random_model":
        log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
        return write_random_model(spec["preset"], spec["folder"], seed=spec.get("seed", 0), log=log)
    return run_config(spec)


def worker_main(spec_path: str, out_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    try:
        result = run_task(spec)
    except BaseException as err:  # reported to the parent (for a configuration: as its row)
        traceback.print_exc()
        result = {"name": spec.get("name"), "error": f"{type(err).__name__}: {err}"}
    Path(out_path).write_text(json.dumps(result), encoding="utf-8")
    return 0


def run_isolated(spec: dict) -> dict:
    """Run `run_task(spec)` in a fresh Python process; its log goes to our stderr.

    Everything big (the random model, the bandwidth buffers, each configuration) runs in such a worker, so this
    process stays small: on Linux a child's ru_maxrss starts from its parent's peak RSS (it survives fork and exec),
    and a big parent would inflate every worker's `peak_memory_mb`."""
    package_parent = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = package_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    code = "import sys; from minigpt4_ja.bench import worker_main; sys.exit(worker_main(sys.argv[1], sys.argv[2]))"
    with tempfile.TemporaryDirectory(prefix="minigpt4-bench-") as scratch:
        spec_path, out_path = Path(scratch) / "spec.json", Path(scratch) / "result.json"
        spec_path.write_text(json.dumps(spec), encoding="utf-8")
        process = subprocess.Popen([sys.executable, "-c", code, str(spec_path), str(out_path)], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
        for line in process.stdout:
            if "gemm_4bit_forward from kernels-community" not in line:  # bitsandbytes' import-time note
                sys.stderr.write(line)
        returncode = process.wait()
        if out_path.is_file():
            return json.loads(out_path.read_text(encoding="utf-8"))
    why = " (killed: out of memory?)" if returncode in (-9, 137) else ""
    return {"name": spec.get("name"), "error": f"the worker process exited with status {returncode}{why}"}


# ---------------------------------------------------------------- output

def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    value = float(value)
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.{digits}g}" if value else "0"


def _with_range(result: dict, key: str) -> str:
    spread = result.get("spread", {}).get(key)
    text = _fmt(result.get(key))
    if spread and spread.get("min") is not None and len(spread.get("runs", [])) > 1:
        text += f" ({_fmt(spread['min'])}–{_fmt(spread['max'])})"
    return text


def markdown_table(report: dict) -> str:
    results = report["results"]
    turn = report["settings"]["turn"]
    bound = any("bound_tokens_per_s" in r for r in results)
    head = ["config", "startup s", "image encode s", "TTFT s", "decode tok/s", f"turn-{turn} TTFT re-encode s",
            f"turn-{turn} TTFT reuse s", "multi-turn speedup", "peak MB"]
    if bound:
        head += ["bound tok/s", "% of bound"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if r.get("error"):
            lines.append(f"| {r['name']} | failed: {r['error'][:120]} |" + " |" * (len(head) - 2))
            continue
        label = r["name"] if r["name"] == r["precision"] else f"{r['name']} = {r['precision']}"
        cells = [f"{label} on {r['device']}", _fmt(r["startup_s"]), _with_range(r, "image_encode_s"),
                 _with_range(r, "time_to_first_token_s"), _with_range(r, "decode_tokens_per_s"),
                 _with_range(r, f"turn{turn}_ttft_reencode_s"), _with_range(r, f"turn{turn}_ttft_reuse_s"),
                 _fmt(r.get("multi_turn_speedup")) + "×", _fmt(r["peak_memory_mb"])]
        if bound:
            fraction = r.get("fraction_of_bound")
            cells += [_fmt(r.get("bound_tokens_per_s")), _fmt(100 * fraction) if fraction else "n/a"]
        lines.append("| " + " | ".join(cells) + " |")
    machine, lib = report["machine"], report["versions"]
    settings = report["settings"]
    notes = [
        f"Machine: {machine['cpu']}, {machine['cpu_cores']} cores ({machine['usable_cores']} usable), "
        f"{machine['memory_gb']} GB RAM, GPU: {', '.join(machine['gpu']) if machine['gpu'] else 'none'}; "
        f"torch {lib['torch']}, transformers {lib['transformers']}, bitsandbytes {lib['bitsandbytes']}.",
        f"Median of {settings['repeats']} runs after {settings['warmup']} warm-up (min–max in brackets); "
        f"{settings['new_tokens']} new tokens per answer; startup is one cold load; "
        f"model: {settings['model']}.",
    ]
    if report.get("bandwidth"):
        notes.append("Copy bandwidth: " + ", ".join(f"{d} {_fmt(b['copy_gb_s'])} GB/s"
                                                      for d, b in report["bandwidth"].items()) + ".")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


# ---------------------------------------------------------------- command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .cli import add_model_options

    add_model_options(parser)
    group = parser.add_argument_group("benchmark options")
    group.add_argument("--configs", metavar="LIST",
                       help="comma-separated configurations to compare, e.g. float32,bfloat16,float16,int8,nf4 "
                            "(QUANT+DTYPE sets a quantization's activations, @DEVICE a device); default: one, from "
                            "--dtype/--quantization/--device")
    group.add_argument("--repeats", type=int, default=5, help="measured runs per figure; the median is reported")
    group.add_argument("--warmup", type=int, default=1, help="unmeasured runs before the measured ones")
    group.add_argument("--new-tokens", type=int, default=32, help="answer length for the decode measurement")
    group.add_argument("--turn", type=int, default=6, help="the chat turn whose time to first token is compared")
    group.add_argument("--image", help="image to encode (default: a generated 640x480 image)")
    group.add_argument("--seed", type=int, default=0, help="sampling seed")
    group.add_argument("--json", metavar="FILE", help="write every figure, run and spread to this JSON file")
    group.add_argument("--random-weights", action="store_true",
                       help="build the preset's real architecture with random weights (nothing is downloaded)")
    group.add_argument("--random-dir", metavar="DIR",
                       help="keep the random model here and reuse it next time (default: a temporary folder)")
    group.add_argument("--bandwidth-limit", action="store_true",
                       help="measure copy bandwidth and report decode speed against bandwidth / weight bytes")
    group.add_argument("--compile", action="store_true",
                       help="CUDA only: decode with a static KV cache, compiled by torch.compile")
    group.add_argument("--in-process", action="store_true",
                       help="measure every configuration in this process (faster to start; peak RSS is then shared)")


def _check_args(args) -> None:
    for name, low in (("repeats", 1), ("warmup", 0), ("new_tokens", 2), ("turn", 2)):
        if getattr(args, name) < low:
            raise InputError(f"--{name.replace('_', '-')} must be at least {low}")
    if args.random_weights and any(getattr(args, k, None) for k in ("llm", "eva_vit", "qformer", "projection",
                                                                     "weights")):
        raise InputError("--random-weights builds every part itself: leave out --llm/--eva-vit/--qformer/"
                         "--projection/--weights")
    if args.image and not Path(args.image).is_file():
        raise InputError(f"image file {args.image} does not exist")


def _run(spec: dict, in_process: bool) -> dict:
    if not in_process:
        return run_isolated(spec)
    try:
        return run_task(spec)
    except Exception as err:  # one failed configuration is a row, not the end of the comparison
        traceback.print_exc()
        return {"name": spec.get("name"), "error": f"{type(err).__name__}: {err}"}


def main(args) -> int:
    from .loading import resolve_precision

    _check_args(args)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    configs = parse_configs(args.configs, args.dtype, args.quantization, args.device)
    devices = {}
    for config in configs:  # fail early on a device that is not there
        precision = resolve_precision(config.device, config.dtype, config.quantization)
        devices[config.name] = precision.device
        if not args.configs:  # the one configuration is named by what it resolved to
            configs = [BenchConfig(precision.label, config.dtype, config.quantization, config.device)]
            devices = {precision.label: precision.device}
    report: dict = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": None, "versions": versions(),
        "settings": {"preset": args.preset, "repeats": args.repeats, "warmup": args.warmup,
                     "new_tokens": args.new_tokens, "turn": args.turn, "image": args.image or "generated 640x480",
                     "seed": args.seed, "random_weights": args.random_weights, "compile": args.compile,
                     "isolation": "in-process" if args.in_process else "one worker process per configuration",
                     "model": f"{args.preset} (random weights)" if args.random_weights else args.preset},
        "random_model": None, "bandwidth": None, "results": [],
    }
    model_options = {k: getattr(args, k, None) for k in ("preset", "llm", "eva_vit", "qformer", "projection",
                                                         "weights", "template")}
    scratch = None
    try:
        if args.random_weights:
            folder = args.random_dir or (scratch := tempfile.mkdtemp(prefix="minigpt4-bench-random-"))
            described = _run({"task": "random_model", "preset": args.preset, "folder": str(folder),
                              "seed": args.seed}, args.in_process)
            if described.get("error"):
                raise RuntimeError(f"could not build the random {args.preset} model: {described['error']}")
            if not described.get("reused"):
                log(f"random {args.preset} model written in {described['build_s']:.1f} s ({folder})")
            report["random_model"] = described
            model_options.update(llm=described["llm_dir"], weights=described["weights_dir"])
        if args.bandwidth_limit:
            report["bandwidth"] = {}
            for device in dict.fromkeys(str(d) for d in devices.values()):
                log(f"measuring copy bandwidth on {device}")
                measured = _run({"task": "bandwidth", "device": device}, args.in_process)
                if measured.get("error"):
                    log(f"could not measure the bandwidth of {device}: {measured['error']}")
                    continue
                report["bandwidth"][device] = measured
                log(f"copy bandwidth on {device}: {measured['copy_gb_s']:.1f} GB/s")
        for config in configs:
            spec = {**model_options, "task": "config", "name": config.name, "dtype": config.dtype,
                    "quantization": config.quantization, "device": config.device, "repeats": args.repeats,
                    "warmup": args.warmup, "new_tokens": args.new_tokens, "turn": args.turn, "image": args.image,
                    "seed": args.seed, "compile": args.compile}
            result = _run(spec, args.in_process)
            if args.in_process:
                gc.collect()  # the configuration's pipeline goes before the next one loads
                if devices[config.name].type == "cuda":
                    torch.cuda.empty_cache()
                elif "peak_memory_mb" in result:
                    result["peak_memory_kind"] += ", shared with everything this process ran before (--in-process)"
            _add_bound(result, report["bandwidth"])
            report["results"].append(result)
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    report["machine"] = machine_info()  # last: naming the GPU starts CUDA here, which workers must not inherit
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
        log(f"wrote {args.json}")
    print(markdown_table(report))
    return 1 if any(r.get("error") for r in report["results"]) else 0
