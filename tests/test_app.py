"""The Gradio app, driven through gradio_client against a live server on 127.0.0.1 (tiny preset, in-process)."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import gradio as gr  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402

import app  # noqa: E402
from conftest import launched_app  # noqa: E402
from minigpt4_ja import GenerationSettings  # noqa: E402

QUESTION = "これは何ですか？"
GENERATION_THREAD = "minigpt4-generate"


@pytest.fixture(scope="module")
def server(tiny_pipeline):
    yield from launched_app(tiny_pipeline)


@pytest.fixture
def client(server):
    return Client(server, verbose=False)


def editor(path) -> dict:
    """The ImageEditor value as an API client sends it: the picture is both background and composite."""
    return {"background": handle_file(str(path)), "layers": [], "composite": handle_file(str(path)), "id": None}


def chat(client, image, message, **settings):
    values = dict(max_new_tokens=24, temperature=0, top_p=0.85, num_beams=1, repetition_penalty=1.0, seed=-1)
    values.update(settings)
    return client.submit(image, message, *values.values(), api_name="/chat")


def texts(history, role):
    return [part["text"] for m in history if m["role"] == role for part in m["content"] if part["type"] == "text"]


def files(history):
    return [part["file"] for m in history for part in m["content"] if part["type"] == "file"]


def generation_threads():
    return [t for t in threading.enumerate() if t.name == GENERATION_THREAD and t.is_alive()]


def wait_for_no_generation(deadline_s=60.0):
    end = time.monotonic() + deadline_s
    while generation_threads() and time.monotonic() < end:
        time.sleep(0.05)
    return generation_threads()


# ---------------------------------------------------------------- the chat endpoint


def test_answer_streams_with_the_image_inline(client, example_image):
    job = chat(client, editor(example_image), QUESTION, max_new_tokens=40)
    outputs = list(job)
    answers = [texts(history, "assistant") for history, _ in outputs]
    partials = [a[-1] for a in answers if a]
    assert len(set(partials)) >= 3, "the answer should arrive in several growing pieces"
    final_history, box = job.result()
    assert box == "", "the text box is cleared once the message is sent"
    assert texts(final_history, "user") == [QUESTION]
    assert len(files(final_history)) == 1 and Path(files(final_history)[0]).suffix == ".png"
    assert texts(final_history, "assistant")[0].strip()


def test_same_image_is_encoded_once_and_follow_ups_keep_the_history(client, tiny_pipeline, example_image, monkeypatch):
    calls = []
    original = tiny_pipeline.encode_image
    monkeypatch.setattr(tiny_pipeline, "encode_image", lambda image: calls.append(image) or original(image))
    chat(client, editor(example_image), "一つ目").result()
    history, _ = chat(client, editor(example_image), "二つ目").result()
    assert len(calls) == 1, "the second message reuses the encoded image"
    assert texts(history, "user") == ["一つ目", "二つ目"]
    assert len(files(history)) == 1, "an image already in the conversation is not added again"
    assert len(texts(history, "assistant")) == 2

    other = REPO / "examples" / "coffee.png"
    history, _ = chat(client, editor(other), "三つ目").result()
    assert len(calls) == 2 and len(files(history)) == 2, "a new image joins the new user turn"


def test_stop_ends_generation(client, tiny_pipeline, example_image, monkeypatch):
    """Cancelling the streaming event must end the generation thread, not just the stream to the browser."""
    llm = tiny_pipeline.llm
    forward_calls = []
    original_forward = llm.forward

    def slow_forward(*args, **kwargs):  # ~2000 greedy tokens would take tens of seconds
        forward_calls.append(1)
        time.sleep(0.01)
        return original_forward(*args, **kwargs)

    monkeypatch.setattr(llm, "forward", slow_forward)
    max_new_tokens = 2000
    job = chat(client, editor(example_image), "長く話してください", max_new_tokens=max_new_tokens)
    partials = 0
    for history, _ in job:
        if texts(history, "assistant"):
            partials += 1
        if partials >= 3:
            break
    assert partials >= 3
    job.cancel()
    assert not wait_for_no_generation(), "the generation thread kept running after Stop"
    assert len(forward_calls) < max_new_tokens // 2, f"{len(forward_calls)} forward passes after Stop"

    monkeypatch.setattr(llm, "forward", original_forward)
    history, _ = chat(client, None, "続けて").result()
    assert texts(history, "user") == ["長く話してください", "続けて"], "the session goes on after Stop"
    assert len(texts(history, "assistant")) == 2, "the stopped answer is kept as it was"


def test_two_visitors_keep_separate_histories(server, example_image):
    alice, bob = Client(server, verbose=False), Client(server, verbose=False)
    coffee = REPO / "examples" / "coffee.png"
    jobs = [chat(alice, editor(example_image), "アリスの質問"), chat(bob, editor(coffee), "ボブの質問")]
    for job in jobs:
        job.result()
    alice_history, _ = chat(alice, None, "アリスの二つ目").result()
    assert texts(alice_history, "user") == ["アリスの質問", "アリスの二つ目"]
    bob_history = bob.predict(24, 0, 0.85, 1, 1.0, -1, api_name="/regenerate")
    assert texts(bob_history, "user") == ["ボブの質問"]
    assert Path(files(bob_history)[0]).name == "coffee.png"

    alice_history = alice.predict(api_name="/undo")
    assert texts(alice_history, "user") == ["アリスの質問"]
    cleared, _ = bob.predict(api_name="/clear")
    assert cleared == []
    assert texts(chat(alice, None, "まだいる？").result()[0], "user") == ["アリスの質問", "まだいる？"]


def test_special_characters_are_escaped(client, example_image):
    history, _ = chat(client, editor(example_image), "<s>タグ & 記号</s>").result()
    assert texts(history, "user") == ["&lt;s&gt;タグ &amp; 記号&lt;/s&gt;"]


def test_empty_message_is_refused_politely(client, example_image):
    """An empty message changes nothing (the visitor sees a warning); a new image alone asks for a caption."""
    before, _ = chat(client, editor(example_image), QUESTION).result()
    after, box = chat(client, editor(example_image), "   ").result()
    assert after == before and box == ""
    history, _ = chat(client, None, "次の質問").result()
    assert texts(history, "user") == [QUESTION, "次の質問"]
    coffee = REPO / "examples" / "coffee.png"
    history, _ = chat(client, editor(coffee), "").result()
    assert len(files(history)) == 2 and len(texts(history, "assistant")) == 3, "a new image alone gets a caption"


def test_bad_settings_are_refused_with_the_reason(client, example_image):
    with pytest.raises(Exception, match="less than minimum value"):
        chat(client, editor(example_image), QUESTION, top_p=0).result()
    with pytest.raises(Exception, match="top_p must be between"):
        client.predict(handle_file(str(example_image)), QUESTION, top_p=0, api_name="/ask")


@pytest.fixture
def bad_images(tmp_path, example_image):
    text = tmp_path / "notes.png"
    text.write_text("this is not a picture\n", encoding="utf-8")
    truncated = tmp_path / "truncated.png"
    data = Path(example_image).read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    return {text: "not an image", truncated: "damaged or truncated"}


def test_bad_uploads_give_readable_errors_and_the_server_keeps_serving(client, bad_images, example_image):
    for path, reason in bad_images.items():
        with pytest.raises(Exception, match=reason):
            client.predict(handle_file(str(path)), QUESTION, temperature=0, max_new_tokens=8, api_name="/ask")
        with pytest.raises(Exception) as caught:
            chat(client, editor(path), QUESTION).result()
        assert path.name in str(caught.value) or reason in str(caught.value)
        assert "Traceback" not in str(caught.value)
    assert client.predict(handle_file(str(example_image)), QUESTION, temperature=0, max_new_tokens=8,
                          api_name="/ask")
    history, _ = chat(client, editor(example_image), QUESTION).result()
    assert texts(history, "user") == [QUESTION]


def test_out_of_memory_is_reported_and_the_session_continues(client, tiny_pipeline, example_image, monkeypatch):
    import torch

    def out_of_memory(**kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    chat(client, editor(example_image), "最初").result()
    monkeypatch.setattr(tiny_pipeline.llm, "generate", out_of_memory)
    history, _ = chat(client, None, "メモリが足りない質問").result()
    assert texts(history, "user") == ["最初"], "the failed question is taken back"
    with pytest.raises(Exception, match="out of memory"):
        client.predict(handle_file(str(example_image)), QUESTION, temperature=0, api_name="/ask")
    monkeypatch.undo()
    history, _ = chat(client, None, "もう一度").result()
    assert texts(history, "user") == ["最初", "もう一度"]


# ---------------------------------------------------------------- the stateless API


def test_ask_endpoint_is_greedy_and_matches_the_library(client, tiny_pipeline, example_image):
    settings = GenerationSettings.from_values(temperature=0, max_new_tokens=40)
    expected = tiny_pipeline.ask(example_image, QUESTION, settings).text
    answer = client.predict(handle_file(str(example_image)), QUESTION, temperature=0, max_new_tokens=40,
                            api_name="/ask")
    assert answer == expected
    again = client.predict(image=handle_file(str(example_image)), question=QUESTION, max_new_tokens=40,
                           temperature=0, top_p=0.5, num_beams=1, repetition_penalty=1.0, seed=7, api_name="/ask")
    assert again == expected, "greedy decoding ignores top_p and seed"


def test_api_lists_the_named_endpoints_and_hides_the_helpers(client):
    named = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert {"/chat", "/regenerate", "/undo", "/clear", "/ask"} <= set(named)
    assert [p["parameter_name"] for p in named["/ask"]["parameters"]] == [
        "image", "question", "max_new_tokens", "temperature", "top_p", "num_beams", "repetition_penalty", "seed"]
    assert all(p["parameter_has_default"] for p in named["/ask"]["parameters"][2:])
    assert not [name for name in named if "encode" in name or "stop" in name]


def test_state_is_per_visitor_and_freed(server, tiny_pipeline):
    demo_states = [b for b in app.build_demo(tiny_pipeline).blocks.values() if isinstance(b, gr.State)]
    assert len(demo_states) == 1
    state = demo_states[0]
    assert state.value is None, "each visitor builds a fresh session; nothing shared"
    assert state.time_to_live and state.delete_callback is app._free_visitor
    visitor = app.Visitor(tiny_pipeline)
    visitor.session.ask("こんにちは", max_new_tokens=4, temperature=0)
    app._free_visitor(visitor)
    assert visitor.session.turns == [] and visitor.session._cache is None


def test_queue_is_explicit(tiny_pipeline):
    demo = app.queue(app.build_demo(tiny_pipeline), 5)
    assert demo._queue.max_size == 5
    gpu_fns = [fn for fn in demo.fns.values() if fn.concurrency_id == app.GPU_QUEUE]
    assert {fn.name for fn in gpu_fns} >= {"chat", "regenerate", "ask", "encode_upload"}
    assert all(fn.concurrency_limit == 1 for fn in gpu_fns)


# ---------------------------------------------------------------- start-up


def test_missing_weights_print_one_paragraph_and_exit_nonzero(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), MINIGPT4_JA_CACHE=str(tmp_path / "c"))
    result = subprocess.run([sys.executable, str(REPO / "app.py"), "--preset", "bilingual-4b", "--device", "cpu"],
                            capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert "could not be loaded" in message and "--preset tiny" in message
    assert "bilingual-gpt-neox-4b" in message, "the message names what was missing"
