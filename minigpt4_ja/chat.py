"""Multi-turn chat about images, with the KV cache kept between turns.

Each turn renders the whole conversation with the template (as MiniGPT-4 does), tokenizes it, and compares the
resulting sequence of positions with what the cache already holds: only the new suffix is prefilled. The output is
therefore the same as re-encoding the whole conversation, which is what the tests check.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch
from transformers import DynamicCache, StoppingCriteriaList

from .errors import InputError
from .generation import GenerationRun, GenerationSettings, StopOnEvent, StopOnText
from .images import ImageSource
from .pipeline import ImageEmbedding, Pipeline
from .templates import IMAGE_MARKER

MAX_QUESTION_TOKENS = 768


@dataclass
class Turn:
    question: str
    images: list[ImageEmbedding] = field(default_factory=list)
    answer: str | None = None
    answer_ids: list[int] = field(default_factory=list)
    text_dropped: bool = False  # left out of the context to make room; its images stay


@dataclass
class Reply:
    text: str
    token_ids: list[int]
    finish_reason: str  # "eos", "length", "stopped" or "user_turn" (the model began the user's next line)
    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt positions served from the KV cache
    dropped_turns: list[int] = field(default_factory=list)  # indexes of turns whose text left the context
    notices: list[str] = field(default_factory=list)
    time_to_first_token_s: float | None = None
    total_s: float = 0.0


@dataclass
class _Context:
    embeds: torch.Tensor  # (1, L, hidden)
    key: list  # one hashable entry per position: a token id, or (image uid, index)
    max_new_tokens: int
    dropped_turns: list[int]
    notices: list[str]


class ChatSession:
    """One conversation. Not shared between visitors: each holds its own turns, images and KV cache."""

    def __init__(self, pipeline: Pipeline, reuse_cache: bool = True):
        self.pipeline = pipeline
        self.reuse_cache = reuse_cache
        self.turns: list[Turn] = []
        self.pending_images: list[ImageEmbedding] = []
        self._cache: DynamicCache | None = None
        self._cache_key: list = []

    # ------------------------------------------------------------------ images and history

    def add_image(self, image: ImageSource | ImageEmbedding) -> ImageEmbedding:
        """Encode an image now; it joins the next user turn as `<Img><ImageHere></Img>`."""
        embedding = image if isinstance(image, ImageEmbedding) else self.pipeline.encode_image(image)
        self.pending_images.append(embedding)
        return embedding

    def undo(self) -> Turn | None:
        """Remove the last question and its answer (their images go with them)."""
        return self.turns.pop() if self.turns else None

    def reset(self) -> None:
        self.turns.clear()
        self.pending_images.clear()
        self.drop_cache()

    def drop_cache(self) -> None:
        self._cache, self._cache_key = None, []
        self.pipeline.forget_cache(self)

    # ------------------------------------------------------------------ asking

    def ask(self, question: str, settings: GenerationSettings | None = None, **values) -> Reply:
        stream = self.stream(question, settings, **values)
        for _ in stream:
            pass
        return stream.reply

    def stream(self, question: str, settings: GenerationSettings | None = None, **values) -> "ReplyStream":
        """Start answering `question`; iterate the result for the answer so far. See `ReplyStream`."""
        settings = settings or GenerationSettings.from_values(**values)
        settings = settings.validated()
        question, notices = self._clean_question(question)
        self.turns.append(Turn(question=question, images=self.pending_images))
        self.pending_images = []
        return ReplyStream(self, settings, notices)

    def regenerate(self, settings: GenerationSettings | None = None, **values) -> "ReplyStream":
        """Answer the last question again (with new sampling unless the seed is fixed)."""
        if not self.turns:
            raise InputError("there is no question to answer again")
        last = self.turns.pop()
        self.pending_images = last.images + self.pending_images
        return self.stream(last.question, settings, **values)

    def _clean_question(self, question: str) -> tuple[str, list[str]]:
        question = (question or "").strip()
        if not question and not self.pending_images:
            raise InputError("the question is empty: type a question, or add an image to get a caption")
        notices = []
        ids = self.pipeline.tokenizer.encode(question)
        if len(ids) > MAX_QUESTION_TOKENS:
            question = self.pipeline.tokenizer.decode(ids[:MAX_QUESTION_TOKENS]).strip()
            notices.append(f"The question was {len(ids)} tokens long and was cut to {MAX_QUESTION_TOKENS}. "
                           f"(質問が長すぎるため {MAX_QUESTION_TOKENS} トークンに切り詰めました)")
        return question, notices

    # ------------------------------------------------------------------ building the context

    def _render(self) -> tuple[list[str], list[ImageEmbedding]]:
        """Prompt text split at each image, and the images in order."""
        template = self.pipeline.template
        utterances, images = [], []
        for turn in self.turns:
            if turn.text_dropped:
                if turn.images:
                    utterances.append(template.user_utterance("", len(turn.images)))
                    images.extend(turn.images)
                continue
            utterances.append(template.user_utterance(turn.question, len(turn.images)))
            images.extend(turn.images)
            if turn.answer is not None:
                utterances.append(template.assistant_utterance(turn.answer))
        segments = template.render(utterances).split(IMAGE_MARKER)
        assert len(segments) == len(images) + 1
        return segments, images

    def _positions(self) -> tuple[list[list[int]], list[ImageEmbedding], int]:
        segments, images = self._render()
        ids = [self.pipeline.tokenizer.encode(s) for s in segments]
        return ids, images, sum(map(len, ids)) + sum(img.num_tokens for img in images)

    def _build_context(self, settings: GenerationSettings, notices: list[str]) -> _Context:
        """Fit the conversation into the LLM's window: drop the oldest turns' text first (never images, never the
        current question), then shorten the answer budget, and say what was done."""
        limit = self.pipeline.context_length
        ids, images, length = self._positions()
        dropped = []
        for index, turn in enumerate(self.turns[:-1]):
            if length + settings.max_new_tokens <= limit:
                break
            if not turn.text_dropped:
                turn.text_dropped = True
                dropped.append(index)
                ids, images, length = self._positions()
        if dropped:
            notices.append(f"The conversation was too long: the text of {len(dropped)} earlier turn(s) was left out "
                           f"(images are kept). (会話が長いため古い発言 {len(dropped)} 件を省きました)")
        max_new_tokens = settings.max_new_tokens
        if length + max_new_tokens > limit:
            max_new_tokens = limit - length
            if max_new_tokens < 1:
                raise InputError(f"the conversation needs {length} positions, more than the model's {limit}: "
                                 "start a new conversation or use fewer images")
            notices.append(f"The answer is limited to {max_new_tokens} tokens to fit the model's {limit}-token window.")
        key, pieces = [], []
        for i, segment_ids in enumerate(ids):
            key.extend(segment_ids)
            if segment_ids:
                pieces.append(self.pipeline.embed_tokens(segment_ids))
            if i < len(images):
                key.extend((images[i].uid, j) for j in range(images[i].num_tokens))
                pieces.append(images[i].embeds.to(self.pipeline.device, self.pipeline.embed_dtype))
        return _Context(torch.cat(pieces, dim=1), key, max_new_tokens, dropped, notices)

    def _prepare_cache(self, key: list, use_cache: bool) -> tuple[DynamicCache, int]:
        """The cache cropped to the longest prefix it shares with `key` (at least one position left to prefill)."""
        if not (use_cache and self.reuse_cache and self._cache is not None):
            self.drop_cache()
            return DynamicCache(), 0
        common = 0
        for cached, new in zip(self._cache_key, key):
            if cached != new:
                break
            common += 1
        common = min(common, len(key) - 1)
        cached_length = self._cache.get_seq_length()
        if cached_length > common:
            self._cache.crop(common - cached_length)  # a negative count removes that many positions
        return self._cache, common


class ReplyStream:
    """Iterate for the answer text so far (each item is the whole text, growing). `stop()` ends generation within a
    token from any thread; closing the iterator early does the same. `reply` holds the final `Reply` afterwards."""

    def __init__(self, session: ChatSession, settings: GenerationSettings, notices: list[str]):
        self.session, self.settings, self.notices = session, settings, notices
        self.stop_event = threading.Event()
        self.reply: Reply | None = None

    def stop(self) -> None:
        self.stop_event.set()

    def __iter__(self) -> Iterator[str]:
        session, pipeline = self.session, self.session.pipeline
        turn = session.turns[-1]
        started = time.perf_counter()
        try:
            context = session._build_context(self.settings, self.notices)
        except BaseException:
            session.turns.pop()
            session.pending_images = turn.images + session.pending_images
            raise
        beams = self.settings.num_beams > 1  # beam search reorders and widens the cache: no reuse, no streaming
        cache, reused = session._prepare_cache(context.key, use_cache=not beams)
        template, tokenizer = pipeline.template, pipeline.tokenizer
        user_cue = f"{template.separator}{template.user}:"
        kwargs = dict(
            inputs_embeds=context.embeds,
            attention_mask=torch.ones(context.embeds.shape[:2], dtype=torch.long, device=pipeline.device),
            past_key_values=None if beams else cache,
            stopping_criteria=StoppingCriteriaList([StopOnEvent(self.stop_event), StopOnText(tokenizer.decode, user_cue)]),
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            return_dict_in_generate=True,
            **self.settings.with_max_new_tokens(context.max_new_tokens).generate_kwargs(),
        )
        run = GenerationRun(pipeline.llm, kwargs, self.stop_event, pipeline.lock, self.settings.seed, stream=not beams)
        new_ids: list[int] = []
        first_token_at = None
        finished, closed_early = False, False
        tokens = iter(run)
        try:
            for ids in tokens:
                if first_token_at is None:
                    first_token_at = time.perf_counter()
                new_ids.extend(ids)
                yield clean_answer(tokenizer.decode(new_ids), template, streaming=True)
            finished = True
        except BaseException:
            if run.error is not None:  # the model failed (out of memory, ...): forget this turn entirely
                tokens.close()
                session.turns.pop()
                session.pending_images = turn.images + session.pending_images
                session.drop_cache()
                raise
            finished = closed_early = True  # closed by the consumer: keep what was said so far
            raise
        finally:
            stopped = closed_early or self.stop_event.is_set()
            tokens.close()  # sets the stop event and joins the generation thread
            if finished:
                self._finish(turn, context, cache, reused, new_ids, stopped, started, first_token_at, beams)

    def _finish(self, turn, context, cache, reused, new_ids, stopped, started, first_token_at, beams) -> None:
        session, pipeline = self.session, self.session.pipeline
        tokenizer, template = pipeline.tokenizer, pipeline.template
        text = clean_answer(tokenizer.decode(new_ids), template)
        if stopped and not _ended_by_eos(new_ids, tokenizer) and len(new_ids) < context.max_new_tokens:
            reason = "stopped"
        elif _ended_by_eos(new_ids, tokenizer):
            reason = "eos"
        elif f"{template.separator}{template.user}:" in tokenizer.decode(new_ids):
            reason = "user_turn"
        else:
            reason = "length"
        turn.answer, turn.answer_ids = text, list(new_ids)
        if beams or not session.reuse_cache:
            session.drop_cache()
        else:
            fed = cache.get_seq_length() - len(context.key)
            session._cache, session._cache_key = cache, context.key + new_ids[:max(fed, 0)]
            pipeline.keep_cache(session)
        self.reply = Reply(
            text=text, token_ids=list(new_ids), finish_reason=reason, prompt_tokens=len(context.key),
            reused_tokens=reused, dropped_turns=context.dropped_turns, notices=context.notices,
            time_to_first_token_s=None if first_token_at is None else first_token_at - started,
            total_s=time.perf_counter() - started,
        )


def _ended_by_eos(ids: list[int], tokenizer) -> bool:
    return bool(ids) and ids[-1] == tokenizer.eos_token_id


def clean_answer(text: str, template, streaming: bool = False) -> str:
    """Model text as people should see it: no special-token strings, no start of a fake user turn, template
    newlines restored. While streaming, hold back an unfinished multi-byte character or a half-written marker."""
    cue = f"{template.separator}{template.user}:"
    if cue in text:
        text = text[: text.index(cue)]
    for token in ("<s>", "</s>", "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<unk>", "<pad>"):
        text = text.replace(token, "")
    if streaming:
        text = text.rstrip("\ufffd")
        for marker in (cue, template.newline):
            for n in range(min(len(marker), len(text)), 0, -1):
                if len(marker) > 1 and text.endswith(marker[:n]):
                    text = text[:-n]
                    break
    text = template.decode_text(text)
    return text.strip() if not streaming else text.lstrip()
