"""Metrics on known strings, the t-based interval, and `evaluate` on a tiny set."""

import json
import math
from pathlib import Path

import pytest
import torch

from minigpt4_ja import cli
from minigpt4_ja.evaluation import (
    Item, best_rouge_l, evaluate, exact_match, gold_yes_no, lcs_length, markdown_table, mean_confidence_interval,
    normalize_answer, parse_yes_no, rouge_l, score_run, t_cdf, t_quantile,
)

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" if (REPO / "examples" / "chelsea.png").is_file() else REPO.parent / "shared" / "images"


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    yield


# ---------------------------------------------------------------- metrics

def test_normalisation_and_exact_match():
    assert normalize_answer("「はい。」") == "はい"
    assert normalize_answer(" Ｙｅｓ! ") == "yes"  # NFKC folds full-width letters
    assert normalize_answer("白と 黒、です") == "白と黒です"
    assert exact_match("はい。", "はい") == 1.0
    assert exact_match("茶色の犬", ["犬", "茶色の犬"]) == 1.0
    assert exact_match("犬です", "犬") == 0.0


def test_character_rouge_l_on_known_strings():
    assert lcs_length("ABCBDAB", "BDCABA") == 4  # the textbook example
    assert rouge_l("猫", "猫") == 1.0
    assert rouge_l("犬", "猫") == 0.0
    # LCS("猫が寝ている", "猫が寝ています") = 5: P = 5/6, R = 5/7, F1 = 2PR/(P+R) = 10/13
    assert rouge_l("猫が寝ている", "猫が寝ています") == pytest.approx(10 / 13)
    assert rouge_l("猫が寝ている。", "猫が、寝ています") == pytest.approx(10 / 13)  # punctuation is ignored
    assert rouge_l("abcd", "abxyzd") == pytest.approx(2 * (3 / 4) * (3 / 6) / (3 / 4 + 3 / 6))
    assert best_rouge_l("ロケット", ["打ち上げ", "ロケット"]) == 1.0
    assert rouge_l("", "") == 1.0 and rouge_l("", "猫") == 0.0


def test_yes_no_parsing():
    assert gold_yes_no("はい") == "yes" and gold_yes_no("いいえ。") == "no" and gold_yes_no("Yes") == "yes"
    assert gold_yes_no("犬") is None
    assert parse_yes_no("はい、猫です。") == "yes"
    assert parse_yes_no("いいえ、犬ではありません") == "no"
    assert parse_yes_no("No, it is not.") == "no"
    assert parse_yes_no("I don't know") is None  # "know" and "not" are not "no"
    assert parse_yes_no("It is yes.") == "yes"
    assert parse_yes_no("わかりません") is None


def test_t_distribution_and_the_confidence_interval():
    # two-sided 95% critical values from any t table
    for df, critical in [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (29, 2.0452), (1000, 1.9623)]:
        assert t_quantile(0.975, df) == pytest.approx(critical, abs=1e-4)
    assert t_cdf(0.0, 5) == pytest.approx(0.5)
    assert t_quantile(0.025, 4) == pytest.approx(-2.7764, abs=1e-4)
    stats = mean_confidence_interval([0.1, 0.2, 0.3])
    # mean 0.2, sample sd 0.1, half width t(0.975, 2) * 0.1 / sqrt(3)
    assert stats["mean"] == pytest.approx(0.2) and stats["std"] == pytest.approx(0.1)
    assert stats["half_width"] == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-6)
    assert stats["low"] == pytest.approx(0.2 - stats["half_width"])
    assert mean_confidence_interval([0.5])["half_width"] is None
    assert mean_confidence_interval([0.4, 0.4, 0.4])["half_width"] == pytest.approx(0.0, abs=1e-12)


def test_t_quantile_matches_scipy_where_installed():
    scipy_stats = pytest.importorskip("scipy.stats")  # scipy is optional; the t-table test above always runs
    for df in (3, 7, 50):
        assert t_quantile(0.975, df) == pytest.approx(scipy_stats.t.ppf(0.975, df), abs=1e-9)


def test_score_run():
    items = [Item(None, "猫ですか？", ("はい",), "1"), Item(None, "犬ですか？", ("いいえ",), "2"),
             Item(None, "何色？", ("白と黒",), "3"), Item(None, "何？", ("猫",), "4")]
    scores = score_run(items, ["はい。", "はい、犬です", "白と黒", "わかりません"])
    assert scores["exact_match"] == pytest.approx(2 / 4)
    assert scores["yes_no_items"] == 2 and scores["yes_no_accuracy"] == pytest.approx(1 / 2)
    # "はい犬です" vs "いいえ" share one character: P = 1/5, R = 1/3, F1 = 1/4
    assert scores["rouge_l"] == pytest.approx((1 + 1 / 4 + 1 + 0) / 4)


# ---------------------------------------------------------------- evaluate on the tiny model

def write_set(tmp_path) -> Path:
    rows = [
        {"image": "chelsea.png", "question": "猫ですか？「はい」か「いいえ」で答えてください。", "answer": "はい"},
        {"image": "chelsea.png", "question": "何がいますか？", "answer": "猫"},
        {"image": "coffee.png", "question": "これは犬ですか？「はい」か「いいえ」で答えてください。", "answer": "いいえ"},
        {"image": "rocket.jpg", "question": "何が写っていますか？", "answer": ["ロケット", "ロケットの打ち上げ"]},
        "{broken",
    ]
    path = tmp_path / "vqa.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows) + "\n",
                    encoding="utf-8")
    return path


def eval_args(*argv):
    return cli.build_parser().parse_args(["evaluate", "--preset", "tiny", *map(str, argv)])


def test_evaluate_reports_greedy_and_seeded_metrics(tiny_pipeline, tmp_path, monkeypatch):
    calls = []
    original = tiny_pipeline.encoder.forward
    monkeypatch.setattr(tiny_pipeline.encoder, "forward", lambda pixels: calls.append(len(pixels)) or original(pixels))
    out = tmp_path / "report.json"
    args = eval_args("--data", write_set(tmp_path), "--image-root", EXAMPLES, "--seeds", 3,
                     "--max-new-tokens", 6, "--out", out)
    report = evaluate(args, pipeline=tiny_pipeline)

    assert sum(calls) == 3 and report["images_encoded"] == 3  # 3 images, 4 questions, 4 runs: each encoded once
    assert report["items"] == 4 and report["data"][0]["bad_rows"] == 1
    assert json.loads(out.read_text(encoding="utf-8"))["greedy"] == report["greedy"]
    predictions = report["predictions"]
    assert len(predictions) == 4 and all(len(p["samples"]) == 3 for p in predictions)
    items = [Item(None, p["question"], tuple(p["references"]), p["source"]) for p in predictions]
    assert score_run(items, [p["greedy"] for p in predictions]) == {
        k: v for k, v in report["greedy"].items() if k != "settings"}
    assert report["greedy"]["yes_no_items"] == 2 and report["greedy"]["settings"]["temperature"] == 0.0

    sampled = report["sampled"]
    assert sampled["seeds"] == [0, 1, 2]
    for metric in ("exact_match", "rouge_l", "yes_no_accuracy"):
        per_seed = [run[metric] for run in sampled["per_seed"]]
        assert sampled[metric] == mean_confidence_interval(per_seed)
    for k, seed in enumerate(sampled["seeds"]):
        samples = [p["samples"][k] for p in predictions]
        assert score_run(items, samples)["rouge_l"] == sampled["per_seed"][k]["rouge_l"]

    # the greedy answer is exactly what `ask` says; a seeded sample is reproducible
    image = tiny_pipeline.encode_image(EXAMPLES / "chelsea.png")
    greedy = tiny_pipeline.ask(image, predictions[1]["question"], temperature=0, max_new_tokens=6)
    assert greedy.text == predictions[1]["greedy"]
    again = tiny_pipeline.ask(image, predictions[1]["question"], max_new_tokens=6, seed=1)
    assert again.text == predictions[1]["samples"][1]

    table = markdown_table(report)
    assert "| exact match |" in table and "| yes/no accuracy (n=2) |" in table and "3 seeds" in table


def test_evaluate_japanese_visual_genome_layout_with_limit(tiny_pipeline, tmp_path):
    (tmp_path / "1.jpg").write_bytes((EXAMPLES / "rocket.jpg").read_bytes())
    data = tmp_path / "question_answers.json"
    data.write_text(json.dumps([{"id": 1, "qas": [{"question": "何ですか？", "answer": "ロケット"},
                                                  {"question": "空は見えますか？", "answer": "はい"},
                                                  {"question": "煙は？", "answer": "白い"}]}],
                               ensure_ascii=False), encoding="utf-8")
    report = evaluate(eval_args("--data", data, "--limit", 2, "--max-new-tokens", 4), pipeline=tiny_pipeline)
    assert report["data"][0]["format"] == "jvg" and report["items"] == 2 and report["sampled"] is None
    assert [p["references"] for p in report["predictions"]] == [["ロケット"], ["はい"]]
    assert report["greedy"]["yes_no_items"] == 1


def test_evaluate_cli_prints_a_markdown_table(tmp_path, capsys):
    out = tmp_path / "cli.json"
    code = cli.main(["evaluate", "--preset", "tiny", "--data", str(write_set(tmp_path)), "--image-root", str(EXAMPLES),
                     "--limit", "2", "--seeds", "2", "--max-new-tokens", "4", "--out", str(out)])
    assert code == 0
    stdout = capsys.readouterr().out
    assert "| metric (%) | greedy | sampled, mean ± 95% CI (2 seeds) |" in stdout
    assert "| ROUGE-L (char F1) |" in stdout
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["items"] == 2 and report["sampled"]["seeds"] == [0, 1]
    assert cli.main(["evaluate", "--preset", "tiny", "--data", str(tmp_path / "absent.jsonl")]) == 2
    assert "absent.jsonl does not exist" in capsys.readouterr().err
