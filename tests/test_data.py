"""The four data layouts, their auto-detection, and bad rows that are counted and named, never dropped silently."""

import json
from pathlib import Path

import pytest
from PIL import Image

from minigpt4_ja.data import load_dataset, load_datasets
from minigpt4_ja.errors import InputError


def write_images(folder: Path, *names: str) -> None:
    for index, name in enumerate(names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (40 * index, 100, 200)).save(path)


def write_jsonl(path: Path, rows) -> Path:
    lines = [row if isinstance(row, str) else json.dumps(row, ensure_ascii=False) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_caption_jsonl_with_bad_rows(tmp_path):
    write_images(tmp_path / "img", "a.png", "b.png")
    data = write_jsonl(tmp_path / "captions.jsonl", [
        {"image": "a.png", "caption": "猫がいます。"},
        "{not json",
        {"image": "b.png", "caption": "  "},
        {"image": "c.png", "caption": "犬がいます。"},
        ["a list"],
        {"image": "b.png"},
        {"image": "b.png", "caption": "青い空。"},
    ])
    examples, report = load_dataset(data, tmp_path / "img")
    assert report.format == "jsonl" and report.rows == 7 and report.examples == 2
    assert [e.turns[0].answer for e in examples] == ["猫がいます。", "青い空。"]
    assert examples[0].images == [tmp_path / "img" / "a.png"] and examples[0].turns[0].question == ""
    assert examples[0].turns[0].num_images == 1 and examples[1].source == "captions.jsonl line 7"
    assert report.bad == {"invalid JSON": 1, "empty 'caption'": 1, "image not found": 1, "not a JSON object": 1,
                          "no 'caption', 'question'/'answer' or 'conversations'": 1}
    assert report.first_bad[0].startswith("line 2: invalid JSON")
    assert report.first_bad[2] == f"line 4: image not found ({tmp_path / 'img' / 'c.png'})"
    described = report.describe()
    assert "5 bad rows" in described and "line 6" in described


def test_vqa_jsonl_and_a_json_list_of_rows(tmp_path):
    write_images(tmp_path, "a.png")
    rows = [{"image": "a.png", "question": "何色？", "answer": "青"},
            {"image": "a.png", "question": "猫？", "answer": ["はい", "うん"]},
            {"image": "a.png", "question": "", "answer": "x"}]
    examples, report = load_dataset(write_jsonl(tmp_path / "vqa.jsonl", rows))  # image root: the file's folder
    assert [(e.turns[0].question, e.turns[0].answer) for e in examples] == [("何色？", "青"), ("猫？", "はい")]
    assert examples[1].turns[0].all_answers == ("はい", "うん")
    assert report.bad == {"empty 'question'": 1}
    listed = tmp_path / "vqa.json"
    listed.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    examples, report = load_dataset(listed)
    assert report.format == "jsonl" and len(examples) == 2 and report.first_bad == ["row 3: empty 'question'"]


def test_llava_conversations_multi_turn(tmp_path):
    write_images(tmp_path, "coco/1.jpg", "coco/2.jpg")
    rows = [
        {"id": "1", "image": "coco/1.jpg", "conversations": [
            {"from": "human", "value": "<image>\nこれは何ですか？"}, {"from": "gpt", "value": "猫です。"},
            {"from": "human", "value": "何色ですか？"}, {"from": "gpt", "value": "白です。"}]},
        {"id": "2", "image": "coco/2.jpg", "conversations": [
            {"from": "human", "value": "説明して\n<image>"}, {"from": "gpt", "value": "空です。"},
            {"from": "human", "value": "ありがとう"}]},  # a trailing question without answer is ignored
        {"id": "3", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {"id": "4", "image": "coco/1.jpg", "conversations": [{"from": "gpt", "value": "先に答え"}]},
        {"id": "5", "image": "coco/1.jpg", "conversations": [
            {"from": "human", "value": "<image><image>2枚？"}, {"from": "gpt", "value": "いいえ"}]},
        {"id": "6", "image": "coco/missing.jpg", "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]},
        {"id": "7", "image": "coco/1.jpg", "conversations": [
            {"from": "human", "value": "<image>a"}, {"from": "robot", "value": "x"}]},
    ]
    data = tmp_path / "llava.json"
    data.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    examples, report = load_dataset(data)
    assert report.format == "llava" and report.rows == 7 and report.examples == 2
    first = examples[0]
    assert [(t.question, t.answer, t.num_images) for t in first.turns] == [
        ("これは何ですか？", "猫です。", 1), ("何色ですか？", "白です。", 0)]
    assert [(t.question, t.answer) for t in examples[1].turns] == [("説明して", "空です。")]
    assert report.bad == {"no image (text-only conversations train nothing here)": 1,
                          "an answer without a question": 1, "more than one <image> for one image": 1,
                          "image not found": 1, "unknown speaker": 1}
    assert report.first_bad[0].startswith("row 3: no image")


def test_stair_coco_captions(tmp_path):
    write_images(tmp_path / "train2014", "COCO_train2014_000000000009.jpg", "COCO_train2014_000000000025.jpg")
    data = tmp_path / "stair_captions_v1.2_train.json"
    data.write_text(json.dumps({
        "images": [{"id": 9, "file_name": "COCO_train2014_000000000009.jpg"},
                   {"id": 25, "file_name": "COCO_train2014_000000000025.jpg"},
                   {"id": 30, "file_name": "COCO_train2014_000000000030.jpg"}],
        "annotations": [
            {"image_id": 9, "id": 1, "caption": "皿の上に料理がある。"},
            {"image_id": 9, "id": 2, "caption": "食べ物が並んでいる。"},
            {"image_id": 25, "id": 3, "caption": "キリンが木の葉を食べている。"},
            {"image_id": 30, "id": 4, "caption": "花瓶に花。"},
            {"image_id": 99, "id": 5, "caption": "どこにもない画像"},
            {"image_id": 25, "id": 6},
        ]}, ensure_ascii=False), encoding="utf-8")
    examples, report = load_dataset(data, tmp_path / "train2014")
    assert report.format == "coco" and report.rows == 6 and report.examples == 3
    assert examples[0].images == examples[1].images != examples[2].images
    assert examples[2].turns[0].answer == "キリンが木の葉を食べている。"
    assert report.bad == {"image not found": 1, "image_id not listed in 'images'": 1, "missing 'caption'": 1}
    assert report.first_bad[1] == "annotation 5: image_id not listed in 'images' (99)"

    # MiniGPT-4's cc_sbu_align filter_cap.json: annotations only, images named by id
    write_images(tmp_path / "image", "2.jpg")
    aligned = tmp_path / "filter_cap.json"
    aligned.write_text(json.dumps({"annotations": [{"image_id": "2", "caption": "A long description."},
                                                   {"image_id": "3", "caption": "gone"}]}), encoding="utf-8")
    examples, report = load_dataset(aligned, tmp_path / "image")
    assert [e.images[0].name for e in examples] == ["2.jpg"] and report.bad == {"image not found": 1}


def test_japanese_visual_genome_vqa(tmp_path):
    write_images(tmp_path, "1.jpg", "VG_100K_2/2.jpg")
    data = tmp_path / "question_answers.json"
    data.write_text(json.dumps([
        {"id": 1, "qas": [{"qa_id": 10, "image_id": 1, "question": "何が写っていますか？", "answer": "犬"},
                          {"qa_id": 11, "image_id": 1, "question": "犬は何色ですか？", "answer": "茶色"}]},
        {"image_id": 2, "qas": [{"qa_id": 12, "question": "どこですか？", "answer": "公園"},
                                {"qa_id": 13, "question": "天気は？", "answer": ""}]},
        {"id": 3, "qas": [{"qa_id": 14, "question": "q", "answer": "a"}]},
        {"id": 4},
    ], ensure_ascii=False), encoding="utf-8")
    examples, report = load_dataset(data)
    assert report.format == "jvg" and report.rows == 6 and report.examples == 3
    found = [(e.images[0].relative_to(tmp_path).as_posix(), e.turns[0].question, e.turns[0].answer) for e in examples]
    assert found == [("1.jpg", "何が写っていますか？", "犬"), ("1.jpg", "犬は何色ですか？", "茶色"),
                     ("VG_100K_2/2.jpg", "どこですか？", "公園")]
    assert report.bad == {"empty 'answer'": 1, "image not found": 1, "not an object with a 'qas' list": 1}
    assert report.first_bad[0] == "row 2 (image 2) qa 2: empty 'answer'"
    assert report.first_bad[1] == f"row 3 (image 3) qa 1: image not found ({tmp_path / '3.jpg'})"


def test_format_override_and_detection_errors(tmp_path):
    write_images(tmp_path, "1.jpg")
    jvg = tmp_path / "qa.json"
    jvg.write_text(json.dumps([{"id": 1, "qas": [{"question": "q", "answer": "a"}]}]), encoding="utf-8")
    assert load_dataset(jvg, data_format="jvg")[1].format == "jvg"
    with pytest.raises(InputError, match="no usable rows"):
        load_dataset(jvg, data_format="llava")  # forced: every row lacks conversations, and the error says so
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps({"something": 1}), encoding="utf-8")
    with pytest.raises(InputError, match="--data-format"):
        load_dataset(odd)
    with pytest.raises(InputError, match="not valid JSON"):
        load_dataset(write_jsonl(tmp_path / "rows.txt", [{"image": "1.jpg", "caption": "x"}] * 2), data_format="coco")
    # JSONL with another extension is still recognised
    examples, report = load_dataset(write_jsonl(tmp_path / "rows.txt", [{"image": "1.jpg", "caption": "x"}] * 2))
    assert report.format == "jsonl" and len(examples) == 2


def test_wrong_paths_are_named(tmp_path):
    write_images(tmp_path, "a.png")
    data = write_jsonl(tmp_path / "c.jsonl", [{"image": "a.png", "caption": "x"}])
    with pytest.raises(InputError, match="data file .*missing.jsonl does not exist"):
        load_dataset(tmp_path / "missing.jsonl")
    with pytest.raises(InputError, match="image root .*nowhere does not exist"):
        load_dataset(data, tmp_path / "nowhere")
    only_missing = write_jsonl(tmp_path / "m.jsonl", [{"image": "gone.png", "caption": "x"}])
    with pytest.raises(InputError, match="gone.png"):
        load_dataset(only_missing)
    with pytest.raises(InputError, match="2 --data files but 3 --image-root"):
        load_datasets([str(data), str(data)], [str(tmp_path)] * 3)
    examples, reports = load_datasets([str(data), str(data)], [str(tmp_path)])
    assert len(examples) == 2 and len(reports) == 2
