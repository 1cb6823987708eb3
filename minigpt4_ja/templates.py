"""Chat prompt formats. rinna's card: `ユーザー: <Img><ImageHere></Img> {question}` turns joined by a newline,
ending in `システム: ` (with its trailing space). The original 3.6b article's LLM cannot tokenize newlines, so its
template joins turns with `<NL>` and writes newlines inside utterances as `<NL>` too."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InputError

IMAGE_MARKER = "<ImageHere>"
IMAGE_PLACEHOLDER = f"<Img>{IMAGE_MARKER}</Img>"


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    user: str = "ユーザー"
    assistant: str = "システム"
    separator: str = "\n"
    newline: str = "\n"  # how a newline inside an utterance is written

    def user_utterance(self, question: str, num_images: int) -> str:
        parts = [IMAGE_PLACEHOLDER] * num_images + ([self.encode_text(question)] if question else [])
        return f"{self.user}: " + " ".join(parts)

    def assistant_utterance(self, answer: str) -> str:
        return f"{self.assistant}: {self.encode_text(answer)}"

    def render(self, utterances: list[str]) -> str:
        """Join finished utterances and cue the assistant: `...\\nシステム: `."""
        return self.separator.join([*utterances, f"{self.assistant}: "])

    def encode_text(self, text: str) -> str:
        # The image marker in user text would be spliced as an image: neutralise it.
        text = text.replace(IMAGE_MARKER, "<ImageHere >")
        return text.replace("\n", self.newline) if self.newline != "\n" else text

    def decode_text(self, text: str) -> str:
        return text.replace(self.newline, "\n") if self.newline != "\n" else text


TEMPLATES: dict[str, PromptTemplate] = {
    "bilingual": PromptTemplate("bilingual"),
    "japanese-3.6b": PromptTemplate("japanese-3.6b", separator="<NL>", newline="<NL>"),
}


def get_template(name: str) -> PromptTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise InputError(f"unknown template {name!r}; choose one of: {', '.join(TEMPLATES)}") from None
