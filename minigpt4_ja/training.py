"""`python -m minigpt4_ja train`: train the projection, the one Linear between the Q-Former and the LLM.

The ViT, Q-Former and LLM stay frozen (the LLM may be int8 with `--quantization int8`). Each example becomes
`[prompt before image][32 image embeddings][prompt after image][answer + EOS]`, rendered with the preset's template
exactly as `ask`/`chat` render it at inference; only answer tokens (and the EOS after each answer) carry a loss.

Because the encoder is frozen, each image's 32x768 queries are computed once and kept in safetensors shards keyed by
the image file's sha256 (under the output folder, or `--feature-cache DIR`): later epochs and later runs skip the ViT.

Scaling out is 🤗 Accelerate's job: `accelerate launch -m minigpt4_ja train ...` runs data-parallel with mixed precision
and gradient accumulation; a plain `python -m minigpt4_ja train` is one process (CPU or one GPU).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
import uuid
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from .data import DEFAULT_IMAGE_PATTERN, FORMATS, DataReport, Example, load_dataset
from .errors import InputError
from .images import load_image, preprocess
from .templates import IMAGE_MARKER

IGNORE_INDEX = -100
WARMUP_START_LR = 1e-6  # MiniGPT-4's warmup_lr

# MiniGPT-4's two stages (train_configs/minigpt4_stage{1_pretrain,2_finetune}.yaml); batch size is per process.
STAGES = {
    1: {"learning_rate": 1e-4, "min_learning_rate": 8e-5, "warmup_steps": 5000, "batch_size": 64,
        "max_text_tokens": 64},
    2: {"learning_rate": 3e-5, "min_learning_rate": 1e-5, "warmup_steps": 200, "batch_size": 12,
        "max_text_tokens": 160},
}
LOG_FILE = "train_log.jsonl"
SUMMARY_FILE = "projection.json"
CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "training_state.pt"


# ---------------------------------------------------------------- one example as token ids and labels

class Sequence:
    """Token ids split at the images (len(segments) == images + 1) and a label per token position.

    A label is the token the model should predict *at* that position (transformers shifts labels by one itself), or
    IGNORE_INDEX. Image slots (num_query_tokens each) are always ignored. Stored as flat int32 arrays: a million
    examples take megabytes, not gigabytes of Python ints.
    """

    __slots__ = ("ids", "targets", "lengths", "num_query_tokens")

    def __init__(self, segments: list[list[int]], labels: list[list[int]], num_query_tokens: int = 32):
        self.ids = array("i", [token for segment in segments for token in segment])
        self.targets = array("i", [label for segment in labels for label in segment])
        self.lengths = tuple(len(segment) for segment in segments)
        self.num_query_tokens = num_query_tokens

    def _split(self, flat: array) -> list[list[int]]:
        out, start = [], 0
        for length in self.lengths:
            out.append(flat[start:start + length].tolist())
            start += length
        return out

    @property
    def segments(self) -> list[list[int]]:
        return self._split(self.ids)

    @property
    def labels(self) -> list[list[int]]:
        return self._split(self.targets)

    @property
    def num_images(self) -> int:
        return len(self.lengths) - 1

    def __len__(self) -> int:
        return len(self.ids) + self.num_images * self.num_query_tokens

    def flat_labels(self) -> list[int]:
        out: list[int] = []
        for index, labels in enumerate(self.labels):
            out.extend(labels)
            if index < self.num_images:
                out.extend([IGNORE_INDEX] * self.num_query_tokens)
        return out


def build_sequence(example: Example, tokenizer, template, max_text_tokens: int | None = None,
                   context_length: int | None = None, num_query_tokens: int = 32) -> Sequence:
    """Render an example the way `chat` renders a conversation and mark what is learnt.

    Turn i's prompt is `template.render([template.user_utterance(question, images)])` (after a separator for i > 0),
    e.g. `ユーザー: <Img><ImageHere></Img>\\nシステム: `, all ignored. Its answer tokens are supervised, then EOS: after
    the last answer EOS is appended; after an earlier answer the position where the next prompt starts is labelled
    EOS instead, so the context holds exactly the text `chat` feeds back at inference (no EOS inside the history)
    while the model still learns to stop after every answer. An answer longer than `max_text_tokens` is cut and gets
    no EOS. Raises ValueError (the reason) when nothing learnable fits in `context_length`.
    """
    image_slot = object()
    ids: list = []
    labels: list[int] = []
    eos = tokenizer.eos_token_id
    eos_next = False
    if sum(turn.num_images for turn in example.turns) != len(example.images):
        raise ValueError("the turns show a different number of images than the example has")
    for index, turn in enumerate(example.turns):
        prompt = template.render([template.user_utterance(turn.question, turn.num_images)])
        if index:
            prompt = template.separator + prompt
        start = len(ids)
        for part_index, part in enumerate(prompt.split(IMAGE_MARKER)):
            if part_index:
                ids.append(image_slot)
                labels.append(IGNORE_INDEX)
            tokens = tokenizer.encode(part)
            ids.extend(tokens)
            labels.extend([IGNORE_INDEX] * len(tokens))
        if eos_next and start < len(ids) and ids[start] is not image_slot:
            labels[start] = eos
        answer = tokenizer.encode(template.encode_text(turn.answer))
        truncated = max_text_tokens is not None and len(answer) > max_text_tokens
        if truncated:
            answer = answer[:max_text_tokens]
        ids.extend(answer)
        labels.extend(answer)
        last = index == len(example.turns) - 1
        if last and not truncated:
            ids.append(eos)
            labels.append(eos)
        eos_next = not last and not truncated

    if context_length is not None:
        length, keep = 0, 0
        for item in ids:
            size = num_query_tokens if item is image_slot else 1
            if length + size > context_length:
                break
            length += size
            keep += 1
        if keep < len(ids):
            if any(item is image_slot for item in ids[keep:]):
                raise ValueError(f"longer than the model's {context_length}-token context")
            ids, labels = ids[:keep], labels[:keep]
    if all(label == IGNORE_INDEX for label in labels):
        raise ValueError("nothing to learn (no answer tokens fit)")

    segments, segment_labels = [[]], [[]]
    for item, label in zip(ids, labels):
        if item is image_slot:
            segments.append([])
            segment_labels.append([])
        else:
            segments[-1].append(item)
            segment_labels[-1].append(label)
    return Sequence(segments, segment_labels, num_query_tokens)


def assemble_batch(sequences: list[Sequence], image_embeds: list[list[torch.Tensor]], embedding: nn.Embedding,
                   pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate each example's token embeddings and projected images, then right-pad.

    Returns inputs_embeds (B, L, hidden), attention_mask (B, L) and labels (B, L) with IGNORE_INDEX on padding.
    Token embeddings come from the frozen LLM without gradient; the image embeddings keep theirs.
    """
    weight = embedding.weight
    all_ids = [token for seq in sequences for token in seq.ids] + [pad_token_id]
    with torch.no_grad():
        table = embedding(torch.tensor(all_ids, dtype=torch.long, device=weight.device))
    pad = table[-1]
    rows, offset = [], 0
    for seq, images in zip(sequences, image_embeds):
        if len(images) != seq.num_images:
            raise ValueError(f"{len(images)} image embeddings for a sequence with {seq.num_images} images")
        pieces = []
        for index, segment in enumerate(seq.segments):
            pieces.append(table[offset:offset + len(segment)])
            offset += len(segment)
            if index < seq.num_images:
                pieces.append(images[index].to(weight.dtype))
        rows.append(torch.cat(pieces))
    width = max(len(row) for row in rows)
    embeds = torch.stack([torch.cat([row, pad.expand(width - len(row), -1)]) for row in rows])
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=weight.device)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long, device=weight.device)
    for index, (row, seq) in enumerate(zip(rows, sequences)):
        mask[index, :len(row)] = 1
        labels[index, :len(row)] = torch.tensor(seq.flat_labels(), dtype=torch.long)
    return embeds, mask, labels


# ---------------------------------------------------------------- feature cache

def encoder_fingerprint(encoder) -> str:
    """Identifies the frozen encoder (config, precision and a strided sample of every weight), so a shared cache
    never serves queries computed by another encoder."""
    digest = hashlib.sha256(json.dumps(encoder.config_dict, sort_keys=True, default=str).encode())
    digest.update(str(getattr(encoder, "autocast_dtype", None)).encode())
    with torch.no_grad():
        for name, tensor in list(encoder.named_parameters()) + list(encoder.named_buffers()):
            flat = tensor.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 64)].float().cpu()
            digest.update(name.encode())
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


class FeatureCache:
    """Q-Former queries (32x768) by image sha256, in safetensors shards under `folder`.

    New features wait in memory and are written as a new shard every `shard_size` images (and on `flush`); shard
    names carry the process rank, so data-parallel processes never write the same file. `refresh` picks up shards
    written by other processes (done at each epoch's end).
    """

    def __init__(self, folder: Path, dtype: torch.dtype = torch.float16, shard_size: int = 1024, rank: int = 0):
        self.folder, self.dtype, self.shard_size, self.rank = Path(folder), dtype, shard_size, rank
        self.folder.mkdir(parents=True, exist_ok=True)
        self.index: dict[str, str] = {}
        self.pending: dict[str, torch.Tensor] = {}
        self._handles: dict[str, object] = {}
        self._shards: set[str] = set()
        self.refresh()

    def __getstate__(self):  # DataLoader workers read shards; they neither write nor share open files
        state = dict(self.__dict__)
        state["pending"], state["_handles"] = {}, {}
        return state

    def __len__(self) -> int:
        return len(self.index) + len(self.pending)

    def __contains__(self, key: str) -> bool:
        return key in self.pending or key in self.index

    def refresh(self) -> None:
        from safetensors import safe_open

        for shard in sorted(self.folder.glob("shard-*.safetensors")):
            if str(shard) in self._shards:
                continue
            try:
                with safe_open(str(shard), "pt") as f:
                    for key in f.keys():
                        self.index.setdefault(key, str(shard))
                self._shards.add(str(shard))
            except Exception as err:  # a damaged shard only costs recomputation
                print(f"warning: ignoring unreadable feature shard {shard} ({err})", file=sys.stderr)

    def get(self, key: str) -> torch.Tensor | None:
        if key in self.pending:
            return self.pending[key].clone()
        shard = self.index.get(key)
        if shard is None:
            return None
        from safetensors import safe_open

        handle = self._handles.get(shard)
        if handle is None:
            if len(self._handles) >= 32:
                self._handles.pop(next(iter(self._handles)))
            handle = self._handles[shard] = safe_open(shard, "pt")
        return handle.get_tensor(key)

    def put(self, key: str, queries: torch.Tensor) -> None:
        if key not in self:
            self.pending[key] = queries.detach().to("cpu", self.dtype).contiguous()
            if len(self.pending) >= self.shard_size:
                self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        from safetensors.torch import save_file

        name = f"shard-{time.time_ns():x}-r{self.rank}-{uuid.uuid4().hex[:8]}.safetensors"
        scratch = self.folder / f".{name}.tmp"
        save_file(self.pending, str(scratch), metadata={"format": "minigpt4_ja queries (32x768) by image sha256"})
        os.replace(scratch, self.folder / name)
        self._shards.add(str(self.folder / name))
        for key in self.pending:
            self.index[key] = str(self.folder / name)
        self.pending = {}


# ---------------------------------------------------------------- dataset, sampler, augmentation

def random_resized_crop(image, generator: torch.Generator, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)):
    """MiniGPT-4's training transform before the 224 squash: a random crop of 50-100% of the area."""
    width, height = image.size
    area = width * height
    for _ in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(1, generator=generator).item())
        log_ratio = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * torch.rand(
            1, generator=generator).item()
        aspect = math.exp(log_ratio)
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            return image.crop((left, top, left + w, top + h))
    return image


class TrainDataset(Dataset):
    """Yields, per example, each image's cached queries or else its preprocessed pixels (read in workers)."""

    def __init__(self, examples: list[Example], cache: FeatureCache | None, augment: bool = False, seed: int = 0):
        self.examples, self.cache, self.augment, self.seed = examples, cache, augment, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        images = []
        for number, path in enumerate(self.examples[index].images):
            try:
                data = Path(path).read_bytes()
            except OSError as err:
                return {"index": index, "images": [], "error": f"{path}: cannot be read ({err.strerror or err})"}
            key = hashlib.sha256(data).hexdigest() if self.cache is not None else None
            if key is not None and key in self.cache:
                images.append({"key": key, "queries": self.cache.get(key), "pixels": None})
                continue
            try:
                image = load_image(data)
            except InputError as err:  # the message calls bytes "the uploaded data": name the file instead
                message = str(err).replace("the uploaded data", "the file")
                return {"index": index, "images": [], "error": f"{path}: {message}"}
            if self.augment:
                generator = torch.Generator().manual_seed(
                    (self.seed * 1_000_003 + self.epoch * 10_007 + index * 101 + number) % (2 ** 63))
                image = random_resized_crop(image, generator)
            images.append({"key": key, "queries": None, "pixels": preprocess(image)[0]})
        return {"index": index, "images": images, "error": None}


def _collate(items: list[dict]) -> list[dict]:
    return items


class EpochShuffle(Sampler):
    """A permutation that depends only on (seed, epoch): a resumed run sees the same order as an uninterrupted one."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())


# ---------------------------------------------------------------- schedule

def learning_rate_at(step: int, total_steps: int, warmup_steps: int, peak: float, minimum: float,
                     warmup_start: float = WARMUP_START_LR) -> float:
    """MiniGPT-4's linear_warmup_cosine_lr, per optimizer step: linear from warmup_start to peak over warmup_steps,
    then cosine from peak down to minimum at total_steps."""
    warmup_start = min(warmup_start, peak)
    if step < warmup_steps:
        return warmup_start + (peak - warmup_start) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return minimum + (peak - minimum) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------- checkpoints

def _rng_state() -> dict:
    numpy_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def find_checkpoint(output_dir: Path, resume: str) -> Path | None:
    """`latest` (None when the run has none yet), a checkpoint folder, or a run folder (its latest checkpoint)."""
    def latest_in(run: Path) -> Path | None:
        folders = sorted(p for p in (run / CHECKPOINT_DIR).glob("step-*") if (p / STATE_FILE).is_file())
        return folders[-1] if folders else None

    if resume == "latest":
        return latest_in(output_dir)
    path = Path(resume)
    if (path / STATE_FILE).is_file():
        return path
    if path.is_file() and path.name == STATE_FILE:
        return path.parent
    if path.is_dir() and (found := latest_in(path)) is not None:
        return found
    raise InputError(f"--resume {resume}: no checkpoint there (expected a folder with {STATE_FILE}, a run folder "
                     f"with {CHECKPOINT_DIR}/, or 'latest')")


# ---------------------------------------------------------------- command line

def add_arguments(parser) -> None:
    from .cli import add_model_options

    add_model_options(parser)
    data = parser.add_argument_group("data")
    data.add_argument("--data", action="append", required=True, metavar="FILE",
                      help="training data (repeat for several files): JSONL captions/VQA, LLaVA JSON, "
                           "STAIR/COCO captions JSON or Japanese Visual Genome VQA JSON")
    data.add_argument("--image-root", action="append", metavar="DIR",
                      help="folder the image paths are relative to (one for all files, or one per --data; "
                           "default: the data file's folder)")
    data.add_argument("--data-format", default="auto", choices=("auto", *FORMATS))
    data.add_argument("--image-pattern", default=DEFAULT_IMAGE_PATTERN,
                      help="file name of an image by id, for jvg and id-only COCO files (default %(default)s)")
    data.add_argument("--max-text-tokens", type=int,
                      help="cut answers longer than this many tokens (default: 64 in stage 1, 160 in stage 2)")

    train = parser.add_argument_group("training")
    train.add_argument("--output-dir", required=True, metavar="DIR")
    train.add_argument("--stage", type=int, choices=(1, 2), default=1,
                       help="MiniGPT-4 stage defaults: 1 = lr 1e-4 -> 8e-5, warmup 5000, batch 64; "
                            "2 = lr 3e-5 -> 1e-5, warmup 200, batch 12")
    train.add_argument("--epochs", type=int, help="passes over the data (default 1 unless --max-steps is given)")
    train.add_argument("--max-steps", type=int, help="optimizer steps in all (stops earlier than --epochs if reached)")
    train.add_argument("--batch-size", type=int, help="examples per process per micro-batch")
    train.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    train.add_argument("--learning-rate", type=float, help="peak learning rate")
    train.add_argument("--min-learning-rate", type=float, help="the cosine ends here")
    train.add_argument("--warmup-steps", type=int,
                       help="linear warmup from 1e-6 (default: the stage's, at most a quarter of the run)")
    train.add_argument("--weight-decay", type=float, default=0.05, help="AdamW decay on the weight (never the bias)")
    train.add_argument("--max-grad-norm", type=float, default=0.0, help="clip gradients to this norm (0: off)")
    train.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"),
                       help="Accelerate's autocast (default: the launch config, else fp16/bf16 to match the LLM "
                            "dtype on CUDA, else no)")
    train.add_argument("--seed", type=int, default=42)
    train.add_argument("--num-workers", type=int, default=2, help="DataLoader workers reading images")
    train.add_argument("--from-scratch", action="store_true",
                       help="start from a freshly initialised projection instead of the loaded one")

    features = parser.add_argument_group("feature cache")
    features.add_argument("--feature-cache", metavar="DIR",
                          help="where image queries are cached (default OUTPUT_DIR/feature_cache); share it "
                               "between runs")
    features.add_argument("--no-feature-cache", action="store_true", help="run the ViT on every image every time")
    features.add_argument("--feature-dtype", choices=("float16", "float32"), default="float16",
                          help="precision of cached queries (default %(default)s)")
    features.add_argument("--augment", action="store_true",
                          help="MiniGPT-4's random resized crop (50-100%% of the area); turns the cache off")

    logging = parser.add_argument_group("logging and checkpoints")
    logging.add_argument("--log-every", type=int, default=10, help="steps between train_log.jsonl lines")
    logging.add_argument("--save-every", type=int, default=1000, help="steps between resumable checkpoints")
    logging.add_argument("--keep-checkpoints", type=int, default=3, help="how many recent checkpoints to keep")
    logging.add_argument("--resume", metavar="PATH|latest",
                         help="continue from a checkpoint folder, a run folder, or 'latest' in --output-dir "
                              "(which starts afresh when there is none yet)")
    logging.add_argument("--stop-after", type=int, metavar="STEPS",
                         help="stop after this many steps in this invocation, with a checkpoint (time-sliced jobs)")
    logging.add_argument("--overwrite", action="store_true",
                         help="start again in an output folder that already holds a run (its feature cache is kept)")


def main(args) -> int:
    train(args)
    return 0


# ---------------------------------------------------------------- training

@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    complete: bool
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) as logged in this invocation
    images_encoded: int = 0  # images that went through the ViT in this invocation
    cache_hits: int = 0
    unreadable: dict[int, str] = field(default_factory=dict)
    projection_path: Path | None = None
    summary: dict = field(default_factory=dict)


def _resolve_defaults(args) -> None:
    stage = STAGES[args.stage]
    for name in ("learning_rate", "min_learning_rate", "batch_size", "max_text_tokens"):
        if getattr(args, name, None) is None:
            setattr(args, name, stage[name])
    checks = [("batch_size", 1), ("grad_accum", 1), ("log_every", 1), ("save_every", 1), ("max_text_tokens", 1),
              ("epochs", 1), ("max_steps", 1), ("stop_after", 1), ("keep_checkpoints", 1), ("num_workers", 0),
              ("warmup_steps", 0)]
    for name, low in checks:
        value = getattr(args, name, None)
        if value is not None and value < low:
            raise InputError(f"--{name.replace('_', '-')} must be at least {low}, got {value}")
    if args.learning_rate <= 0 or args.min_learning_rate < 0 or args.min_learning_rate > args.learning_rate:
        raise InputError(f"need 0 <= --min-learning-rate ({args.min_learning_rate}) <= --learning-rate "
                         f"({args.learning_rate}) and a positive --learning-rate")
    if args.weight_decay < 0:
        raise InputError("--weight-decay must not be negative")


def _mixed_precision(args, pipeline_dtype_name: str | None, on_cuda: bool) -> str | None:
    if args.mixed_precision:
        return args.mixed_precision
    if os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return None  # `accelerate launch --mixed_precision ...` / its config decide
    if on_cuda:
        return {"float16": "fp16", "bfloat16": "bf16"}.get(pipeline_dtype_name or "float16", "no")
    return "no"


def _llm_name(args) -> str:
    from .loading import read_converted_config
    from .presets import get_preset

    if getattr(args, "llm", None):
        return args.llm
    if getattr(args, "weights", None) and Path(args.weights).is_dir():
        try:
            return read_converted_config(Path(args.weights))["llm"]
        except Exception:
            pass
    return get_preset(getattr(args, "preset", "tiny")).llm


def train(args, pipeline=None) -> TrainResult:
    """Run training as the CLI does. `pipeline` may be given (tests, notebooks): its projection is copied, never
    modified; otherwise it is loaded from the model options on this process's device."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from .weights import PROJECTION_FILE, save_minigpt4_checkpoint, save_projection

    _resolve_defaults(args)
    output_dir = Path(args.output_dir)
    started = time.time()

    # Data first: a wrong path should fail in a second, not after loading a 7 GB model.
    roots = list(args.image_root or [])
    if len(roots) > 1 and len(roots) != len(args.data):
        raise InputError(f"{len(args.data)} --data files but {len(roots)} --image-root folders: give one root for "
                         "all, or one per data file in the same order")
    loaded = []
    for index, path in enumerate(args.data):
        root = roots[index] if len(roots) > 1 else (roots[0] if roots else None)
        loaded.append(load_dataset(path, root, args.data_format, args.image_pattern))

    if pipeline is not None:
        on_cuda, dtype_name = pipeline.device.type == "cuda", str(pipeline.embed_dtype).replace("torch.", "")
    else:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        on_cuda, dtype_name = device.startswith("cuda"), args.dtype
    accelerator = Accelerator(gradient_accumulation_steps=args.grad_accum,
                              mixed_precision=_mixed_precision(args, dtype_name, on_cuda))
    main_process = accelerator.is_main_process
    say = (lambda text: tqdm.write(text, file=sys.stderr)) if main_process else (lambda text: None)
    set_seed(args.seed)

    checkpoint = None
    if args.resume:
        checkpoint = find_checkpoint(output_dir, args.resume)
        if checkpoint is None:
            say(f"no checkpoint in {output_dir / CHECKPOINT_DIR} yet: starting from step 0")
    elif (output_dir / LOG_FILE).exists():
        if not args.overwrite:
            raise InputError(f"{output_dir} already holds a training run ({LOG_FILE}); pass --resume latest to "
                             "continue it, or --overwrite to start again")
        if main_process:
            (output_dir / LOG_FILE).unlink()
            shutil.rmtree(output_dir / CHECKPOINT_DIR, ignore_errors=True)
    accelerator.wait_for_everyone()

    if pipeline is None:
        from .cli import load_from_args

        if args.device is None:
            args.device = str(accelerator.device)
        elif not _same_device(torch.device(args.device), accelerator.device):
            raise InputError(f"--device {args.device} differs from this process's accelerator device "
                             f"{accelerator.device}; choose GPUs with CUDA_VISIBLE_DEVICES or accelerate's --gpu_ids")
        pipeline = load_from_args(args, require_projection=False)
    tokenizer, template, llm = pipeline.tokenizer, pipeline.template, pipeline.llm
    num_queries = pipeline.encoder.query_tokens.shape[1]

    # Token ids and labels, once; what does not fit is a counted bad row too.
    examples: list[Example] = []
    sequences: list[Sequence] = []
    reports: list[DataReport] = []
    for found, report in loaded:
        for example in found:
            try:
                sequence = build_sequence(example, tokenizer, template, args.max_text_tokens,
                                          pipeline.context_length, num_queries)
            except ValueError as err:
                report.add_bad(example.source.split(" ", 1)[-1], str(err))
                report.examples -= 1
                continue
            examples.append(example)
            sequences.append(sequence)
        reports.append(report)
        say(report.describe())
    if not examples:
        raise InputError("no usable training examples: " + "; ".join(r.describe() for r in reports))

    cache = None
    if args.augment and not args.no_feature_cache:
        say("--augment crops every image anew: the feature cache is off")
    if not (args.no_feature_cache or args.augment):
        folder = Path(args.feature_cache) if args.feature_cache else output_dir / "feature_cache"
        cache = FeatureCache(folder / encoder_fingerprint(pipeline.encoder),
                             dtype=getattr(torch, args.feature_dtype), rank=accelerator.process_index)
        say(f"feature cache {cache.folder}: {len(cache)} images cached")

    # The trained module: a float32 copy of the loaded projection (the pipeline's own is never touched).
    projection = copy.deepcopy(pipeline.projection).float().to(accelerator.device)
    if args.from_scratch:
        torch.manual_seed(args.seed)
        projection.reset_parameters()
        nn.init.zeros_(projection.bias)
    projection.requires_grad_(True).train()
    started_from = "scratch" if args.from_scratch else (args.projection or "the preset's projection")
    optimizer = torch.optim.AdamW(
        [{"params": [projection.weight], "weight_decay": args.weight_decay},
         {"params": [projection.bias], "weight_decay": 0.0}],
        lr=args.learning_rate, betas=(0.9, 0.999))

    dataset = TrainDataset(examples, cache, augment=args.augment, seed=args.seed)
    sampler = EpochShuffle(len(dataset), args.seed)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, collate_fn=_collate,
                        num_workers=args.num_workers, persistent_workers=False)
    projection, optimizer, loader = accelerator.prepare(projection, optimizer, loader)

    steps_per_epoch = math.ceil(len(loader) / args.grad_accum)
    if args.max_steps is not None and args.epochs is None:
        total_steps = args.max_steps
    else:
        total_steps = steps_per_epoch * (args.epochs or 1)
        if args.max_steps is not None:
            total_steps = min(total_steps, args.max_steps)
    warmup = args.warmup_steps if args.warmup_steps is not None else min(STAGES[args.stage]["warmup_steps"],
                                                                          total_steps // 4)
    peak, minimum = args.learning_rate, args.min_learning_rate
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer,
        lambda step: learning_rate_at(step, total_steps, warmup, peak, minimum) / peak)

    step = 0
    if checkpoint is not None:
        state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
        from .weights import load_projection

        weights, _ = load_projection(checkpoint / PROJECTION_FILE, projection_in(projection),
                                     projection_out(projection))
        accelerator.unwrap_model(projection).load_state_dict(weights)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = int(state["step"])
        if state.get("examples") != len(examples):
            say(f"warning: the checkpoint was trained on {state.get('examples')} examples, the data now has "
                f"{len(examples)}: the data order after resuming differs from the original run's")
        rng_file = checkpoint / f"rng-{accelerator.process_index}.pt"
        if rng_file.is_file():
            _set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
        say(f"resumed from {checkpoint} at step {step}")
    if main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        _truncate_log(output_dir / LOG_FILE, step)

    config = {
        "preset": getattr(args, "preset", None), "llm": _llm_name(args), "template": template.name,
        "stage": args.stage, "learning_rate": peak, "min_learning_rate": minimum, "warmup_steps": warmup,
        "weight_decay": args.weight_decay, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
        "processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision,
        "total_steps": total_steps, "steps_per_epoch": steps_per_epoch, "max_text_tokens": args.max_text_tokens,
        "seed": args.seed, "started_from": started_from, "augment": args.augment,
        "feature_cache": str(cache.folder) if cache else None,
    }
    say(f"training {sum(p.numel() for p in projection.parameters()):,} parameters for {total_steps} steps "
        f"({steps_per_epoch} per epoch, {len(examples)} examples, batch {args.batch_size} x {args.grad_accum} "
        f"accumulation x {accelerator.num_processes} processes), lr {peak:g} -> {minimum:g}, warmup {warmup}")

    result = TrainResult(output_dir=output_dir, steps=step, complete=False)
    embedding = llm.get_input_embeddings()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None and tokenizer.pad_token_id >= 0 else 0
    feature_dtype = cache.dtype if cache is not None else None
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step",
               disable=not accelerator.is_local_main_process)
    run_start_step, last_saved = step, step
    window_loss = torch.zeros((), device=accelerator.device)
    window_micro = 0
    last_logged_step = step

    def save_checkpoint() -> None:
        nonlocal last_saved
        folder = output_dir / CHECKPOINT_DIR / f"step-{step:08d}"
        accelerator.wait_for_everyone()
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(_rng_state(), folder / f"rng-{accelerator.process_index}.pt")
        accelerator.wait_for_everyone()
        if main_process:
            module = accelerator.unwrap_model(projection)
            save_projection(module.weight, module.bias, folder / PROJECTION_FILE,
                            {"llm": config["llm"], "template": template.name, "step": step})
            scratch = folder / f".{STATE_FILE}.tmp"
            torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "examples": len(examples), "config": config}, scratch)
            os.replace(scratch, folder / STATE_FILE)  # written last: its presence marks a complete checkpoint
            kept = sorted(p for p in (output_dir / CHECKPOINT_DIR).glob("step-*") if (p / STATE_FILE).is_file())
            for old in kept[:-args.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        last_saved = step
        accelerator.wait_for_everyone()

    def totals() -> tuple[int, int]:
        """Images through the ViT and cache hits so far, over all processes (a collective: every rank calls it)."""
        counts = torch.tensor([result.images_encoded, result.cache_hits], device=accelerator.device)
        counts = accelerator.reduce(counts, reduction="sum")
        return int(counts[0]), int(counts[1])

    def image_queries(items: list[dict]) -> list[list[torch.Tensor]]:
        """Queries for every image of the batch: from the worker (cache hit), this run's pending features, or the
        ViT, which runs once per batch on all images still missing."""
        out = [[None] * len(item["images"]) for item in items]
        missing: dict[str, list] = {}
        for i, item in enumerate(items):
            for j, image in enumerate(item["images"]):
                if image["queries"] is not None:
                    out[i][j] = image["queries"]
                    result.cache_hits += 1
                elif cache is not None and image["key"] is not None and image["key"] in cache:
                    out[i][j] = cache.get(image["key"])
                    result.cache_hits += 1
                else:
                    key = image["key"] or f"slot-{i}-{j}"
                    missing.setdefault(key, [image["pixels"], []])[1].append((i, j))
        if missing:
            keys = list(missing)
            pixels = torch.stack([missing[k][0] for k in keys])
            queries = pipeline.encode_queries(pixels).clone()  # out of inference mode: usable by autograd
            result.images_encoded += len(keys)
            for key, value in zip(keys, queries):
                if feature_dtype is not None:
                    value = value.to(feature_dtype)
                    if not key.startswith("slot-"):
                        cache.put(key, value)
                for i, j in missing[key][1]:
                    out[i][j] = value
        device = accelerator.device
        return [[q.to(device, torch.float32) for q in row] for row in out]

    complete = False
    stopped_early = False
    try:
        while True:
            epoch = step // steps_per_epoch
            if step >= total_steps:
                complete = True
                break
            sampler.set_epoch(epoch)
            dataset.epoch = epoch
            skip_batches = (step - epoch * steps_per_epoch) * args.grad_accum
            epoch_loader = accelerator.skip_first_batches(loader, skip_batches) if skip_batches else loader
            epoch_loader.set_epoch(epoch)  # Accelerate's loaders re-seed the sampler with their own count otherwise
            epoch_start_step = step
            for items in epoch_loader:
                good = []
                for item in items:
                    if item["error"] is not None:
                        if item["index"] not in result.unreadable:
                            result.unreadable[item["index"]] = item["error"]
                            if len(result.unreadable) <= 5:
                                say(f"skipping {examples[item['index']].source}: {item['error']}")
                    else:
                        good.append(item)
                with accelerator.accumulate(projection):
                    if good:
                        queries = image_queries(good)
                        with accelerator.autocast():
                            flat = [q for row in queries for q in row]
                            projected = projection(torch.stack(flat)) if flat else None
                            image_embeds, cursor = [], 0
                            for row in queries:
                                image_embeds.append([projected[cursor + k] for k in range(len(row))])
                                cursor += len(row)
                            embeds, mask, labels = assemble_batch(
                                [sequences[item["index"]] for item in good], image_embeds, embedding, pad_id)
                            loss = llm(inputs_embeds=embeds, attention_mask=mask, labels=labels,
                                       use_cache=False).loss
                    else:  # every image of this batch was unreadable: a zero step keeps processes in step
                        with accelerator.autocast():
                            loss = projection(torch.zeros(1, num_queries, projection_in(projection),
                                                          device=accelerator.device)).sum() * 0.0
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and args.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(projection.parameters(), args.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                if good:  # the zero loss of an all-unreadable batch is not a measurement
                    window_loss += loss.detach().float()
                    window_micro += 1
                if not accelerator.sync_gradients:
                    continue
                lr = scheduler.get_last_lr()[0]
                scheduler.step()
                step += 1
                bar.update(1)
                if step % args.log_every == 0 or step == total_steps:
                    sums = accelerator.reduce(torch.stack([window_loss, torch.tensor(
                        float(window_micro), device=accelerator.device)]), reduction="sum")
                    mean_loss = (sums[0] / sums[1]).item() if sums[1] > 0 else None  # None: nothing readable
                    window_loss.zero_()
                    window_micro = 0
                    if mean_loss is not None:
                        result.losses.append((step, mean_loss))
                        bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
                    encoded, hits = totals()
                    if main_process:
                        line = {"step": step, "epoch": step / steps_per_epoch, "loss": mean_loss, "lr": lr,
                                "steps_logged": step - last_logged_step, "images_encoded": encoded,
                                "cache_hits": hits, "elapsed_s": round(time.time() - started, 3)}
                        with open(output_dir / LOG_FILE, "a", encoding="utf-8") as log:
                            log.write(json.dumps(line) + "\n")
                    last_logged_step = step
                if step % args.save_every == 0 and step < total_steps:
                    save_checkpoint()
                if step >= total_steps:
                    break
                if args.stop_after is not None and step - run_start_step >= args.stop_after:
                    stopped_early = True
                    break
            if cache is not None:  # share this epoch's new features with every process before the next
                cache.flush()
                accelerator.wait_for_everyone()
                cache.refresh()
            if stopped_early:
                break
            if step == epoch_start_step:  # cannot happen with a non-empty loader; never loop forever
                raise RuntimeError(f"epoch {epoch} produced no optimizer step")
    except KeyboardInterrupt:
        bar.close()
        if accelerator.num_processes == 1 and step > last_saved:
            say(f"interrupted: saving a checkpoint at step {step} (continue with --resume latest)")
            save_checkpoint()
        raise
    bar.close()
    if cache is not None:
        cache.flush()
    if step > last_saved:
        save_checkpoint()

    result.steps, result.complete = step, complete or step >= total_steps
    encoded, hits = totals()
    if accelerator.num_processes > 1:  # every process skipped its own unreadable images
        from accelerate.utils import gather_object

        result.unreadable = dict(sorted(gather_object(list(result.unreadable.items()))))
    module = accelerator.unwrap_model(projection)
    summary = {
        "format": "minigpt4_ja training run", "complete": result.complete, "steps": step,
        "epochs": round(step / steps_per_epoch, 4), **config,
        "data": [r.to_dict() for r in reports],
        "unreadable_images": {"count": len(result.unreadable),
                              "first": [f"{examples[i].source}: {e}" for i, e in list(result.unreadable.items())[:5]]},
        "final_loss": result.losses[-1][1] if result.losses else None,
        "images_encoded": encoded, "cache_hits": hits,  # in this invocation, all processes
        "files": {"projection": PROJECTION_FILE, "minigpt4_checkpoint": "checkpoint.pth", "log": LOG_FILE,
                  "checkpoints": CHECKPOINT_DIR},
        "elapsed_s": round(time.time() - started, 1),
    }
    result.summary = summary
    if main_process:
        metadata = {"llm": config["llm"], "template": template.name, "preset": config["preset"], "steps": step,
                    "stage": args.stage, "data": [r.path for r in reports], "complete": result.complete}
        result.projection_path = save_projection(module.weight, module.bias, output_dir / PROJECTION_FILE, metadata)
        save_minigpt4_checkpoint(module.weight, module.bias, output_dir / "checkpoint.pth",
                                 epoch=step // steps_per_epoch)
        (output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=1, ensure_ascii=False), encoding="utf-8")
        done = "finished" if result.complete else f"stopped at step {step} of {total_steps} (--resume latest continues)"
        skipped = f"; {len(result.unreadable)} unreadable images skipped" if result.unreadable else ""
        say(f"{done}: wrote {output_dir / PROJECTION_FILE} (load it with --projection), checkpoint.pth "
            f"(MiniGPT-4 layout) and {SUMMARY_FILE}; {encoded} images through the ViT, {hits} cache hits{skipped}")
    accelerator.wait_for_everyone()
    return result


def projection_in(module) -> int:
    return getattr(module, "module", module).in_features


def projection_out(module) -> int:
    return getattr(module, "module", module).out_features


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def _truncate_log(path: Path, step: int) -> None:
    """On resume, drop log lines a crashed run wrote after its last checkpoint (they are trained again)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
