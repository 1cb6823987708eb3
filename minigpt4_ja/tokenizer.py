"""rinna's tokenizer, read with SentencePiece itself.

rinna's repos ship `spiece.model` and a `tokenizer_config.json` naming `T5Tokenizer`, and every card says
`use_fast=False`. transformers 5 always converts that file to a fast tokenizer, which adds a dummy-prefix space,
collapses runs of spaces, drops newlines and has no byte fallback, so its ids differ from the ones rinna trained with.
Encoding with SentencePiece directly gives the slow (legacy) T5Tokenizer's ids, and never appends `</s>`.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from .errors import WeightsError

TOKENIZER_FILES = ("spiece.model", "tokenizer_config.json")


class SentencePieceTokenizer:
    def __init__(self, model_file: str | Path, config: dict | None = None):
        import sentencepiece as spm

        self.model_file = Path(model_file)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.model_file))
        except (OSError, RuntimeError) as err:
            raise WeightsError(f"tokenizer file {self.model_file} is not a SentencePiece model ({err})") from err
        config = config or {}
        self.special_tokens = {
            role: config.get(f"{role}_token", default)
            for role, default in [("bos", "<s>"), ("eos", "</s>"), ("pad", "[PAD]"), ("unk", "[UNK]")]
        }
        for extra in ("cls_token", "sep_token", "mask_token"):
            if isinstance(config.get(extra), str):
                self.special_tokens[extra[:-6]] = config[extra]
        ids = {role: self.sp.piece_to_id(piece) for role, piece in self.special_tokens.items()}
        unk = self.sp.unk_id()
        self.special_ids = {role: i for role, i in ids.items() if i != unk or role == "unk"}
        self.bos_token_id = self.special_ids.get("bos", self.sp.bos_id())
        self.eos_token_id = self.special_ids.get("eos", self.sp.eos_id())
        self.pad_token_id = self.special_ids.get("pad", self.sp.pad_id())
        self._skip_ids = {i for i in self.special_ids.values() if i >= 0} | {
            i for i in range(self.sp.get_piece_size()) if self.sp.is_control(i)
        }

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "SentencePieceTokenizer":
        folder = Path(folder)
        model_file = folder / "spiece.model"
        if not model_file.is_file():
            raise WeightsError(f"tokenizer file {model_file} is missing (rinna's repos ship spiece.model)")
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        return cls(model_file, config)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def special_token_strings(self) -> list[str]:
        return [s for s in self.special_tokens.values() if s]

    def encode(self, text: str) -> list[int]:
        """Plain text to ids: no BOS, no EOS, special-token strings in the text are treated as text."""
        return self.sp.encode(text) if text else []

    def decode(self, ids) -> str:
        """Ids to text, dropping special and control tokens (byte-fallback pieces are joined into characters)."""
        return self.sp.decode([int(i) for i in ids if int(i) not in self._skip_ids])


# A small bilingual corpus for the `tiny` preset's tokenizer: enough pieces to write prompts and answers.
TINY_CORPUS = [
    "ユーザー: <Img><ImageHere></Img> この画像について説明してください。",
    "システム: 猫がソファの上で寝ています。",
    "ユーザー: 猫はどんな体勢をしていますか？\nシステム: 横になっています。",
    "ユーザー: What can you see?\nシステム: a cat on a table with a laptop",
    "コーヒーカップが木のテーブルに置かれています。",
    "宇宙飛行士が宇宙服を着て、旗の前に立っています。",
    "ロケットが煙を上げながら打ち上げられています。",
    "写真には赤い車と青い空が写っています。はい。いいえ。",
    "A photo of a dog running on the beach. Yes. No.",
    "An astronaut in a white space suit. A rocket launch. A cup of coffee.",
    "犬 猫 鳥 車 空 海 山 花 人 本 机 椅子 窓 夜 朝 赤 青 白 黒 緑 黄色",
    "0123456789 !?.,:;()[]<>/-_ 、。「」（）！？",
]


def train_tokenizer(folder: str | Path, corpus: list[str] = TINY_CORPUS, vocab_size: int = 512) -> Path:
    """Train a SentencePiece model with rinna's settings and save it like rinna's repo (spiece.model + config).

    Deterministic: the same corpus and vocab size give the same file. Used by the `tiny` preset and the tests.
    """
    import sentencepiece as spm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus * 4),
        model_writer=buffer,
        vocab_size=vocab_size,
        model_type="unigram",
        byte_fallback=True,
        add_dummy_prefix=False,  # rinna: "turned off the default behaviour of prepending leading whitespace"
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        split_by_whitespace=False,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        hard_vocab_limit=False,
        num_threads=1,
        pad_id=0, pad_piece="[PAD]", unk_id=1, unk_piece="[UNK]",
        bos_id=2, bos_piece="<s>", eos_id=3, eos_piece="</s>",
        user_defined_symbols=["[CLS]", "[SEP]", "[MASK]", "\n"],
        minloglevel=2,
    )
    (folder / "spiece.model").write_bytes(buffer.getvalue())
    config = {
        "eos_token": "</s>", "unk_token": "[UNK]", "pad_token": "[PAD]", "extra_ids": 0,
        "additional_special_tokens": [], "sp_model_kwargs": {}, "bos_token": "<s>", "cls_token": "[CLS]",
        "sep_token": "[SEP]", "mask_token": "[MASK]", "do_lower_case": False, "tokenizer_class": "T5Tokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return folder

