"""Small, seeded, random weight files in the REAL layouts of the files the library reads.

- `write_eva_vit`: LAVIS's `eva_vit_g.pth`, a flat fp16 state dict with one more block than BLIP-2 uses
  (`cls_token`, `pos_embed`, `patch_embed.proj.*`, `blocks.{i}.{norm1,norm2,attn.qkv,attn.q_bias,attn.v_bias,attn.proj,
  mlp.fc1,mlp.fc2}.*`; qkv has no bias of its own).
- `write_blip2_qformer`: LAVIS's runner checkpoint `blip2_pretrained_flant5xxl.pth`,
  `{"model": {...}, "optimizer": {...}, "config": {...}, "scaler": None, "epoch": N}`, fp32, with `query_tokens`,
  `ln_vision.*`, `Qformer.bert.embeddings.{LayerNorm.*, position_ids}`, the query branch of each BERT layer,
  cross-attention on layers `i % freq == 0`, and `t5_proj.*`. No text branch (LAVIS deletes it before saving).
- `write_rinna_checkpoint`: MiniGPT-4's save format as rinna published it (`checkpoint.pth`): `llama_proj.*` plus
  frozen-LLM buffers (a bool causal mask, masked_bias, inv_freq) and the Q-Former's position_ids, AdamW state, config
  and epoch. Everything loads with `torch.load(weights_only=True)`.

`TINY` matches `minigpt4_ja.vision.tiny_vision_config()` / `tiny_qformer_config()`. `EVA_HEAD_DIM` sizes follow
the conventions that the real files imply (EVA-g: 1408 wide, 16 heads of 88; BERT-base Q-Former: 12 heads of 64), so a
loader that infers heads from widths can read them.

Nothing here imports `minigpt4_ja`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

__all__ = [
    "LavisSizes", "TINY", "DEEPER", "EVA_HEAD_DIM",
    "eva_vit_state_dict", "qformer_state_dict", "rinna_checkpoint",
    "save_eva_vit", "save_blip2_checkpoint",
    "write_eva_vit", "write_blip2_qformer", "write_rinna_checkpoint", "write_lavis_pair",
]


@dataclass(frozen=True)
class LavisSizes:
    """The numbers that shape a small ViT + Q-Former pair. `vit_depth` blocks are used; the EVA file holds
    `vit_depth + extra_blocks` (the real one: 39 used, 40 stored)."""

    vit_width: int = 32
    vit_depth: int = 2
    vit_heads: int = 4
    vit_mlp: int = 64
    image_size: int = 224
    patch_size: int = 14
    extra_blocks: int = 1
    qformer_hidden: int = 768
    qformer_layers: int = 2
    qformer_heads: int = 12
    qformer_intermediate: int = 256
    cross_attention_freq: int = 2
    num_query_tokens: int = 32
    t5_hidden: int = 64  # t5_proj: 768 -> 4096 in the real file

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def vision_config(self):
        from transformers import Blip2VisionConfig

        return Blip2VisionConfig(
            hidden_size=self.vit_width, intermediate_size=self.vit_mlp, num_hidden_layers=self.vit_depth,
            num_attention_heads=self.vit_heads, image_size=self.image_size, patch_size=self.patch_size,
            layer_norm_eps=1e-6, qkv_bias=True, hidden_act="gelu",
        )

    def qformer_config(self):
        from transformers import Blip2QFormerConfig

        return Blip2QFormerConfig(
            hidden_size=self.qformer_hidden, num_hidden_layers=self.qformer_layers,
            num_attention_heads=self.qformer_heads, intermediate_size=self.qformer_intermediate,
            cross_attention_frequency=self.cross_attention_freq, encoder_hidden_size=self.vit_width,
            layer_norm_eps=1e-12,
        )


TINY = LavisSizes()  # = minigpt4_ja.vision.tiny_vision_config() + tiny_qformer_config()
DEEPER = replace(TINY, vit_depth=3, qformer_layers=4)  # cross-attention on layers 0 and 2, none on 1 and 3
# EVA-g's head width (1408 / 16 = 88) and mlp ratio (4.3637), at 2 heads; BERT-base heads of 64.
EVA_HEAD_DIM = LavisSizes(vit_width=176, vit_depth=2, vit_heads=2, vit_mlp=int(176 * 4.3637))


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(g: torch.Generator, *shape: int, std: float = 1.0, mean: float = 0.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * std + mean


def _linear(g: torch.Generator, out_features: int, in_features: int, gain: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    # Scaled like a default init but larger, so attention is peaked and every weight visibly matters.
    return (_randn(g, out_features, in_features, std=gain / in_features ** 0.5),
            _randn(g, out_features, std=0.1))


def _norm(g: torch.Generator, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _randn(g, width, std=0.1, mean=1.0), _randn(g, width, std=0.1)


# ---------------------------------------------------------------- eva_vit_g.pth

def eva_vit_state_dict(sizes: LavisSizes = TINY, seed: int = 0, dtype: torch.dtype = torch.float16,
                       residual_scale: float = 0.03) -> dict:
    """The flat EVA state dict, `sizes.vit_depth + sizes.extra_blocks` blocks, in `dtype` (the real file: fp16).

    The residual stream is kept small (about `residual_scale`), as in the real ViT-g where ln_vision sees small
    features: then ln_vision's eps (1e-5 against 1e-6) changes the output far beyond fp32 noise, and a test can tell."""
    g, w, r = _generator(seed), sizes.vit_width, residual_scale
    sd: dict[str, torch.Tensor] = {
        "cls_token": _randn(g, 1, 1, w, std=r),
        "pos_embed": _randn(g, 1, sizes.num_patches + 1, w, std=r),
        "patch_embed.proj.weight": _randn(g, w, 3, sizes.patch_size, sizes.patch_size,
                                          std=r / (3 * sizes.patch_size ** 2) ** 0.5),
        "patch_embed.proj.bias": _randn(g, w, std=r),
    }
    for i in range(sizes.vit_depth + sizes.extra_blocks):
        p = f"blocks.{i}."
        sd[p + "norm1.weight"], sd[p + "norm1.bias"] = _norm(g, w)
        sd[p + "attn.q_bias"] = _randn(g, w, std=0.3)
        sd[p + "attn.v_bias"] = _randn(g, w, std=0.3)
        sd[p + "attn.qkv.weight"] = _randn(g, 3 * w, w, std=2.0 / w ** 0.5)
        sd[p + "attn.proj.weight"] = _randn(g, w, w, std=r / w ** 0.5)
        sd[p + "attn.proj.bias"] = _randn(g, w, std=r)
        sd[p + "norm2.weight"], sd[p + "norm2.bias"] = _norm(g, w)
        sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = _linear(g, sizes.vit_mlp, w)
        sd[p + "mlp.fc2.weight"] = _randn(g, w, sizes.vit_mlp, std=r / sizes.vit_mlp ** 0.5)
        sd[p + "mlp.fc2.bias"] = _randn(g, w, std=r)
    return {k: v.to(dtype) for k, v in sd.items()}


def save_eva_vit(state_dict: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, path)
    return path


def write_eva_vit(path: str | Path, sizes: LavisSizes = TINY, seed: int = 0, dtype: torch.dtype = torch.float16,
                  **overrides) -> Path:
    """e.g. `write_eva_vit(p)` for the tiny config, `write_eva_vit(p, vit_width=64, vit_depth=3)` for others."""
    return save_eva_vit(eva_vit_state_dict(replace(sizes, **overrides), seed, dtype), path)


# ---------------------------------------------------------------- blip2_pretrained_flant5xxl.pth

def qformer_state_dict(sizes: LavisSizes = TINY, seed: int = 1) -> dict:
    """The "model" entry of LAVIS's BLIP-2 FlanT5 checkpoint (fp32): what `_save_checkpoint` keeps of blip2_t5 once
    frozen parameters are dropped, i.e. query_tokens, ln_vision, the Q-Former's query branch and t5_proj, plus
    buffers."""
    g, h = _generator(seed), sizes.qformer_hidden
    sd: dict[str, torch.Tensor] = {
        "query_tokens": _randn(g, 1, sizes.num_query_tokens, h, std=0.5),
        "ln_vision.weight": _randn(g, sizes.vit_width, std=0.1, mean=1.0),
        "ln_vision.bias": _randn(g, sizes.vit_width, std=0.1),
        "Qformer.bert.embeddings.position_ids": torch.arange(512).expand(1, -1).clone(),
    }
    sd["Qformer.bert.embeddings.LayerNorm.weight"], sd["Qformer.bert.embeddings.LayerNorm.bias"] = _norm(g, h)
    for i in range(sizes.qformer_layers):
        p = f"Qformer.bert.encoder.layer.{i}."
        blocks = [("attention.", h)]
        if i % sizes.cross_attention_freq == 0:
            blocks.append(("crossattention.", sizes.vit_width))
        for block, kv_width in blocks:
            sd[p + block + "self.query.weight"], sd[p + block + "self.query.bias"] = _linear(g, h, h, gain=2.0)
            sd[p + block + "self.key.weight"], sd[p + block + "self.key.bias"] = _linear(g, h, kv_width, gain=2.0)
            sd[p + block + "self.value.weight"], sd[p + block + "self.value.bias"] = _linear(g, h, kv_width)
            sd[p + block + "output.dense.weight"], sd[p + block + "output.dense.bias"] = _linear(g, h, h)
            sd[p + block + "output.LayerNorm.weight"], sd[p + block + "output.LayerNorm.bias"] = _norm(g, h)
        sd[p + "intermediate_query.dense.weight"], sd[p + "intermediate_query.dense.bias"] = _linear(
            g, sizes.qformer_intermediate, h)
        sd[p + "output_query.dense.weight"], sd[p + "output_query.dense.bias"] = _linear(g, h, sizes.qformer_intermediate)
        sd[p + "output_query.LayerNorm.weight"], sd[p + "output_query.LayerNorm.bias"] = _norm(g, h)
    sd["t5_proj.weight"], sd["t5_proj.bias"] = _linear(g, sizes.t5_hidden, h)
    return sd


def _adamw_state(params: list[torch.Tensor]) -> dict:
    """An `optimizer.state_dict()` as AdamW writes it (weights_only-loadable: tensors, numbers, tuples)."""
    return {
        "state": {i: {"step": torch.tensor(1000.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
                  for i, p in enumerate(params)},
        "param_groups": [{"lr": 1e-5, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.05, "amsgrad": False,
                          "foreach": None, "maximize": False, "capturable": False, "differentiable": False,
                          "fused": None, "params": list(range(len(params)))}],
    }


def save_blip2_checkpoint(model: dict, path: str | Path, epoch: int = 9) -> Path:
    """LAVIS `RunnerBase._save_checkpoint`'s layout."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    trained = [v for k, v in model.items() if v.is_floating_point()][:4]
    config = {"model": {"arch": "blip2_t5", "model_type": "pretrain_flant5xxl", "freeze_vit": True,
                        "vit_precision": "fp16", "num_query_token": 32, "image_size": 224},
              "run": {"task": "image_text_pretrain", "init_lr": 1e-4, "max_epoch": 10}}
    torch.save({"model": model, "optimizer": _adamw_state(trained), "config": config,
                "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                           "_growth_tracker": 0},
                "epoch": epoch}, path)
    return path


def write_blip2_qformer(path: str | Path, sizes: LavisSizes = TINY, seed: int = 1, **overrides) -> Path:
    """e.g. `write_blip2_qformer(p, vit_width=1408)` for a Q-Former that reads a ViT-g's 1408-wide features."""
    return save_blip2_checkpoint(qformer_state_dict(replace(sizes, **overrides), seed), path)


def write_lavis_pair(folder: str | Path, sizes: LavisSizes = TINY, seed: int = 0, **overrides) -> tuple[Path, Path]:
    """Both LAVIS files in `folder`, under their real names."""
    folder, sizes = Path(folder), replace(sizes, **overrides)
    return (write_eva_vit(folder / "eva_vit_g.pth", sizes, seed),
            write_blip2_qformer(folder / "blip2_pretrained_flant5xxl.pth", sizes, seed + 1))


# ---------------------------------------------------------------- rinna's checkpoint.pth (MiniGPT-4's save format)

def rinna_checkpoint(hidden: int = 64, in_features: int = 768, seed: int = 2, llm_layers: int = 2,
                     mask_size: int = 16, epoch: int = 3) -> dict:
    """What MiniGPT-4's runner saved for rinna: trained `llama_proj` plus every buffer of the frozen model (buffers
    are not parameters, so `_save_checkpoint` keeps them). The real causal mask is bool [1,1,2048,2048]."""
    g = _generator(seed)
    weight, bias = _linear(g, hidden, in_features)
    model: dict[str, torch.Tensor] = {"Qformer.bert.embeddings.position_ids": torch.arange(512).expand(1, -1).clone()}
    for i in range(llm_layers):
        p = f"gpt_neox_model.gpt_neox.layers.{i}.attention."
        model[p + "bias"] = torch.tril(torch.ones(mask_size, mask_size, dtype=torch.bool)).view(1, 1, mask_size, mask_size)
        model[p + "masked_bias"] = torch.tensor(-1e9)
        model[p + "rotary_emb.inv_freq"] = 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8)
    model["llama_proj.weight"], model["llama_proj.bias"] = weight, bias
    config = {"model": {"arch": "bilingual_gpt_neox_4b_minigpt4", "num_query_token": 32, "max_txt_len": 160,
                        "end_sym": "###", "prompt_template": "ユーザー: {} システム: "},
              "run": {"task": "image_text_pretrain", "init_lr": 3e-5, "max_epoch": 5}}
    return {"model": model, "optimizer": _adamw_state([weight, bias]), "config": config, "scaler": None,
            "epoch": epoch}


def write_rinna_checkpoint(path: str | Path, hidden: int = 64, in_features: int = 768, seed: int = 2, **kwargs) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(rinna_checkpoint(hidden, in_features, seed, **kwargs), path)
    return path
