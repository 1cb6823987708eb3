"""Training and evaluation data: four layouts read into one form, with every bad row counted and named.

Layouts (auto-detected, or forced with `--data-format`):

- `jsonl`: one JSON object per line: `{"image": path, "caption": text}` (a caption), or
  `{"image": path, "question": text, "answer": text}` (VQA; `answer` may be a list of references), or a LLaVA row.
  A JSON *list* of such objects is read the same way.
- `llava`: a JSON list of `{"image": path, "conversations": [{"from": "human", "value": "<image>\\n..."},
  {"from": "gpt", "value": ...}, ...]}`; multi-turn, every answer supervised.
- `coco`: STAIR Captions / COCO captions: `{"images": [{"id", "file_name"}], "annotations": [{"image_id",
  "caption"}]}`. Without `images` (MiniGPT-4's cc_sbu_align `filter_cap.json`) images are named by id.
- `jvg`: the Japanese Visual Genome VQA layout: a list of `{"id" or "image_id", "qas": [{"question", "answer",
  ...}]}` with images named by id (`{image_id}.jpg`, also looked for under `VG_100K/` and `VG_100K_2/`).

Image paths are relative to `--image-root` (default: the data file's folder). A row that cannot be used (broken JSON,
missing field, empty text, missing image...) is counted under its reason, and the first few are reported with their
line or row number; nothing is dropped silently. A missing data file or image root is an error that names the path.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError

FORMATS = ("jsonl", "llava", "coco", "jvg")
DEFAULT_IMAGE_PATTERN = "{image_id}.jpg"
VG_SUBFOLDERS = ("", "VG_100K", "VG_100K_2", "images")
HUMAN_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")
LLAVA_IMAGE_TOKEN = "<image>"
MAX_REPORTED = 5  # bad rows quoted in full; the rest are only counted


@dataclass
class Turn:
    """One question (empty for a caption) and its answer; `num_images` images are shown in this user turn."""

    question: str
    answer: str
    num_images: int = 0
    references: tuple[str, ...] = ()  # every accepted answer (evaluation); defaults to (answer,)

    @property
    def all_answers(self) -> tuple[str, ...]:
        return self.references or (self.answer,)


@dataclass
class Example:
    images: list[Path]
    turns: list[Turn]
    source: str  # where it came from, for messages: "captions.jsonl line 3"


@dataclass
class DataReport:
    """What was read from one data file: rows seen, examples kept, bad rows by reason (first few in full)."""

    path: str
    format: str = "?"
    image_root: str = ""
    rows: int = 0
    examples: int = 0
    bad: Counter = field(default_factory=Counter)
    first_bad: list[str] = field(default_factory=list)

    @property
    def bad_rows(self) -> int:
        return sum(self.bad.values())

    def add_bad(self, where: str, reason: str, detail: str = "") -> None:
        self.bad[reason] += 1
        if len(self.first_bad) < MAX_REPORTED:
            self.first_bad.append(f"{where}: {reason}" + (f" ({detail})" if detail else ""))

    def describe(self) -> str:
        text = f"{self.path} ({self.format}): {self.rows} rows, {self.examples} examples"
        if not self.bad:
            return text + ", no bad rows"
        reasons = ", ".join(f"{count} {reason}" for reason, count in self.bad.most_common())
        text += f"; {self.bad_rows} bad rows skipped: {reasons}"
        return text + "".join(f"\n  - {line}" for line in self.first_bad) + (
            f"\n  - ... and {self.bad_rows - len(self.first_bad)} more" if self.bad_rows > len(self.first_bad) else "")

    def to_dict(self) -> dict:
        return {"path": self.path, "format": self.format, "image_root": self.image_root, "rows": self.rows,
                "examples": self.examples, "bad_rows": self.bad_rows, "bad_reasons": dict(self.bad),
                "first_bad": list(self.first_bad)}


class _BadRow(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


# ---------------------------------------------------------------- entry point

def load_dataset(path: str | Path, image_root: str | Path | None = None, data_format: str = "auto",
                 image_pattern: str = DEFAULT_IMAGE_PATTERN, check_images: bool = True
                 ) -> tuple[list[Example], DataReport]:
    """Read one data file. Returns the usable examples and a report of what was skipped and why.

    Raises InputError when the file or image root does not exist, the format cannot be told, or no row is usable.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"data file {path} does not exist" if not path.exists() else f"data file {path} is not a file")
    root = Path(image_root) if image_root else path.parent
    if not root.is_dir():
        raise InputError(f"image root {root} does not exist or is not a folder (set --image-root)")
    if data_format not in ("auto", *FORMATS):
        raise InputError(f"unknown data format {data_format!r}; choose one of: auto, {', '.join(FORMATS)}")
    report = DataReport(path=str(path), image_root=str(root))
    reader = _Reader(root, report, image_pattern, check_images)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"data file {path} cannot be read as UTF-8 text ({err})") from err

    document, parse_error = None, None
    if data_format != "jsonl" and not (data_format == "auto" and path.suffix.lower() == ".jsonl"):
        try:
            document = json.loads(text)
        except json.JSONDecodeError as err:
            parse_error = err
    if document is None:
        if data_format not in ("auto", "jsonl"):
            raise InputError(f"data file {path} is not valid JSON ({parse_error}); "
                             "is it JSONL? try --data-format jsonl")
        report.format = "jsonl"
        examples = reader.jsonl_lines(text)
    else:
        fmt = data_format if data_format != "auto" else _detect(document, path)
        report.format = fmt
        if fmt == "coco":
            examples = reader.coco(document)
        elif fmt == "jvg":
            examples = reader.jvg(_as_list(document, path, fmt))
        elif fmt == "llava":
            examples = reader.rows(_as_list(document, path, fmt), llava_only=True)
        else:
            examples = reader.rows(_as_list(document, path, fmt))
    report.examples = len(examples)
    if not examples:
        details = "; ".join(report.first_bad) or "the file holds no rows"
        raise InputError(f"no usable rows in {path} (format {report.format}): {details}")
    return examples, report


def _as_list(document, path: Path, fmt: str) -> list:
    if isinstance(document, dict):
        for key in ("data", "rows", "annotations"):  # a list wrapped in an object
            if isinstance(document.get(key), list):
                return document[key]
    if not isinstance(document, list):
        raise InputError(f"data file {path} is not a JSON list, as the {fmt} format expects")
    return document


def _detect(document, path: Path) -> str:
    if isinstance(document, dict) and isinstance(document.get("annotations"), list):
        return "coco"
    if isinstance(document, list):
        first = next((row for row in document if isinstance(row, dict)), None)
        if first is None:
            return "jsonl"  # every row is bad (or there are none): the row reader reports them
        if "qas" in first:
            return "jvg"
        if "conversations" in first:
            return "llava"
        if "caption" in first or "question" in first or "answer" in first:
            return "jsonl"
    raise InputError(
        f"cannot tell the layout of {path}: expected JSONL rows, a LLaVA list (conversations), COCO/STAIR captions "
        "(images + annotations) or Japanese Visual Genome VQA (qas); pass --data-format")


def _text(value, name: str) -> str:
    if value is None:
        raise _BadRow(f"missing '{name}'")
    if not isinstance(value, str):
        raise _BadRow(f"'{name}' is not text", type(value).__name__)
    value = value.strip()
    if not value:
        raise _BadRow(f"empty '{name}'")
    return value


class _Reader:
    def __init__(self, root: Path, report: DataReport, image_pattern: str, check_images: bool):
        self.root, self.report, self.image_pattern, self.check_images = root, report, image_pattern, check_images
        self._exists: dict[Path, bool] = {}

    # ------------------------------------------------------------ images

    def image(self, value) -> Path:
        if isinstance(value, list):
            raise _BadRow("several images in one row are not supported")
        name = _text(value, "image")
        path = self.root / name
        if self.check_images and not self._is_file(path):
            raise _BadRow("image not found", str(path))
        return path

    def image_by_id(self, image_id) -> Path:
        if image_id is None or isinstance(image_id, (list, dict, bool)) or str(image_id).strip() == "":
            raise _BadRow("missing image id")
        name = self.image_pattern.format(image_id=image_id)
        candidates = [self.root / sub / name if sub else self.root / name for sub in VG_SUBFOLDERS]
        if not self.check_images:
            return candidates[0]
        for candidate in candidates:
            if self._is_file(candidate):
                return candidate
        raise _BadRow("image not found", str(candidates[0]))

    def _is_file(self, path: Path) -> bool:
        if path not in self._exists:
            self._exists[path] = path.is_file()
        return self._exists[path]

    # ------------------------------------------------------------ row layouts

    def jsonl_lines(self, text: str) -> list[Example]:
        examples = []
        name = Path(self.report.path).name
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            self.report.rows += 1
            where = f"line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                self.report.add_bad(where, "invalid JSON", err.msg)
                continue
            self._row(row, f"{name} {where}", where, examples, llava_only=False)
        return examples

    def rows(self, rows: list, llava_only: bool = False) -> list[Example]:
        examples = []
        name = Path(self.report.path).name
        for number, row in enumerate(rows, start=1):
            self.report.rows += 1
            self._row(row, f"{name} row {number}", f"row {number}", examples, llava_only)
        return examples

    def _row(self, row, source: str, where: str, out: list, llava_only: bool) -> None:
        try:
            if not isinstance(row, dict):
                raise _BadRow("not a JSON object", type(row).__name__)
            if "conversations" in row:
                out.append(self._llava(row, source))
            elif llava_only:
                raise _BadRow("missing 'conversations'")
            elif "caption" in row:
                caption = _text(row.get("caption"), "caption")
                out.append(Example([self.image(row.get("image"))], [Turn("", caption, 1)], source))
            elif "question" in row or "answer" in row or "answers" in row:
                question = _text(row.get("question"), "question")
                answers = row.get("answers", row.get("answer"))
                references = tuple(_text(a, "answer") for a in answers) if isinstance(answers, list) else (
                    _text(answers, "answer"),)
                if not references:
                    raise _BadRow("empty 'answer'")
                out.append(Example([self.image(row.get("image"))],
                                   [Turn(question, references[0], 1, references)], source))
            else:
                raise _BadRow("no 'caption', 'question'/'answer' or 'conversations'", ", ".join(list(row)[:6]))
        except _BadRow as bad:
            self.report.add_bad(where, bad.reason, bad.detail)

    def _llava(self, row: dict, source: str) -> Example:
        if "image" not in row or row["image"] in (None, ""):
            raise _BadRow("no image (text-only conversations train nothing here)")
        image = self.image(row["image"])
        messages = row["conversations"]
        if not isinstance(messages, list) or not messages:
            raise _BadRow("'conversations' is not a non-empty list")
        turns: list[Turn] = []
        question = None
        image_turn, markers = 0, 0
        for index, message in enumerate(messages):
            if not isinstance(message, dict):
                raise _BadRow("a message is not an object", f"message {index + 1}")
            role = str(message.get("from", message.get("role", ""))).lower()
            value = message.get("value", message.get("content"))
            if role in HUMAN_ROLES:
                if question is not None:
                    raise _BadRow("two human messages in a row", f"message {index + 1}")
                if not isinstance(value, str):
                    raise _BadRow("a message has no text", f"message {index + 1}")
                if LLAVA_IMAGE_TOKEN in value:
                    markers += value.count(LLAVA_IMAGE_TOKEN)
                    image_turn = len(turns)
                question = value.replace(LLAVA_IMAGE_TOKEN, "").strip()
            elif role in ASSISTANT_ROLES:
                if question is None:
                    raise _BadRow("an answer without a question", f"message {index + 1}")
                try:
                    answer = _text(value, "value")
                except _BadRow:
                    raise _BadRow("empty answer", f"message {index + 1}") from None
                turns.append(Turn(question, answer))
                question = None
            else:
                raise _BadRow("unknown speaker", f"message {index + 1}: {role or 'none'}")
        if not turns:
            raise _BadRow("no answer to learn from")
        if markers > 1:
            raise _BadRow("more than one <image> for one image")
        turns[image_turn].num_images = 1
        return Example([image], turns, source)

    def coco(self, document: dict) -> list[Example]:
        name = Path(self.report.path).name
        files = None
        if isinstance(document.get("images"), list):
            files = {}
            for image in document["images"]:
                if isinstance(image, dict) and "id" in image and isinstance(image.get("file_name"), str):
                    files[str(image["id"])] = image["file_name"]  # ids may be numbers or strings
        examples = []
        for number, annotation in enumerate(document["annotations"], start=1):
            self.report.rows += 1
            where = f"annotation {number}"
            try:
                if not isinstance(annotation, dict):
                    raise _BadRow("not a JSON object", type(annotation).__name__)
                caption = _text(annotation.get("caption"), "caption")
                image_id = annotation.get("image_id")
                if files is None:
                    image = self.image_by_id(image_id)
                elif str(image_id) in files:
                    image = self.image(files[str(image_id)])
                else:
                    raise _BadRow("image_id not listed in 'images'", str(image_id))
                examples.append(Example([image], [Turn("", caption, 1)], f"{name} {where}"))
            except _BadRow as bad:
                self.report.add_bad(where, bad.reason, bad.detail)
        return examples

    def jvg(self, entries: list) -> list[Example]:
        name = Path(self.report.path).name
        examples = []
        for number, entry in enumerate(entries, start=1):
            where = f"row {number}"
            if not isinstance(entry, dict) or not isinstance(entry.get("qas"), list):
                self.report.rows += 1
                self.report.add_bad(where, "not an object with a 'qas' list")
                continue
            image_id = entry.get("image_id", entry.get("id"))
            image, image_error = None, None
            try:
                image = self.image(entry["image"]) if entry.get("image") else self.image_by_id(image_id)
            except _BadRow as bad:
                image_error = bad
            for qa_number, qa in enumerate(entry["qas"], start=1):
                self.report.rows += 1
                qa_where = f"{where} (image {image_id}) qa {qa_number}"
                try:
                    if image_error is not None:
                        raise image_error
                    if not isinstance(qa, dict):
                        raise _BadRow("not a JSON object", type(qa).__name__)
                    question, answer = _text(qa.get("question"), "question"), _text(qa.get("answer"), "answer")
                    examples.append(Example([image], [Turn(question, answer, 1)], f"{name} {qa_where}"))
                except _BadRow as bad:
                    self.report.add_bad(qa_where, bad.reason, bad.detail)
        return examples


def load_datasets(paths: list[str], image_roots: list[str] | None, data_format: str = "auto",
                  image_pattern: str = DEFAULT_IMAGE_PATTERN) -> tuple[list[Example], list[DataReport]]:
    """Several data files: one image root for all, or one per file (in order)."""
    roots = list(image_roots or [])
    if len(roots) > 1 and len(roots) != len(paths):
        raise InputError(f"{len(paths)} --data files but {len(roots)} --image-root folders: give one root for all, "
                         "or one per data file in the same order")
    examples, reports = [], []
    for index, path in enumerate(paths):
        root = roots[index] if len(roots) > 1 else (roots[0] if roots else None)
        found, report = load_dataset(path, root, data_format, image_pattern)
        examples.extend(found)
        reports.append(report)
    return examples, reports
