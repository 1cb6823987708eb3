"""An independent, plain-torch re-implementation of LAVIS's BLIP-2 image side, for numerical-equivalence tests.

It reads LAVIS's own parameter names (`eva_vit_g.pth` flat keys, `blip2_pretrained_flant5xxl.pth`["model"] keys) and
follows LAVIS's code line by line (lavis/models/eva_vit.py `VisionTransformer`, lavis/models/blip2_models/blip2.py
`LayerNorm` as ln_vision, lavis/models/blip2_models/Qformer.py `BertModel` with query embeddings only). It does not
import anything from `minigpt4_ja` and does not use transformers: whatever the library gets wrong in its key renaming,
bias fusing, layer selection or epsilons shows up as a numerical difference.

All arithmetic is float32 (weights stored in fp16 are upcast), eval mode (dropouts and drop-path are identities).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F

EVA_LAYER_NORM_EPS = 1e-6  # partial(nn.LayerNorm, eps=1e-6) in create_eva_vit_g
LN_VISION_EPS = 1e-5  # Blip2Base.init_vision_encoder: LayerNorm(num_features), torch's default eps
BERT_LAYER_NORM_EPS = 1e-12  # bert-base-uncased's layer_norm_eps
CROSS_ATTENTION_FREQ = 2  # Blip2Base.init_Qformer(cross_attention_freq=2)


def load_eva_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """`eva_vit_g.pth` is a flat state dict (no wrapper)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def load_blip2_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """`blip2_pretrained_flant5xxl.pth` is LAVIS's runner checkpoint: the weights sit under "model"."""
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _f(t: torch.Tensor) -> torch.Tensor:
    return t.float()


# ---------------------------------------------------------------- EVA ViT (lavis/models/eva_vit.py)

def eva_attention(sd: dict, prefix: str, x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """`Attention.forward` without relative position bias (create_eva_vit_g uses none)."""
    B, N, C = x.shape
    q_bias = sd[prefix + "q_bias"]
    v_bias = sd[prefix + "v_bias"]
    qkv_bias = torch.cat((_f(q_bias), torch.zeros_like(_f(v_bias)), _f(v_bias)))
    qkv = F.linear(input=x, weight=_f(sd[prefix + "qkv.weight"]), bias=qkv_bias)
    qkv = qkv.reshape(B, N, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    head_dim = q.shape[-1]
    q = q * head_dim ** -0.5
    attn = q @ k.transpose(-2, -1)
    attn = attn.softmax(dim=-1)
    x = (attn @ v).transpose(1, 2).reshape(B, N, -1)
    return F.linear(x, _f(sd[prefix + "proj.weight"]), _f(sd[prefix + "proj.bias"]))


def eva_mlp(sd: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    x = F.linear(x, _f(sd[prefix + "fc1.weight"]), _f(sd[prefix + "fc1.bias"]))
    x = F.gelu(x)  # nn.GELU(): the exact erf form
    return F.linear(x, _f(sd[prefix + "fc2.weight"]), _f(sd[prefix + "fc2.bias"]))


def eva_layer_norm(sd: dict, prefix: str, x: torch.Tensor, eps: float = EVA_LAYER_NORM_EPS) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], _f(sd[prefix + "weight"]), _f(sd[prefix + "bias"]), eps)


def eva_block(sd: dict, index: int, x: torch.Tensor, num_heads: int, eps: float = EVA_LAYER_NORM_EPS) -> torch.Tensor:
    """`Block.forward` with gamma_1 = gamma_2 = None (init_values=None) and no drop path at eval."""
    p = f"blocks.{index}."
    x = x + eva_attention(sd, p + "attn.", eva_layer_norm(sd, p + "norm1.", x, eps), num_heads)
    x = x + eva_mlp(sd, p + "mlp.", eva_layer_norm(sd, p + "norm2.", x, eps))
    return x


def eva_num_blocks(sd: dict) -> int:
    return len({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})


def eva_vit_forward(sd: dict, images: torch.Tensor, depth: int, num_heads: int,
                    eps: float = EVA_LAYER_NORM_EPS) -> torch.Tensor:
    """`VisionTransformer.forward_features` for the first `depth` blocks; no final norm (it is commented out in
    LAVIS). Returns (B, 1 + num_patches, width)."""
    if depth > eva_num_blocks(sd):
        raise ValueError(f"the state dict has {eva_num_blocks(sd)} blocks, {depth} asked for")
    weight = _f(sd["patch_embed.proj.weight"])
    patch = weight.shape[-1]
    x = F.conv2d(images.float(), weight, _f(sd["patch_embed.proj.bias"]), stride=patch)
    x = x.flatten(2).transpose(1, 2)
    cls_tokens = _f(sd["cls_token"]).expand(x.shape[0], -1, -1)
    x = torch.cat((cls_tokens, x), dim=1)
    x = x + _f(sd["pos_embed"])
    for index in range(depth):
        x = eva_block(sd, index, x, num_heads, eps)
    return x


def ln_vision(blip2_sd: dict, x: torch.Tensor, eps: float = LN_VISION_EPS) -> torch.Tensor:
    """blip2.py's `LayerNorm(nn.LayerNorm)`: computed in float32, cast back to the input dtype."""
    orig_type = x.dtype
    out = F.layer_norm(x.float(), x.shape[-1:], _f(blip2_sd["ln_vision.weight"]), _f(blip2_sd["ln_vision.bias"]), eps)
    return out.type(orig_type)


# ---------------------------------------------------------------- Q-Former (lavis/models/blip2_models/Qformer.py)

def bert_self_attention(sd: dict, prefix: str, hidden: torch.Tensor, num_heads: int,
                        encoder_hidden: torch.Tensor | None = None) -> torch.Tensor:
    """`BertSelfAttention.forward` (absolute position embeddings, an all-ones mask that adds zeros)."""
    def linear(name, x):
        return F.linear(x, _f(sd[prefix + name + ".weight"]), _f(sd[prefix + name + ".bias"]))

    def heads(x):
        B, N, C = x.shape
        return x.view(B, N, num_heads, C // num_heads).permute(0, 2, 1, 3)

    source = hidden if encoder_hidden is None else encoder_hidden
    query = heads(linear("query", hidden))
    key = heads(linear("key", source))
    value = heads(linear("value", source))
    head_size = query.shape[-1]
    scores = torch.matmul(query, key.transpose(-1, -2))
    scores = scores / math.sqrt(head_size)
    scores = scores + torch.zeros(scores.shape[0], 1, 1, scores.shape[-1])  # (1.0 - ones) * -10000.0
    probs = F.softmax(scores, dim=-1)
    context = torch.matmul(probs, value).permute(0, 2, 1, 3).contiguous()
    return context.view(*context.shape[:2], -1)


def bert_output(sd: dict, prefix: str, hidden: torch.Tensor, residual: torch.Tensor,
                eps: float = BERT_LAYER_NORM_EPS) -> torch.Tensor:
    """`BertSelfOutput` / `BertOutput`: dense, dropout (no-op), LayerNorm(hidden + input_tensor)."""
    hidden = F.linear(hidden, _f(sd[prefix + "dense.weight"]), _f(sd[prefix + "dense.bias"]))
    return F.layer_norm(hidden + residual, hidden.shape[-1:], _f(sd[prefix + "LayerNorm.weight"]),
                        _f(sd[prefix + "LayerNorm.bias"]), eps)


def bert_attention(sd: dict, prefix: str, hidden: torch.Tensor, num_heads: int,
                   encoder_hidden: torch.Tensor | None = None, eps: float = BERT_LAYER_NORM_EPS) -> torch.Tensor:
    context = bert_self_attention(sd, prefix + "self.", hidden, num_heads, encoder_hidden)
    return bert_output(sd, prefix + "output.", context, hidden, eps)


def qformer_num_layers(sd: dict) -> int:
    return len({int(m.group(1)) for k in sd if (m := re.match(r"Qformer\.bert\.encoder\.layer\.(\d+)\.", k))})


def qformer_forward(blip2_sd: dict, image_embeds: torch.Tensor, num_heads: int,
                    cross_attention_freq: int = CROSS_ATTENTION_FREQ, eps: float = BERT_LAYER_NORM_EPS) -> torch.Tensor:
    """`Qformer.bert(query_embeds=query_tokens.expand(B,-1,-1), encoder_hidden_states=image_embeds,
    encoder_attention_mask=ones)`.last_hidden_state for queries only (no text input)."""
    B = image_embeds.shape[0]
    query_embeds = _f(blip2_sd["query_tokens"]).expand(B, -1, -1)
    # BertEmbeddings.forward with input_ids=None: embeddings = query_embeds -> LayerNorm -> dropout
    e = "Qformer.bert.embeddings.LayerNorm."
    hidden = F.layer_norm(query_embeds, query_embeds.shape[-1:], _f(blip2_sd[e + "weight"]), _f(blip2_sd[e + "bias"]),
                          eps)
    image_embeds = image_embeds.float()
    for layer_num in range(qformer_num_layers(blip2_sd)):
        p = f"Qformer.bert.encoder.layer.{layer_num}."
        attention_output = bert_attention(blip2_sd, p + "attention.", hidden, num_heads, eps=eps)
        if layer_num % cross_attention_freq == 0:  # BertLayer: add_cross_attention and layer_num % freq == 0
            attention_output = bert_attention(blip2_sd, p + "crossattention.", attention_output, num_heads,
                                              encoder_hidden=image_embeds, eps=eps)
        intermediate = F.gelu(F.linear(attention_output, _f(blip2_sd[p + "intermediate_query.dense.weight"]),
                                       _f(blip2_sd[p + "intermediate_query.dense.bias"])))
        hidden = bert_output(blip2_sd, p + "output_query.", intermediate, attention_output, eps)
    return hidden


# ---------------------------------------------------------------- everything: Blip2Base.encode_img's image side

def encode_image(eva_sd: dict, blip2_sd: dict, images: torch.Tensor, *, vit_depth: int, vit_heads: int,
                 qformer_heads: int = 12, cross_attention_freq: int = CROSS_ATTENTION_FREQ,
                 ln_vision_eps: float = LN_VISION_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """images (B,3,H,W) -> (image_embeds = ln_vision(visual_encoder(images)), queries (B,32,hidden))."""
    with torch.no_grad():
        image_embeds = ln_vision(blip2_sd, eva_vit_forward(eva_sd, images, vit_depth, vit_heads), ln_vision_eps)
        queries = qformer_forward(blip2_sd, image_embeds, qformer_heads, cross_attention_freq)
    return image_embeds, queries
