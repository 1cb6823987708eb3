"""The model: encode an image once, project its 32 queries into the LLM, splice them into the prompt, generate."""

from __future__ import annotations

import itertools
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from .images import ImageSource, load_image, preprocess
from .templates import PromptTemplate
from .tokenizer import SentencePieceTokenizer
from .vision import VisionEncoder

_image_ids = itertools.count()


@dataclass(eq=False)
class ImageEmbedding:
    """One encoded image: the Q-Former's queries (1,32,768, fp32, CPU) and their projection (1,32,hidden)."""

    queries: torch.Tensor
    embeds: torch.Tensor
    uid: int = -1

    def __post_init__(self):
        if self.uid < 0:
            self.uid = next(_image_ids)

    @property
    def num_tokens(self) -> int:
        return self.embeds.shape[1]


class Pipeline:
    """Frozen encoder + trained projection + frozen LLM, with the tokenizer and prompt template that go with them.

    Load one with `Pipeline.from_preset("bilingual-4b")` (or "tiny" offline), then `pipeline.chat()` for a
    multi-turn session or `pipeline.ask(image, question)` for one answer.
    """

    def __init__(self, encoder: VisionEncoder, projection: nn.Linear, llm, tokenizer: SentencePieceTokenizer,
                 template: PromptTemplate, *, description: str = "", projection_source: str | None = None,
                 max_cached_sessions: int = 4):
        self.encoder, self.projection, self.llm = encoder, projection, llm
        self.projection_source = projection_source  # None: a fresh, untrained projection
        self.tokenizer, self.template, self.description = tokenizer, template, description
        self.lock = threading.RLock()  # one model, one accelerator: one forward pass at a time
        self.max_cached_sessions = max_cached_sessions
        self._sessions_with_cache: OrderedDict[int, weakref.ref] = OrderedDict()

    @classmethod
    def from_preset(cls, preset: str = "bilingual-4b", **options) -> "Pipeline":
        """Load by preset name; keyword options (llm, eva_vit, qformer, projection, weights, template, dtype,
        quantization, device) override it, exactly like the CLI's model options."""
        from .loading import ModelOptions, load_pipeline

        return load_pipeline(ModelOptions(preset=preset, **options))

    # ------------------------------------------------------------------ properties

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    @property
    def embed_dtype(self) -> torch.dtype:
        return self.llm.get_input_embeddings().weight.dtype

    @property
    def context_length(self) -> int:
        return self.llm.config.max_position_embeddings

    @property
    def hidden_size(self) -> int:
        return self.llm.config.hidden_size

    # ------------------------------------------------------------------ encode, project, embed

    @torch.inference_mode()
    def encode_queries(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B,3,224,224) -> Q-Former output (B,32,768), fp32."""
        with self.lock:
            return self.encoder(pixel_values.to(self.encoder.device))

    @torch.inference_mode()
    def project(self, queries: torch.Tensor) -> torch.Tensor:
        """(B,32,768) -> (B,32,hidden) in the LLM's embedding dtype, on its device."""
        weight = self.projection.weight
        out = self.projection(queries.to(weight.device, weight.dtype))
        return out.to(self.device, self.embed_dtype)

    def encode_image(self, image: ImageSource) -> ImageEmbedding:
        """Read, preprocess, encode and project one image. Raises InputError for unreadable images."""
        pixels = preprocess(load_image(image))
        queries = self.encode_queries(pixels)
        return ImageEmbedding(queries=queries.cpu(), embeds=self.project(queries))

    def embed_tokens(self, ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            tensor = torch.tensor([ids], dtype=torch.long, device=self.device)
            return self.llm.get_input_embeddings()(tensor)

    # ------------------------------------------------------------------ chat

    def chat(self, reuse_cache: bool = True):
        from .chat import ChatSession

        return ChatSession(self, reuse_cache=reuse_cache)

    def ask(self, image: ImageSource | ImageEmbedding | None, question: str, settings=None, **values):
        """One stateless question about one image (or none): returns a `Reply`."""
        session = self.chat(reuse_cache=False)
        if image is not None:
            session.add_image(image)
        return session.ask(question, settings, **values)

    # ------------------------------------------------------------------ KV-cache bookkeeping

    def keep_cache(self, session) -> None:
        """Record that `session` holds a KV cache; drop the least recently used ones beyond the limit.

        A cache for a full 2048-token context of rinna's 4B model is about 0.8 GB in fp16, so only a few stay on
        the accelerator; an evicted session simply re-encodes its history on its next turn.
        """
        key = id(session)
        self._sessions_with_cache.pop(key, None)
        self._sessions_with_cache[key] = weakref.ref(session)
        while len(self._sessions_with_cache) > self.max_cached_sessions:
            _, ref = self._sessions_with_cache.popitem(last=False)
            if (old := ref()) is not None:
                old.drop_cache()

    def forget_cache(self, session) -> None:
        self._sessions_with_cache.pop(id(session), None)
