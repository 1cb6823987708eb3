"""Running `generate` in a worker thread with token streaming and a stop that really stops it."""

from __future__ import annotations

import queue
import threading
from dataclasses import asdict, dataclass, fields, replace

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from .errors import InputError


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding controls. Defaults are rinna's card (temperature 1.0, top_p 0.85, up to 512 new tokens).

    temperature 0 means greedy. top_k 50 is the transformers 4.x default that rinna's card ran with.
    """

    max_new_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 0.85
    num_beams: int = 1
    repetition_penalty: float = 1.0
    seed: int | None = None
    top_k: int = 50

    LIMITS = {
        "max_new_tokens": (1, 2048),
        "temperature": (0.0, 5.0),
        "top_p": (0.01, 1.0),
        "num_beams": (1, 8),
        "repetition_penalty": (0.5, 5.0),
        "top_k": (0, 100_000),
    }

    @classmethod
    def from_values(cls, **values) -> "GenerationSettings":
        """Build from loose values (a UI, JSON, the CLI): None means default; anything out of range is an InputError."""
        names = {f.name for f in fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise InputError(f"unknown generation setting(s): {', '.join(sorted(unknown))}")
        clean = {}
        for name, value in values.items():
            if value is None or (name == "seed" and value == ""):
                continue
            kind = int if name in ("max_new_tokens", "num_beams", "seed", "top_k") else float
            try:
                number = kind(value) if kind is float else int(float(value))
            except (TypeError, ValueError):
                raise InputError(f"{name} must be a number, got {value!r}") from None
            if kind is int and float(value) != number:
                raise InputError(f"{name} must be a whole number, got {value!r}")
            clean[name] = number
        return cls(**clean).validated()

    def validated(self) -> "GenerationSettings":
        for name, (low, high) in self.LIMITS.items():
            value = getattr(self, name)
            if not low <= value <= high:
                raise InputError(f"{name} must be between {low} and {high}, got {value}")
        if self.seed is not None and self.seed < 0:
            raise InputError(f"seed must be 0 or more, got {self.seed}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def with_max_new_tokens(self, n: int) -> "GenerationSettings":
        return replace(self, max_new_tokens=n)

    def generate_kwargs(self) -> dict:
        kwargs = dict(max_new_tokens=self.max_new_tokens, num_beams=self.num_beams,
                      repetition_penalty=self.repetition_penalty)
        if self.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or None)
        return kwargs

    def to_dict(self) -> dict:
        return asdict(self)


class StopOnEvent(StoppingCriteria):
    """Ends generation at the next token once `event` is set (the Stop button, a closed stream)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class StopOnText(StoppingCriteria):
    """Ends generation once the decoded new tokens contain `text` (the model starting the user's next turn)."""

    def __init__(self, decode, text: str, window: int = 24):
        self.decode, self.text, self.window = decode, text, window

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = [self.text in self.decode(row[-self.window:].tolist()) for row in input_ids]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class _TokenQueue(BaseStreamer):
    """Receives new token ids from `generate`; the first `put` is the prompt and is skipped."""

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()
        self._prompt_skipped = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_skipped:
            self._prompt_skipped = True
            return
        self.queue.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self.queue.put(None)


_DONE = object()


class GenerationRun:
    """One `generate` call in a worker thread. Iterate to receive lists of new token ids as they are made.

    Leaving the loop early (break, an exception, a closed generator) sets the stop event and waits for the thread,
    so the accelerator is free again before the caller moves on.
    """

    def __init__(self, model, generate_kwargs: dict, stop_event: threading.Event, lock: threading.RLock,
                 seed: int | None, stream: bool = True):
        self.model, self.kwargs, self.stop_event, self.lock, self.seed = model, generate_kwargs, stop_event, lock, seed
        self.streamer = _TokenQueue() if stream else None
        self.output = None
        self.error: BaseException | None = None
        self._done: queue.Queue = queue.Queue()

    def _work(self) -> None:
        try:
            with self.lock, torch.inference_mode():
                if self.seed is not None:
                    torch.manual_seed(self.seed)
                self.output = self.model.generate(**self.kwargs, streamer=self.streamer)
        except BaseException as err:  # handed to the consumer thread, which re-raises it
            self.error = err
        finally:
            if self.streamer is not None:
                self.streamer.queue.put(None)
            self._done.put(_DONE)

    def __iter__(self):
        thread = threading.Thread(target=self._work, name="minigpt4-generate", daemon=True)
        thread.start()
        completed = False
        try:
            if self.streamer is not None:
                while (ids := self.streamer.queue.get()) is not None:
                    yield ids
            self._done.get()
            completed = True
            if self.error is not None:
                raise self.error
            if self.streamer is None:
                yield self.output.sequences[0].tolist()
        finally:
            if not completed:
                self.stop_event.set()
            thread.join()
