"""BLIP-2's frozen image side: EVA ViT-g (39 blocks) -> ln_vision -> Q-Former with 32 learned queries.

Built from transformers' own `Blip2VisionModel` / `Blip2QFormerModel`; the loaders below read LAVIS's original files
(`eva_vit_g.pth`, `blip2_pretrained_flant5xxl.pth`) and rename their keys.
"""

from __future__ import annotations

import json
import re
import zipfile
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel, Blip2VisionConfig, Blip2VisionModel

from .errors import WeightsError

NUM_QUERY_TOKENS = 32
LN_VISION_EPS = 1e-5  # LAVIS ln_vision is a plain nn.LayerNorm (eps 1e-5); transformers' config default is 1e-6


def vit_g_config() -> Blip2VisionConfig:
    """EVA ViT-g/14 at 224 as BLIP-2 uses it: 39 of the 40 blocks, qkv bias, block LayerNorm eps 1e-6."""
    return Blip2VisionConfig(
        hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
        image_size=224, patch_size=14, layer_norm_eps=1e-6, qkv_bias=True, hidden_act="gelu",
    )


def qformer_config(encoder_hidden_size: int = 1408) -> Blip2QFormerConfig:
    """BERT-base Q-Former with cross-attention every second layer (the text branch is not used)."""
    return Blip2QFormerConfig(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        cross_attention_frequency=2, encoder_hidden_size=encoder_hidden_size, layer_norm_eps=1e-12,
    )


def tiny_vision_config() -> Blip2VisionConfig:
    return Blip2VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=224, patch_size=14, layer_norm_eps=1e-6, qkv_bias=True,
    )


def tiny_qformer_config() -> Blip2QFormerConfig:
    # Keeps the real 768-wide queries so projections, feature caches and `embed` files have the real shape.
    return Blip2QFormerConfig(
        hidden_size=768, num_hidden_layers=2, num_attention_heads=12, intermediate_size=256,
        cross_attention_frequency=2, encoder_hidden_size=32,
    )


class FP32LayerNorm(nn.LayerNorm):
    """LAVIS's ln_vision: computed in float32 whatever the input dtype, cast back after."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)
        return out.to(x.dtype)


class VisionEncoder(nn.Module):
    """image (B,3,224,224) -> queries (B,32,768). Frozen: only the projection after it ever trains."""

    def __init__(self, vision_config: Blip2VisionConfig, qformer_config: Blip2QFormerConfig,
                 num_query_tokens: int = NUM_QUERY_TOKENS):
        super().__init__()
        self.vision_model = Blip2VisionModel(vision_config)
        # transformers' post_layernorm plays LAVIS's ln_vision; give it LAVIS's eps and fp32 arithmetic.
        self.vision_model.post_layernorm = FP32LayerNorm(vision_config.hidden_size, eps=LN_VISION_EPS)
        self.qformer = Blip2QFormerModel(qformer_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, num_query_tokens, qformer_config.hidden_size))
        self.autocast_dtype: torch.dtype | None = None  # fp16 on CUDA, as LAVIS's maybe_autocast

    @property
    def config_dict(self) -> dict:
        return {
            "vision_config": self.vision_model.config.to_dict(),
            "qformer_config": self.qformer.config.to_dict(),
            "num_query_tokens": self.query_tokens.shape[1],
        }

    @classmethod
    def from_config_dict(cls, config: dict) -> "VisionEncoder":
        return cls(
            Blip2VisionConfig(**_known_fields(Blip2VisionConfig, config["vision_config"])),
            Blip2QFormerConfig(**_known_fields(Blip2QFormerConfig, config["qformer_config"])),
            config.get("num_query_tokens", NUM_QUERY_TOKENS),
        )

    @property
    def device(self) -> torch.device:
        return self.query_tokens.device

    @property
    def output_size(self) -> int:
        return self.query_tokens.shape[-1]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        autocast = (
            torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype else nullcontext()
        )
        with autocast:
            image_embeds = self.vision_model(pixel_values=pixel_values.to(self.device)).last_hidden_state
            queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
            out = self.qformer(query_embeds=queries, encoder_hidden_states=image_embeds).last_hidden_state
        return out.float()

    def place(self, device: torch.device | str, half_precision_vit: bool) -> "VisionEncoder":
        """Move to `device`. With half precision, cast the ViT's Linear/Conv weights to fp16 and run under fp16
        autocast, keeping LayerNorms, embeddings and the Q-Former in fp32: what LAVIS does with vit_precision fp16."""
        self.float()
        if half_precision_vit:
            for module in self.vision_model.modules():
                if isinstance(module, (nn.Linear, nn.Conv2d)):
                    module.half()
            self.autocast_dtype = torch.float16
        else:
            self.autocast_dtype = None
        return self.to(device).eval().requires_grad_(False)


def _known_fields(config_cls, values: dict) -> dict:
    known = set(config_cls().to_dict())
    return {k: v for k, v in values.items() if k in known and k not in ("model_type", "transformers_version")}


# ---------------------------------------------------------------- LAVIS -> transformers key conversion

_EVA_BLOCK_RENAMES = [
    ("norm1.", "layer_norm1."), ("norm2.", "layer_norm2."),
    ("attn.qkv.", "self_attn.qkv."), ("attn.proj.", "self_attn.projection."),
    ("mlp.fc1.", "mlp.fc1."), ("mlp.fc2.", "mlp.fc2."),
]


def convert_eva_vit(state_dict: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """`eva_vit_g.pth` (flat, 40 blocks) -> `vision_model.*` keys for the first `num_layers` blocks.

    EVA stores q_bias and v_bias; the fused qkv bias is cat(q_bias, zeros, v_bias).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key == "cls_token":
            out["vision_model.embeddings.class_embedding"] = value
        elif key == "pos_embed":
            out["vision_model.embeddings.position_embedding"] = value
        elif key.startswith("patch_embed.proj."):
            out["vision_model.embeddings.patch_embedding." + key.rsplit(".", 1)[1]] = value
        elif match := re.fullmatch(r"blocks\.(\d+)\.(.+)", key):
            index, rest = int(match.group(1)), match.group(2)
            if index >= num_layers or rest in ("attn.q_bias", "attn.v_bias"):
                continue
            for old, new in _EVA_BLOCK_RENAMES:
                if rest.startswith(old):
                    out[f"vision_model.encoder.layers.{index}.{new}{rest[len(old):]}"] = value
                    break
    for index in range(num_layers):
        q_key, v_key = f"blocks.{index}.attn.q_bias", f"blocks.{index}.attn.v_bias"
        if q_key in state_dict and v_key in state_dict:
            q_bias, v_bias = state_dict[q_key], state_dict[v_key]
            out[f"vision_model.encoder.layers.{index}.self_attn.qkv.bias"] = torch.cat(
                [q_bias, torch.zeros_like(v_bias), v_bias]
            )
    return out


def convert_blip2_qformer(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`blip2_pretrained_flant5xxl.pth`["model"] -> ln_vision, `qformer.*` and `query_tokens`.

    t5_proj.* (BLIP-2's own projection to T5) and buffers such as position_ids are not used by MiniGPT-4.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("ln_vision."):
            out["vision_model.post_layernorm." + key.rsplit(".", 1)[1]] = value
        elif key == "query_tokens":
            out["query_tokens"] = value
        elif key.startswith("Qformer.bert."):
            rest = key[len("Qformer.bert."):]
            if rest.startswith("embeddings.") and not rest.startswith("embeddings.LayerNorm."):
                continue  # word/position embeddings and position_ids: the text branch, unused
            rest = rest.replace("embeddings.LayerNorm.", "layernorm.").replace(".self.", ".attention.")
            out["qformer." + rest] = value
    return out


# ---------------------------------------------------------------- loading

def _torch_load(path: Path, what: str) -> dict:
    if not path.is_file():
        raise WeightsError(f"{what} file {path} does not exist")
    try:
        # Memory-map zip checkpoints (no copy of 2 GB in RAM); older non-zip ones load the plain way.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as err:  # pickle, zip and mmap errors all mean the same thing to a user
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise WeightsError(f"{what} file {path} cannot be read as a PyTorch checkpoint ({reason})") from err


def read_eva_vit_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The raw (LAVIS-named) state dict of an `eva_vit_g.pth`-layout file."""
    path = Path(path)
    state_dict = _torch_load(path, "EVA ViT")
    if isinstance(state_dict, dict) and "model" in state_dict and "cls_token" not in state_dict:
        state_dict = state_dict["model"]
    if not isinstance(state_dict, dict) or "cls_token" not in state_dict:
        raise WeightsError(f"EVA ViT file {path} has no 'cls_token': it is not LAVIS's eva_vit_g.pth layout")
    return state_dict


def read_qformer_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The raw (LAVIS-named) `model` state dict of a `blip2_pretrained_flant5xxl.pth`-layout file."""
    path = Path(path)
    checkpoint = _torch_load(path, "Q-Former")
    state_dict = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict) or "query_tokens" not in state_dict:
        raise WeightsError(
            f"Q-Former file {path} has no 'query_tokens': expected LAVIS's blip2_pretrained_flant5xxl.pth "
            "({'model': {'query_tokens', 'ln_vision.*', 'Qformer.bert.*', ...}})"
        )
    return state_dict


def _shape(state_dict: dict, key: str, source: str) -> tuple[int, ...]:
    if key not in state_dict:
        raise WeightsError(f"{source} has no {key!r}")
    return tuple(state_dict[key].shape)


def infer_vision_config(eva: dict[str, torch.Tensor], source: str = "EVA ViT file") -> Blip2VisionConfig:
    """The ViT config from the file's shapes. BLIP-2 uses 39 blocks of EVA-g (the file has 40; other widths, the
    small test models, use all but the last); heads are EVA-g's 88 wide (1408 -> 16), or 8 wide for small models."""
    width = _shape(eva, "cls_token", source)[-1]
    patch = _shape(eva, "patch_embed.proj.weight", source)[-1]
    grid = round((_shape(eva, "pos_embed", source)[1] - 1) ** 0.5)
    blocks = {int(m.group(1)) for k in eva if (m := re.match(r"blocks\.(\d+)\.", k))}
    depth = 39 if width == 1408 else len(blocks) - 1
    if depth < 1 or len(blocks) < depth:
        raise WeightsError(f"{source} has {len(blocks)} blocks; BLIP-2 needs {max(depth, 1)} (all but the last)")
    return Blip2VisionConfig(
        hidden_size=width, intermediate_size=_shape(eva, "blocks.0.mlp.fc1.weight", source)[0],
        num_hidden_layers=depth, num_attention_heads=width // 88 if width % 88 == 0 else width // 8,
        image_size=grid * patch, patch_size=patch, layer_norm_eps=1e-6, qkv_bias=True, hidden_act="gelu",
    )


def infer_qformer_config(qformer: dict[str, torch.Tensor], source: str = "Q-Former file") -> Blip2QFormerConfig:
    """The Q-Former config from the file's shapes (BERT's 64-wide heads)."""
    prefix = "Qformer.bert.encoder.layer"
    layers = {int(m.group(1)) for k in qformer if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", k))}
    cross = sorted(i for i in layers if f"{prefix}.{i}.crossattention.self.key.weight" in qformer)
    if not layers or not cross:
        raise WeightsError(f"{source} has no Q-Former layers with cross-attention ({prefix}.N.crossattention.*)")
    width = _shape(qformer, "query_tokens", source)[-1]
    return Blip2QFormerConfig(
        hidden_size=width, num_hidden_layers=len(layers), num_attention_heads=width // 64,
        intermediate_size=_shape(qformer, f"{prefix}.0.intermediate_query.dense.weight", source)[0],
        cross_attention_frequency=cross[1] - cross[0] if len(cross) > 1 else len(layers),
        encoder_hidden_size=_shape(qformer, f"{prefix}.{cross[0]}.crossattention.self.key.weight", source)[1],
        layer_norm_eps=1e-12,
    )


def load_state_dict_checked(module: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Strict load that names the file, the key and the shapes when something does not match."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise WeightsError(f"{source} is missing {len(missing)} weights: {shown}")
    for key, tensor in expected.items():
        if tuple(state_dict[key].shape) != tuple(tensor.shape):
            raise WeightsError(
                f"{source}: weight {key!r} has shape {tuple(state_dict[key].shape)}, "
                f"the model expects {tuple(tensor.shape)}"
            )
    module.load_state_dict({k: state_dict[k] for k in expected}, strict=True, assign=True)


def build_vision_encoder(config: dict | None = None) -> VisionEncoder:
    """The real ViT-g + Q-Former skeleton on the meta device: no time spent on random init of 1.1 B weights."""
    with torch.device("meta"):
        if config is None:
            return VisionEncoder(vit_g_config(), qformer_config())
        return VisionEncoder.from_config_dict(config)


def load_lavis_encoder(eva_vit_path: str | Path, qformer_path: str | Path) -> VisionEncoder:
    """Build the encoder from LAVIS's two files; the architecture is read from their shapes (ViT-g for the real
    files), on the meta device so no time goes into random initialisation."""
    eva, qformer = read_eva_vit_file(eva_vit_path), read_qformer_file(qformer_path)
    vision_config = infer_vision_config(eva, f"EVA ViT file {eva_vit_path}")
    config = {"vision_config": vision_config.to_dict(),
              "qformer_config": infer_qformer_config(qformer, f"Q-Former file {qformer_path}").to_dict(),
              "num_query_tokens": qformer["query_tokens"].shape[1]}
    encoder = build_vision_encoder(config)
    state_dict = convert_eva_vit(eva, vision_config.num_hidden_layers) | convert_blip2_qformer(qformer)
    load_state_dict_checked(encoder, state_dict, f"LAVIS weights ({Path(eva_vit_path).name} + {Path(qformer_path).name})")
    return encoder.eval()


ENCODER_WEIGHTS = "vision_encoder.safetensors"
ENCODER_CONFIG = "vision_encoder.json"


def save_encoder(encoder: VisionEncoder, folder: str | Path) -> None:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in encoder.state_dict().items()}
    save_file(tensors, str(folder / ENCODER_WEIGHTS), metadata={"format": "pt"})
    (folder / ENCODER_CONFIG).write_text(json.dumps(encoder.config_dict, indent=1), encoding="utf-8")


def load_encoder(folder: str | Path) -> VisionEncoder:
    """Load the converted safetensors (memory-mapped) written by `save_encoder`."""
    from safetensors.torch import load_file

    folder = Path(folder)
    weights, config = folder / ENCODER_WEIGHTS, folder / ENCODER_CONFIG
    for path in (weights, config):
        if not path.is_file():
            raise WeightsError(f"converted encoder file {path} is missing")
    encoder = build_vision_encoder(json.loads(config.read_text(encoding="utf-8")))
    try:
        state_dict = load_file(str(weights))
    except Exception as err:
        raise WeightsError(f"converted encoder file {weights} cannot be read ({err})") from err
    load_state_dict_checked(encoder, state_dict, str(weights))
    return encoder.eval()
