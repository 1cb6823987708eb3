"""Training the projection on the tiny model: labels, schedule, loss, feature cache, resume, outputs, CLI."""

import json
import math
from pathlib import Path

import pytest
import torch

from minigpt4_ja import cli
from minigpt4_ja.chat import ChatSession, Turn as ChatTurn
from minigpt4_ja.data import Example, Turn
from minigpt4_ja.errors import InputError
from minigpt4_ja.training import (
    IGNORE_INDEX, STAGES, _resolve_defaults, assemble_batch, build_sequence, learning_rate_at, train,
)
from minigpt4_ja.weights import load_projection

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" if (REPO / "examples" / "chelsea.png").is_file() else REPO.parent / "shared" / "images"
CAPTIONS = {
    "chelsea.png": "猫がソファの上で寝ています。",
    "coffee.png": "コーヒーカップが木のテーブルに置かれています。",
    "astronaut.png": "宇宙飛行士が宇宙服を着て、旗の前に立っています。",
    "rocket.jpg": "ロケットが煙を上げながら打ち上げられています。",
}


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    yield


@pytest.fixture
def captions(tmp_path) -> Path:
    path = tmp_path / "captions.jsonl"
    rows = [{"image": name, "caption": caption} for name, caption in CAPTIONS.items()]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def vit_images(tiny_pipeline, monkeypatch) -> list[int]:
    """Images that went through the frozen encoder (one entry per ViT call: its batch size)."""
    calls: list[int] = []
    original = tiny_pipeline.encoder.forward

    def counting(pixel_values):
        calls.append(pixel_values.shape[0])
        return original(pixel_values)

    monkeypatch.setattr(tiny_pipeline.encoder, "forward", counting)
    return calls


def parse(*argv):
    return cli.build_parser().parse_args(["train", "--preset", "tiny", "--num-workers", "0", *map(str, argv)])


def run_train(pipeline, data, out, *extra):
    args = parse("--data", data, "--image-root", EXAMPLES, "--output-dir", out, "--log-every", 1, *extra)
    return train(args, pipeline=pipeline)


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------- sequences and labels

def test_caption_labels_ignore_everything_before_the_answer(tiny_pipeline):
    tokenizer, template = tiny_pipeline.tokenizer, tiny_pipeline.template
    example = Example([Path("x.png")], [Turn("", "猫が寝ています。", 1)], "test")
    sequence = build_sequence(example, tokenizer, template, max_text_tokens=64, context_length=2048)

    prompt = template.render([template.user_utterance("", 1)])
    assert prompt == "ユーザー: <Img><ImageHere></Img>\nシステム: "
    before, after = prompt.split("<ImageHere>")
    answer = tokenizer.encode("猫が寝ています。")
    assert sequence.segments == [tokenizer.encode(before), tokenizer.encode(after) + answer + [tokenizer.eos_token_id]]
    labels = sequence.flat_labels()
    start = len(tokenizer.encode(before)) + 32 + len(tokenizer.encode(after))
    assert len(labels) == len(sequence) == start + len(answer) + 1
    assert labels[:start] == [IGNORE_INDEX] * start  # prompt and the 32 image slots
    assert labels[start:] == answer + [tokenizer.eos_token_id]


def test_training_prompt_is_the_inference_prompt(tiny_pipeline):
    """Two turns rendered for training hold exactly the positions `chat` feeds for the second question, and the
    end of the first answer is taught to predict EOS without an EOS inside the context."""
    tokenizer, template = tiny_pipeline.tokenizer, tiny_pipeline.template
    example = Example([Path("x.png")], [Turn("猫は何をしていますか？", "寝ています。", 1), Turn("色は？", "白と黒です。")], "t")
    sequence = build_sequence(example, tokenizer, template, 64, 2048)

    image = tiny_pipeline.encode_image(EXAMPLES / "chelsea.png")
    session = ChatSession(tiny_pipeline, reuse_cache=False)
    session.turns = [ChatTurn("猫は何をしていますか？", [image], "寝ています。"), ChatTurn("色は？")]
    chat_ids, images, _ = session._positions()
    assert len(images) == 1 and sequence.num_images == 1
    assert sequence.segments[0] == chat_ids[0]
    final_answer = tokenizer.encode("白と黒です。") + [tokenizer.eos_token_id]
    assert sequence.segments[1] == chat_ids[1] + final_answer
    assert tokenizer.eos_token_id not in chat_ids[1]

    labels = sequence.labels[1]
    first_answer = tokenizer.encode("寝ています。")
    first_start = len(chat_ids[1]) - len(tokenizer.encode(template.render([template.user_utterance("色は？", 0)]))) \
        - len(template.separator) - len(first_answer)
    # the separator is one token ("\n") in the tiny vocabulary
    assert tokenizer.encode(template.separator) == [sequence.segments[1][first_start + len(first_answer)]]
    assert labels[:first_start] == [IGNORE_INDEX] * first_start
    assert labels[first_start:first_start + len(first_answer)] == first_answer
    assert labels[first_start + len(first_answer)] == tokenizer.eos_token_id  # taught to stop after answer 1
    question_end = len(chat_ids[1])
    assert labels[first_start + len(first_answer) + 1:question_end] == \
        [IGNORE_INDEX] * (question_end - first_start - len(first_answer) - 1)
    assert labels[question_end:] == final_answer


def test_long_answers_are_cut_without_eos_and_too_long_examples_rejected(tiny_pipeline):
    tokenizer, template = tiny_pipeline.tokenizer, tiny_pipeline.template
    answer = "猫が寝ています。" * 10
    example = Example([Path("x.png")], [Turn("", answer, 1)], "t")
    sequence = build_sequence(example, tokenizer, template, max_text_tokens=5, context_length=2048)
    supervised = [label for label in sequence.flat_labels() if label != IGNORE_INDEX]
    assert supervised == tokenizer.encode(answer)[:5]
    with pytest.raises(ValueError, match="context"):
        build_sequence(example, tokenizer, template, max_text_tokens=5, context_length=20)


def test_batch_is_right_padded_with_ignored_labels(tiny_pipeline):
    tokenizer, template = tiny_pipeline.tokenizer, tiny_pipeline.template
    short = build_sequence(Example([Path("a")], [Turn("", "猫。", 1)], "a"), tokenizer, template, 64, 2048)
    long = build_sequence(Example([Path("b")], [Turn("何がいますか？", "コーヒーカップが木のテーブルに置かれています。", 1)],
                                  "b"), tokenizer, template, 64, 2048)
    hidden = tiny_pipeline.hidden_size
    images = [[torch.randn(32, hidden)], [torch.randn(32, hidden)]]
    embedding = tiny_pipeline.llm.get_input_embeddings()
    embeds, mask, labels = assemble_batch([short, long], images, embedding, tokenizer.pad_token_id)

    assert embeds.shape == (2, len(long), hidden) and len(short) < len(long)
    assert mask[0].tolist() == [1] * len(short) + [0] * (len(long) - len(short))
    assert mask[1].tolist() == [1] * len(long)
    assert labels[0].tolist() == short.flat_labels() + [IGNORE_INDEX] * (len(long) - len(short))
    assert labels[1].tolist() == long.flat_labels()
    first = len(short.segments[0])
    assert torch.equal(embeds[0, first:first + 32], images[0][0])  # the image sits right after "ユーザー: <Img>"
    with torch.no_grad():
        pad = embedding(torch.tensor(tokenizer.pad_token_id))
        tokens = embedding(torch.tensor(short.segments[0]))
    assert torch.equal(embeds[0, :first], tokens)
    assert torch.equal(embeds[0, len(short):], pad.expand(len(long) - len(short), -1))


# ---------------------------------------------------------------- schedule and defaults

def test_warmup_then_cosine_to_the_minimum():
    lr = [learning_rate_at(s, total_steps=100, warmup_steps=10, peak=1e-4, minimum=8e-5) for s in range(101)]
    assert lr[0] == pytest.approx(1e-6)
    assert lr[5] == pytest.approx(1e-6 + (1e-4 - 1e-6) / 2)
    assert lr[10] == pytest.approx(1e-4)
    assert lr[55] == pytest.approx(9e-5)  # half way down the cosine
    assert lr[100] == pytest.approx(8e-5)
    assert all(a <= b for a, b in zip(lr[:10], lr[1:11])) and all(a >= b for a, b in zip(lr[10:], lr[11:]))


def test_stage_defaults():
    one = parse("--data", "x", "--output-dir", "y")
    _resolve_defaults(one)
    assert (one.learning_rate, one.min_learning_rate, one.weight_decay) == (1e-4, 8e-5, 0.05)
    two = parse("--data", "x", "--output-dir", "y", "--stage", "2")
    _resolve_defaults(two)
    assert (two.learning_rate, two.min_learning_rate, two.batch_size) == (3e-5, 1e-5, STAGES[2]["batch_size"])
    mine = parse("--data", "x", "--output-dir", "y", "--stage", "2", "--learning-rate", "2e-4")
    _resolve_defaults(mine)
    assert mine.learning_rate == 2e-4


# ---------------------------------------------------------------- training runs

def test_loss_falls_and_the_second_epoch_hits_the_feature_cache(tiny_pipeline, captions, tmp_path, vit_images):
    before = tiny_pipeline.projection.weight.detach().clone()
    out = tmp_path / "run"
    result = run_train(tiny_pipeline, captions, out, "--max-steps", 40, "--batch-size", 4,
                       "--learning-rate", "1e-2", "--min-learning-rate", "1e-3", "--warmup-steps", 2)
    losses = [loss for _, loss in result.losses]
    assert len(losses) == 40 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.02, (first, last)

    # 40 epochs of one batch: the four images went through the ViT once, in epoch 1
    assert sum(vit_images) == 4 and len(vit_images) == 1
    log = read_log(out)
    assert [line["step"] for line in log] == list(range(1, 41))
    assert {"step", "loss", "lr"} <= set(log[0])
    assert log[0]["images_encoded"] == 4 and log[1]["images_encoded"] == 4  # epoch 2 encoded nothing new
    assert log[1]["cache_hits"] == 4 and result.cache_hits == 4 * 39
    assert torch.equal(tiny_pipeline.projection.weight, before)  # the pipeline's own projection is untouched

    # a later run sharing the cache never runs the ViT
    vit_images.clear()
    run_train(tiny_pipeline, captions, tmp_path / "again", "--max-steps", 2, "--batch-size", 4,
              "--feature-cache", out / "feature_cache")
    assert vit_images == []
    # ...and without the cache every epoch pays for it
    run_train(tiny_pipeline, captions, tmp_path / "uncached", "--max-steps", 2, "--batch-size", 4,
              "--no-feature-cache")
    assert sum(vit_images) == 8


def test_outputs_load_back_and_change_the_answer(tiny_pipeline, captions, tmp_path, capsys):
    out = tmp_path / "run"
    result = run_train(tiny_pipeline, captions, out, "--max-steps", 6, "--batch-size", 2,
                       "--learning-rate", "5e-2", "--warmup-steps", 1)
    assert result.complete and result.steps == 6
    saved, metadata = load_projection(out / "projection.safetensors", 768, tiny_pipeline.hidden_size)
    exported, _ = load_projection(out / "checkpoint.pth", 768, tiny_pipeline.hidden_size)
    assert torch.equal(saved["weight"], exported["weight"]) and torch.equal(saved["bias"], exported["bias"])
    assert not torch.equal(saved["weight"], tiny_pipeline.projection.weight.float())
    raw = torch.load(out / "checkpoint.pth", weights_only=True)
    assert set(raw["model"]) == {"llama_proj.weight", "llama_proj.bias"}
    assert metadata["template"] == "bilingual" and metadata["llm"] == "tiny"
    summary = json.loads((out / "projection.json").read_text(encoding="utf-8"))
    assert summary["llm"] == "tiny" and summary["template"] == "bilingual" and summary["steps"] == 6
    assert summary["data"][0]["path"] == str(captions) and summary["data"][0]["examples"] == 4

    image = EXAMPLES / "chelsea.png"
    untrained = tiny_pipeline.ask(image, "", temperature=0, max_new_tokens=8)
    capsys.readouterr()
    code = cli.main(["ask", "--preset", "tiny", "--projection", str(out / "projection.safetensors"),
                     "--image", str(image), "--temperature", "0", "--max-new-tokens", "8", "--json", ""])
    assert code == 0
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert answer["token_ids"] != untrained.token_ids

    from minigpt4_ja.loading import ModelOptions, load_pipeline

    loaded = load_pipeline(ModelOptions(preset="tiny", projection=str(out / "projection.safetensors")))
    assert torch.equal(loaded.projection.weight, saved["weight"]) and torch.equal(loaded.projection.bias, saved["bias"])


def test_resume_continues_from_the_saved_step_and_matches_an_uninterrupted_run(tiny_pipeline, captions, tmp_path):
    common = ("--max-steps", 8, "--batch-size", 1, "--grad-accum", 2, "--learning-rate", "2e-2",
              "--warmup-steps", 2, "--save-every", 100)
    whole = run_train(tiny_pipeline, captions, tmp_path / "whole", *common)

    sliced = tmp_path / "sliced"
    first = run_train(tiny_pipeline, captions, sliced, *common, "--stop-after", 3)
    assert first.steps == 3 and not first.complete
    assert (sliced / "checkpoints" / "step-00000003" / "training_state.pt").is_file()
    second = run_train(tiny_pipeline, captions, sliced, *common, "--resume", "latest")
    assert second.complete and second.steps == 8
    assert [step for step, _ in second.losses] == [4, 5, 6, 7, 8]  # continued from step 3, mid-epoch

    a, _ = load_projection(tmp_path / "whole" / "projection.safetensors", 768, tiny_pipeline.hidden_size)
    b, _ = load_projection(sliced / "projection.safetensors", 768, tiny_pipeline.hidden_size)
    assert torch.allclose(a["weight"], b["weight"], atol=1e-6) and torch.allclose(a["bias"], b["bias"], atol=1e-6)
    whole_log, sliced_log = read_log(tmp_path / "whole"), read_log(sliced)
    assert [line["step"] for line in sliced_log] == list(range(1, 9))
    for x, y in zip(whole_log, sliced_log):
        assert x["lr"] == pytest.approx(y["lr"]) and x["loss"] == pytest.approx(y["loss"], abs=1e-5)
    assert whole.losses[-1][1] == pytest.approx(second.losses[-1][1], abs=1e-5)

    # an explicit checkpoint folder works too; an existing run is never silently overwritten
    resumed = run_train(tiny_pipeline, captions, tmp_path / "from-path", *common, "--resume",
                        sliced / "checkpoints" / "step-00000003", "--stop-after", 1)
    assert resumed.steps == 4
    with pytest.raises(InputError, match="already holds a training run"):
        run_train(tiny_pipeline, captions, sliced, *common)


def test_bad_rows_and_unreadable_images_are_counted_and_reported(tiny_pipeline, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    rows = [json.dumps({"image": str(EXAMPLES / "chelsea.png"), "caption": "猫。"}),
            "{oops",
            json.dumps({"image": str(tmp_path / "missing.png"), "caption": "なし"}),
            json.dumps({"image": str(tmp_path / "broken.png"), "caption": "壊れた画像"})]
    data = tmp_path / "mixed.jsonl"
    data.write_text("\n".join(rows) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    result = train(parse("--data", data, "--output-dir", out, "--max-steps", 2, "--batch-size", 2), tiny_pipeline)
    assert result.complete
    assert list(result.unreadable.values())[0].startswith(str(tmp_path / "broken.png"))
    summary = json.loads((out / "projection.json").read_text(encoding="utf-8"))
    report = summary["data"][0]
    assert report["rows"] == 4 and report["examples"] == 2 and report["bad_rows"] == 2
    assert report["bad_reasons"] == {"invalid JSON": 1, "image not found": 1}
    assert report["first_bad"][0].startswith("line 2: invalid JSON")
    assert report["first_bad"][1].startswith("line 3: image not found") and "missing.png" in report["first_bad"][1]
    assert summary["unreadable_images"]["count"] == 1 and "line 4" in summary["unreadable_images"]["first"][0]


def test_cli_train_runs_and_names_wrong_paths(captions, tmp_path, capsys):
    out = tmp_path / "cli-run"
    code = cli.main(["train", "--preset", "tiny", "--data", str(captions), "--image-root", str(EXAMPLES),
                     "--output-dir", str(out), "--max-steps", "2", "--batch-size", "2", "--num-workers", "0"])
    assert code == 0
    assert (out / "projection.safetensors").is_file() and len(read_log(out)) == 1  # log every 10 steps, and the last

    capsys.readouterr()
    assert cli.main(["train", "--preset", "tiny", "--data", str(tmp_path / "nope.jsonl"),
                     "--output-dir", str(out)]) == 2
    assert "nope.jsonl does not exist" in capsys.readouterr().err
    assert cli.main(["train", "--preset", "tiny", "--data", str(captions), "--image-root", str(tmp_path / "no-dir"),
                     "--output-dir", str(out)]) == 2
    assert "no-dir" in capsys.readouterr().err
