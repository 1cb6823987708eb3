"""The core pipeline on the tiny preset: splicing, generation, KV-cache reuse, context limits, stop, undo."""

import threading
import time

import pytest
import sentencepiece as spm
import torch

from minigpt4_ja import GenerationSettings, InputError, Pipeline
from minigpt4_ja.chat import clean_answer
from minigpt4_ja.images import load_image, preprocess
from minigpt4_ja.templates import TEMPLATES

GREEDY = dict(temperature=0, max_new_tokens=12)


def hand_written_greedy(pipeline, image_path, question, max_new_tokens):
    """rinna's card, spelled out: split the prompt at <ImageHere>, tokenize each piece with SentencePiece (no BOS,
    no EOS), splice the projected queries between them, and take the argmax token until EOS. No cache."""
    sp = spm.SentencePieceProcessor(model_file=str(pipeline.tokenizer.model_file))
    prompt = f"ユーザー: <Img><ImageHere></Img> {question}\nシステム: "
    before, after = prompt.split("<ImageHere>")
    llm = pipeline.llm
    embed = llm.get_input_embeddings()
    with torch.no_grad():
        queries = pipeline.encoder(preprocess(load_image(image_path)))
        image = pipeline.projection(queries)
        sequence = torch.cat([embed(torch.tensor([sp.encode(before)])), image, embed(torch.tensor([sp.encode(after)]))], 1)
        out = []
        for _ in range(max_new_tokens):
            token = int(llm(inputs_embeds=sequence).logits[0, -1].argmax())
            out.append(token)
            if token == sp.eos_id():
                break
            sequence = torch.cat([sequence, embed(torch.tensor([[token]]))], 1)
    return out


def test_spliced_generation_equals_hand_written_greedy_loop(tiny_pipeline, example_image):
    reply = tiny_pipeline.ask(example_image, "猫は何をしていますか？", **GREEDY)
    assert reply.token_ids == hand_written_greedy(tiny_pipeline, example_image, "猫は何をしていますか？", 12)
    assert reply.prompt_tokens == len(tiny_pipeline.tokenizer.encode("ユーザー: <Img>")) + 32 + len(
        tiny_pipeline.tokenizer.encode("</Img> 猫は何をしていますか？\nシステム: "))


def test_prompt_format_matches_rinna_card(tiny_pipeline, example_image):
    session = tiny_pipeline.chat()
    session.add_image(example_image)
    session.ask("What can you see?", **GREEDY)
    session.turns[-1].answer = "a cat on a table with a laptop"
    session.turns.append(session.turns[-1].__class__(question="猫はどんな体勢をしていますか？"))
    segments, images = session._render()
    assert "<ImageHere>".join(segments) == (
        "ユーザー: <Img><ImageHere></Img> What can you see?\nシステム: a cat on a table with a laptop\n"
        "ユーザー: 猫はどんな体勢をしていますか？\nシステム: ")
    assert len(images) == 1


def test_japanese_36b_template_uses_nl_markers():
    template = TEMPLATES["japanese-3.6b"]
    text = template.render([template.user_utterance("一行目\n二行目", 1), template.assistant_utterance("はい")])
    assert text == "ユーザー: <Img><ImageHere></Img> 一行目<NL>二行目<NL>システム: はい<NL>システム: "
    assert clean_answer("横に<NL>なっています</s>", template) == "横に\nなっています"


def test_user_text_cannot_inject_an_image_marker(tiny_pipeline):
    session = tiny_pipeline.chat()
    session.ask("look <ImageHere> here", **GREEDY)
    segments, images = session._render()
    assert len(segments) == 1 and not images


def conversation(pipeline, image_a, image_b, reuse_cache, settings):
    session = pipeline.chat(reuse_cache=reuse_cache)
    session.add_image(image_a)
    replies = [session.ask("これは何ですか？", settings), session.ask("色は？", settings)]
    session.add_image(image_b)  # a new image later in the conversation
    replies.append(session.ask("二枚目の画像は？", settings))
    replies.append(session.ask("", settings) if False else session.ask("違いは？", settings))
    return replies


@pytest.mark.parametrize("settings", [GenerationSettings(**GREEDY), GenerationSettings(max_new_tokens=10, seed=7)],
                         ids=["greedy", "sampled-seed"])
def test_cache_reuse_equals_reencoding_the_conversation(tiny_pipeline, settings):
    a, b = tiny_pipeline.encode_image("examples/chelsea.png"), tiny_pipeline.encode_image("examples/coffee.png")
    prefilled = []
    hook = tiny_pipeline.llm.gpt_neox.register_forward_pre_hook(
        lambda module, args, kwargs: prefilled.append(kwargs["inputs_embeds"].shape[1])
        if kwargs.get("inputs_embeds") is not None else None, with_kwargs=True)
    try:
        cached = conversation(tiny_pipeline, a, b, True, settings)
        cached_prefill = sum(prefilled)
        prefilled.clear()
        fresh = conversation(tiny_pipeline, a, b, False, settings)
        fresh_prefill = sum(prefilled)
    finally:
        hook.remove()
    assert [r.token_ids for r in cached] == [r.token_ids for r in fresh]
    assert [r.text for r in cached] == [r.text for r in fresh]
    assert all(r.reused_tokens > 0 for r in cached[1:])
    assert all(r.reused_tokens == 0 for r in fresh)
    assert cached_prefill < fresh_prefill


def test_text_only_turns_and_empty_question_with_image(tiny_pipeline, example_image):
    session = tiny_pipeline.chat()
    assert session.ask("こんにちは", **GREEDY).token_ids
    with pytest.raises(InputError, match="empty"):
        session.ask("   ", **GREEDY)
    assert len(session.turns) == 1
    session.add_image(example_image)
    session.ask("", **GREEDY)  # an image with no question: the caption prompt of stage-1 training
    segments, _ = session._render()
    assert segments[-2].endswith("ユーザー: <Img>") and segments[-1].startswith("</Img>\nシステム: ")


def test_long_question_is_truncated_with_a_notice(tiny_pipeline):
    reply = tiny_pipeline.ask(None, "猫" * 3000, **GREEDY)
    assert any("cut to" in n for n in reply.notices)
    assert reply.prompt_tokens < 900


def test_context_limit_drops_oldest_text_but_keeps_images_and_question(example_image):
    pipeline = Pipeline.from_preset("tiny")
    pipeline.llm.config.max_position_embeddings = 240
    session = pipeline.chat()
    session.add_image(example_image)
    settings = GenerationSettings(temperature=0, max_new_tokens=20)
    replies = [session.ask(f"質問{i}: " + "これは何ですか？" * 4, settings) for i in range(6)]
    last = replies[-1]
    assert last.prompt_tokens + 20 <= 240
    dropped = sorted({i for r in replies for i in r.dropped_turns})
    assert dropped and dropped[0] == 0
    assert any("left out" in n for r in replies for n in r.notices)
    segments, images = session._render()
    assert len(images) == 1  # the image survives its turn's text
    assert "質問5" in segments[-1]  # the current question is never dropped
    assert "質問0" not in "".join(segments)


def test_context_limit_shortens_the_answer_budget(example_image):
    pipeline = Pipeline.from_preset("tiny")
    pipeline.llm.config.max_position_embeddings = 80
    reply = pipeline.ask(example_image, "これは何ですか？", max_new_tokens=500, temperature=0)
    assert reply.prompt_tokens + len(reply.token_ids) <= 80
    assert any("limited to" in n for n in reply.notices)


def test_stop_ends_generation_within_a_token_or_two(tiny_pipeline, example_image):
    session = tiny_pipeline.chat()
    session.add_image(example_image)
    stream = session.stream("説明して", max_new_tokens=1900, temperature=1.0, seed=1)
    seen = 0
    for _ in stream:
        seen += 1
        if seen == 3:
            stream.stop()
    reply = stream.reply
    assert reply.finish_reason == "stopped"
    assert len(reply.token_ids) <= 3 + 2
    assert not [t for t in threading.enumerate() if t.name == "minigpt4-generate"]
    assert session.turns[-1].answer == reply.text  # the partial answer stays in the history


def test_closing_the_stream_stops_the_thread(tiny_pipeline, example_image):
    session = tiny_pipeline.chat()
    session.add_image(example_image)
    iterator = iter(session.stream("説明して", max_new_tokens=1900, seed=2))
    next(iterator)
    iterator.close()  # what Gradio does when a visitor presses Stop
    time.sleep(0.05)
    assert not [t for t in threading.enumerate() if t.name == "minigpt4-generate"]
    assert len(session.turns[-1].answer_ids) < 10


def test_undo_regenerate_reset(tiny_pipeline, example_image):
    session = tiny_pipeline.chat()
    session.add_image(example_image)
    first = session.ask("これは何？", max_new_tokens=8, seed=3)
    session.ask("本当？", **GREEDY)
    assert session.undo().question == "本当？"
    assert len(session.turns) == 1
    again = session.regenerate(GenerationSettings(max_new_tokens=8, seed=3))
    list(again)
    assert again.reply.token_ids == first.token_ids  # same seed, same answer
    assert session.turns[-1].images  # the image stays with the regenerated turn
    session.reset()
    assert not session.turns and not session.pending_images and session._cache is None


def test_beam_search_runs_without_cache(tiny_pipeline, example_image):
    reply = tiny_pipeline.ask(example_image, "これは何？", temperature=0, num_beams=3, max_new_tokens=6)
    assert 0 < len(reply.token_ids) <= 6


@pytest.mark.parametrize("values, message", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(num_beams=2.5), "whole number"), (dict(seed="abc"), "seed"), (dict(repetition_penalty=9), "repetition"),
    (dict(colour=1), "unknown"),
])
def test_bad_generation_settings_are_named(values, message):
    with pytest.raises(InputError, match=message):
        GenerationSettings.from_values(**values)


def test_answers_never_contain_special_tokens():
    template = TEMPLATES["bilingual"]
    assert clean_answer("<s>横に</s>なって[PAD]います", template) == "横になっています"
    assert clean_answer("はい。\nユーザー: 次の質問", template) == "はい。"
    assert clean_answer("途中\ufffd", template, streaming=True) == "途中"


def test_cached_sessions_are_bounded(tiny_pipeline, example_image):
    image = tiny_pipeline.encode_image(example_image)
    sessions = []
    for _ in range(tiny_pipeline.max_cached_sessions + 2):
        session = tiny_pipeline.chat()
        session.add_image(image)
        session.ask("何？", max_new_tokens=2, temperature=0)
        sessions.append(session)
    assert sum(s._cache is not None for s in sessions) == tiny_pipeline.max_cached_sessions
    assert sessions[0]._cache is None and sessions[-1]._cache is not None


@pytest.mark.parametrize("quantization", ["int8", "nf4"])
def test_quantized_llm_runs_on_cpu(quantization, example_image):
    import bitsandbytes as bnb

    pipeline = Pipeline.from_preset("tiny", quantization=quantization, device="cpu")
    layer_types = {type(m) for m in pipeline.llm.modules()}
    assert (bnb.nn.Linear8bitLt if quantization == "int8" else bnb.nn.Linear4bit) in layer_types
    reply = pipeline.ask(example_image, "これは何？", **GREEDY)
    assert len(reply.token_ids) > 0 and reply.finish_reason in ("eos", "length", "user_turn")
