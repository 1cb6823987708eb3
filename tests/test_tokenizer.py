"""rinna's tokenizer layout (spiece.model + tokenizer_config.json), trained here, read with SentencePiece."""

import json

import pytest
import sentencepiece as spm

from minigpt4_ja.errors import WeightsError
from minigpt4_ja.tokenizer import SentencePieceTokenizer, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = train_tokenizer(tmp_path_factory.mktemp("rinna-like"))
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "T5Tokenizer"
    return SentencePieceTokenizer.from_pretrained(folder)


def test_ids_are_sentencepiece_ids_without_bos_or_eos(tokenizer):
    text = "ユーザー: <Img><ImageHere></Img> 猫は?\nシステム: "
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer.model_file))
    ids = tokenizer.encode(text)
    assert ids == sp.encode(text)
    assert tokenizer.eos_token_id not in ids and tokenizer.bos_token_id not in ids
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (2, 3, 0)


@pytest.mark.parametrize("text", ["  two  spaces", "line\nbreak\ttab", "絵文字 😀 も", "no leading space"])
def test_whitespace_newlines_and_bytes_round_trip(tokenizer, text):
    # rinna: no dummy prefix, consecutive whitespace and newlines kept, byte fallback instead of [UNK]
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_decode_drops_special_tokens(tokenizer):
    ids = [tokenizer.bos_token_id, *tokenizer.encode("はい"), tokenizer.eos_token_id, tokenizer.pad_token_id]
    assert tokenizer.decode(ids) == "はい"


def test_training_is_deterministic(tmp_path):
    a = train_tokenizer(tmp_path / "a") / "spiece.model"
    b = train_tokenizer(tmp_path / "b") / "spiece.model"
    assert a.read_bytes() == b.read_bytes()


def test_missing_or_bad_tokenizer_files_are_named(tmp_path):
    with pytest.raises(WeightsError, match="spiece.model is missing"):
        SentencePieceTokenizer.from_pretrained(tmp_path)
    (tmp_path / "spiece.model").write_bytes(b"garbage")
    with pytest.raises(WeightsError, match="not a SentencePiece model"):
        SentencePieceTokenizer.from_pretrained(tmp_path)
