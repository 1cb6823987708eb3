"""Gradio demo for Japanese MiniGPT-4: chat about an image in Japanese or English.

    python app.py                  # rinna/bilingual-gpt-neox-4b-minigpt4 (int8 on CUDA, fp32 on CPU)
    python app.py --preset tiny    # random tiny model, offline: checks the app, the answers mean nothing

This file is only layout, events and per-visitor state; everything model-related lives in `minigpt4_ja`.
"""

from __future__ import annotations

# `spaces` must be imported before torch on ZeroGPU; elsewhere it is absent or a no-op.
try:
    import spaces

    gpu = spaces.GPU(duration=120)
except ImportError:  # not on Hugging Face Spaces
    def gpu(fn):
        return fn

import argparse
import hashlib
import html
import os
import sys
import threading
import weakref
from collections import OrderedDict
from pathlib import Path

import gradio as gr
import torch
from PIL import Image

from minigpt4_ja.cli import add_model_options
from minigpt4_ja.errors import InputError, MiniGPT4Error
from minigpt4_ja.generation import GenerationSettings
from minigpt4_ja.images import load_image
from minigpt4_ja.loading import ModelOptions, load_pipeline

HERE = Path(__file__).resolve().parent
EXAMPLES_DIR = HERE / "examples"

SESSION_TTL_S = 30 * 60  # a visitor's conversation (and its KV cache) is freed after 30 idle minutes
QUEUE_SIZE = 16  # visitors waiting beyond this are told to try again
LOCK_TIMEOUT_S = 30
ENCODED_IMAGES_KEPT = 8  # per visitor: images encoded but not (or no longer) in the conversation
GPU_QUEUE = "gpu"  # every event that runs the model shares this one concurrency slot
OutOfMemoryError = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch < 2.5 has only the latter
DEFAULTS = GenerationSettings()

EXAMPLES = [
    ("chelsea.png", "この画像について詳しく説明してください。"),
    ("coffee.png", "これは何の飲み物ですか？"),
    ("astronaut.png", "この人は何をしている人ですか？"),
    ("rocket.jpg", "この写真では何が起きていますか？"),
]

HEADER = """
# 日本語 MiniGPT-4 / Japanese MiniGPT-4
画像をアップロード（貼り付け・カメラも可）し、必要なら赤いペンで注目してほしい所を丸で囲んで、日本語か英語で質問してください。<br>
Upload, paste or take a picture, circle what you mean with the red brush if you like, and ask in Japanese or English.
"""

MODEL_CARD = """
**モデル / Model:** [rinna/bilingual-gpt-neox-4b-minigpt4](https://huggingface.co/rinna/bilingual-gpt-neox-4b-minigpt4) (MIT).
BLIP-2 の EVA ViT-g と Q-Former（[BLIP-2](https://arxiv.org/abs/2301.12597)）が画像を 32 個のベクトルにし、学習済みの線形層1つが
rinna の日英バイリンガル GPT-NeoX 3.8B（[rinna/bilingual-gpt-neox-4b](https://huggingface.co/rinna/bilingual-gpt-neox-4b)）に渡します
（[MiniGPT-4](https://github.com/Vision-CAIR/MiniGPT-4) の構成）。
The frozen EVA ViT-g and Q-Former from BLIP-2 turn the image into 32 vectors; one trained linear layer feeds them to rinna's
bilingual GPT-NeoX 3.8B, as in MiniGPT-4.

**学習 / Training:** MiniGPT-4 の第1段階（CC12M, COCO 2014, Visual Genome, STAIR Captions, Japanese Visual Genome VQA での事前学習）のみで、
第2段階の会話向け微調整はしていません。 Only MiniGPT-4's first, pretraining stage was run; the second, conversation-alignment
stage was not, so answers are often short and caption-like.

**限界 / Limits:** 画像にないものを答えることがあります（ハルシネーション）。日本語の質問に英語で答えたり、途中で言語が変わったりします。
画像は 224×224 で見るため小さな文字や細部は読めません。事実の確認には使わないでください。
It can describe things that are not in the image (hallucination), drift between Japanese and English, and sees the image at
224×224, so small text and details are lost. Do not rely on it for facts.

**API:** `from gradio_client import Client, handle_file; Client(URL).predict(handle_file("cat.png"), "これは何？", api_name="/ask")`
(optional: `max_new_tokens, temperature` (0 = greedy), `top_p, num_beams, repetition_penalty, seed`).
"""

CSS = """
#chatbot .image-frame img { max-height: 200px; width: auto; }
.model-line { font-size: 0.85em; opacity: 0.75; }
"""


# ---------------------------------------------------------------- per-visitor state

class Visitor:
    """One visitor's conversation: a ChatSession (turns, images, KV cache) plus the image files shown in the chat."""

    def __init__(self, pipeline):
        self.session = pipeline.chat()
        self.lock = threading.Lock()  # one model call per visitor at a time; Undo/Clear wait for it
        self.images: OrderedDict[str, object] = OrderedDict()  # image key -> ImageEmbedding, encoded once
        self.image_files: dict[int, str] = {}  # ImageEmbedding.uid -> file shown in the chat
        self.stream = None  # the ReplyStream being generated, so Stop can end it from another thread

    def close(self) -> None:
        """Free everything (the visitor left): stop any answer, then drop the turns, images and KV cache."""
        if self.stream is not None:
            self.stream.stop()
        locked = self.lock.acquire(timeout=LOCK_TIMEOUT_S)
        try:
            self.session.reset()
            self.images.clear()
            self.image_files.clear()
        finally:
            if locked:
                self.lock.release()

    def new_conversation(self) -> None:
        """Clear: the turns and KV cache go; images stay encoded in case the same picture is sent again."""
        self.session.reset()
        kept = {embedding.uid for embedding in self.images.values()}
        self.image_files = {uid: path for uid, path in self.image_files.items() if uid in kept}

    def in_conversation(self, embedding) -> bool:
        session = self.session
        return any(embedding is e for e in session.pending_images) or any(
            embedding is e for turn in session.turns for e in turn.images)


_VISITORS: "weakref.WeakValueDictionary[str, Visitor]" = weakref.WeakValueDictionary()


def _free_visitor(visitor: Visitor | None) -> None:
    """gr.State's delete_callback: the visitor left or idled past SESSION_TTL_S."""
    if visitor is not None:
        visitor.close()


def _on_unload(request: gr.Request) -> None:
    """The tab was closed: drop that conversation now rather than when Gradio deletes the state an hour later."""
    visitor = _VISITORS.pop(getattr(request, "session_hash", None) or "", None)
    if visitor is not None:
        visitor.close()


# ---------------------------------------------------------------- helpers (no model code here)

def escape(text: str) -> str:
    """The Chatbot renders Markdown and HTML: a literal `<s>` would strike the rest through."""
    return html.escape(text or "", quote=False)


def image_key(image: Image.Image) -> str:
    """Identifies an image by its pixels, so the same picture is encoded only once per visitor."""
    digest = hashlib.sha256(f"{image.mode}{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def editor_image(value) -> str | None:
    """The image the visitor means: the editor's composite (the picture with any red marks), as a file path."""
    if not value:
        return None
    if isinstance(value, (str, Path)):
        return str(value)
    return value.get("composite") or value.get("background")


def settings_from(max_new_tokens, temperature, top_p, num_beams, repetition_penalty, seed) -> GenerationSettings:
    if seed is not None and seed != "" and float(seed) < 0:
        seed = None  # -1 (or blank) means a new random seed each time
    return GenerationSettings.from_values(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, num_beams=num_beams,
        repetition_penalty=repetition_penalty, seed=seed)


def render(visitor: Visitor | None, streaming: str | None = None) -> list[dict]:
    """The Chatbot's messages, rebuilt from the session so Undo, Regenerate and Stop always agree with it."""
    if visitor is None:
        return []
    messages = []
    for turn in visitor.session.turns:
        for embedding in turn.images:
            path = visitor.image_files.get(embedding.uid)
            if path:
                messages.append({"role": "user", "content": {"path": path}})
        if turn.question:
            messages.append({"role": "user", "content": escape(turn.question)})
        if turn.answer is not None:
            messages.append({"role": "assistant", "content": escape(turn.answer) or "…"})
    if streaming:
        messages.append({"role": "assistant", "content": escape(streaming)})
    return messages


def _input_error(err: Exception) -> gr.Error:
    return gr.Error(str(err), title="入力エラー / Input error", print_exception=False)


def _oom_message() -> str:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return ("GPU のメモリが足りませんでした。max new tokens を減らすか、Clear で会話を新しくしてください。 "
            "The GPU ran out of memory: lower max new tokens or press Clear to start a new conversation.")


class ImageInput(gr.ImageEditor):
    """gr.ImageEditor whose unreadable uploads give the library's readable message instead of a bare 'Error'."""

    is_template = True  # rendered by the ImageEditor front end

    def preprocess(self, payload):
        try:
            return super().preprocess(payload)
        except Exception as err:  # PIL raises many kinds (UnidentifiedImageError, OSError, SyntaxError, ...)
            message = "the image could not be read"
            for part in (getattr(payload, "composite", None), getattr(payload, "background", None)):
                path = getattr(part, "path", None)
                if path:
                    try:
                        load_image(path)
                    except InputError as described:
                        message = str(described)
                        break
            raise gr.Error(message, title="画像を読めません / Unreadable image", print_exception=False) from err


# ---------------------------------------------------------------- the app

def build_demo(pipeline) -> gr.Blocks:
    """The Blocks app around a loaded `Pipeline` (tests build it around the tiny one)."""

    def visitor_for(visitor: Visitor | None, request: gr.Request | None) -> Visitor:
        if visitor is None:
            visitor = Visitor(pipeline)
        session_hash = getattr(request, "session_hash", None)
        if session_hash:
            _VISITORS[session_hash] = visitor
        return visitor

    def encode(visitor: Visitor, path: str):
        """The ImageEmbedding for `path`, encoded at most once per visitor."""
        image = load_image(path)  # decoded once, through the library's checks (pixel limit, RGB, EXIF)
        key = image_key(image)
        embedding = visitor.images.get(key)
        if embedding is None:
            embedding = pipeline.encode_image(image)
            visitor.images[key] = embedding
            while len(visitor.images) > ENCODED_IMAGES_KEPT:
                visitor.images.popitem(last=False)
        visitor.images.move_to_end(key)
        visitor.image_files.setdefault(embedding.uid, path)
        return embedding

    def acquire(visitor: Visitor) -> None:
        if not visitor.lock.acquire(timeout=LOCK_TIMEOUT_S):
            raise gr.Error("前の回答がまだ終わっていません。 The previous answer is still running; press Stop first.",
                           print_exception=False)

    def run_stream(visitor: Visitor, start):
        """Yield chat renders while `start()`'s ReplyStream generates; closing this generator stops generation."""
        stream = start()
        visitor.stream = stream
        tokens = iter(stream)
        try:
            for text in tokens:
                yield render(visitor, text or "…")
        except InputError as err:  # e.g. the conversation no longer fits: the library has undone the turn
            gr.Warning(str(err), title="入力エラー / Input error")
        except OutOfMemoryError:  # the library has forgotten the turn and freed its cache
            gr.Warning(_oom_message(), title="メモリ不足 / Out of memory")
        finally:
            tokens.close()  # sets the stop event and joins the generation thread
            visitor.stream = None
        if stream.reply is not None:
            for notice in stream.reply.notices:
                gr.Info(notice)
        yield render(visitor)

    @gpu
    def chat(visitor, image, message, max_new_tokens, temperature, top_p, num_beams, repetition_penalty,
             seed, request: gr.Request = None):
        """Send a message (with the editor's image if it is new to the conversation); stream the answer."""
        visitor = visitor_for(visitor, request)
        message = (message or "").strip()
        try:
            settings = settings_from(max_new_tokens, temperature, top_p, num_beams, repetition_penalty, seed)
        except InputError as err:
            raise _input_error(err) from None
        acquire(visitor)
        try:
            path = editor_image(image)
            try:
                embedding = encode(visitor, path) if path else None
            except InputError as err:
                raise _input_error(err) from None
            except OutOfMemoryError:
                gr.Warning(_oom_message(), title="メモリ不足 / Out of memory")
                yield visitor, render(visitor), message
                return
            new_image = embedding is not None and not visitor.in_conversation(embedding)
            if not message and not new_image:  # a warning, not an error: nothing is wrong with the conversation
                gr.Warning("質問を入力してください（新しい画像だけを送ると説明文を返します）。 Type a question "
                           "(or send a new image on its own to get a caption).", title="空のメッセージ / Empty message")
                yield visitor, render(visitor), message
                return
            if new_image:
                visitor.session.add_image(embedding)  # joins this user turn
            pending = render(visitor) + [{"role": "user", "content": {"path": visitor.image_files[e.uid]}}
                                         for e in visitor.session.pending_images if e.uid in visitor.image_files]
            if message:
                pending.append({"role": "user", "content": escape(message)})
            yield visitor, pending, ""
            for messages in run_stream(visitor, lambda: visitor.session.stream(message, settings)):
                yield visitor, messages, ""
        finally:
            visitor.lock.release()

    @gpu
    def regenerate(visitor, max_new_tokens, temperature, top_p, num_beams, repetition_penalty, seed,
                   request: gr.Request = None):
        """Answer the last question again."""
        visitor = visitor_for(visitor, request)
        try:
            settings = settings_from(max_new_tokens, temperature, top_p, num_beams, repetition_penalty, seed)
        except InputError as err:
            raise _input_error(err) from None
        if not visitor.session.turns:
            raise gr.Error("やり直す質問がありません。 There is no question to answer again.",
                           title="再生成 / Regenerate", print_exception=False)
        acquire(visitor)
        try:
            shown = render(visitor)
            if shown and shown[-1]["role"] == "assistant":
                shown = shown[:-1]
            yield visitor, shown
            for messages in run_stream(visitor, lambda: visitor.session.regenerate(settings)):
                yield visitor, messages
        finally:
            visitor.lock.release()

    def undo(visitor, request: gr.Request = None):
        """Remove the last question and its answer."""
        visitor = visitor_for(visitor, request)
        acquire(visitor)
        try:
            visitor.session.undo()
        finally:
            visitor.lock.release()
        return visitor, render(visitor)

    def clear(visitor, request: gr.Request = None):
        """Start a new conversation (the image stays in the editor and is not encoded again)."""
        visitor = visitor_for(visitor, request)
        acquire(visitor)
        try:
            visitor.new_conversation()
        finally:
            visitor.lock.release()
        return visitor, [], ""

    def stop(visitor):
        """Ends generation within a token, even inside a beam search (the cancelled event closes the stream too)."""
        if visitor is not None and visitor.stream is not None:
            visitor.stream.stop()

    @gpu
    def encode_upload(visitor, editor_value, request: gr.Request = None):
        """Encode a freshly uploaded image right away, so Send only has to generate."""
        visitor = visitor_for(visitor, request)
        path = editor_image(editor_value)
        if path:
            try:
                encode(visitor, path)
            except InputError as err:
                gr.Warning(str(err), title="画像を読めません / Unreadable image")
            except OutOfMemoryError:
                gr.Warning(_oom_message(), title="メモリ不足 / Out of memory")
        return visitor

    @gpu
    def ask(image, question, max_new_tokens=DEFAULTS.max_new_tokens, temperature=DEFAULTS.temperature,
            top_p=DEFAULTS.top_p, num_beams=DEFAULTS.num_beams, repetition_penalty=DEFAULTS.repetition_penalty,
            seed=-1):
        """Stateless: one answer about one image. temperature=0 is greedy (deterministic)."""
        try:
            settings = settings_from(max_new_tokens, temperature, top_p, num_beams, repetition_penalty, seed)
            embedding = pipeline.encode_image(image) if image else None
            if embedding is None and not (question or "").strip():
                raise InputError("give an image, a question, or both")
            return pipeline.ask(embedding, question or "", settings).text
        except MiniGPT4Error as err:
            raise gr.Error(str(err), print_exception=False) from None
        except OutOfMemoryError:
            raise gr.Error(_oom_message(), print_exception=False) from None

    tiny = getattr(pipeline, "description", "").startswith("tiny")
    with gr.Blocks(title="Japanese MiniGPT-4 / 日本語 MiniGPT-4") as demo:
        gr.Markdown(HEADER)
        if tiny:
            gr.Markdown("⚠️ **tiny preset**: ランダムな小さいモデルです。回答に意味はありません。 "
                        "Random weights for testing the app: the answers mean nothing.")
        visitor_state = gr.State(None, time_to_live=SESSION_TTL_S, delete_callback=_free_visitor)
        with gr.Row(equal_height=False):
            with gr.Column(scale=5, min_width=320):
                editor = ImageInput(
                    label="画像 / Image",
                    type="filepath", image_mode="RGB", format="png",
                    sources=("upload", "clipboard", "webcam"),
                    brush=gr.Brush(colors=["#ff0000"], default_color="#ff0000", color_mode="fixed"),
                    eraser=gr.Eraser(), layers=False, transforms=(), height=440,
                    placeholder="画像をドロップ / Drop an image", elem_id="image-editor")
                with gr.Accordion("パラメータ / Parameters", open=False):
                    max_new_tokens = gr.Slider(1, 2048, value=DEFAULTS.max_new_tokens, step=1,
                                               label="最大トークン数 / Max new tokens", elem_id="max-new-tokens")
                    temperature = gr.Slider(0.0, 2.0, value=DEFAULTS.temperature, step=0.05,
                                            label="温度 / Temperature", info="0 = 貪欲法 / greedy",
                                            elem_id="temperature")
                    top_p = gr.Slider(0.05, 1.0, value=DEFAULTS.top_p, step=0.01, label="Top-p")
                    num_beams = gr.Slider(1, 8, value=DEFAULTS.num_beams, step=1, label="ビーム数 / Beams",
                                          info="2 以上は逐次表示なし / more than 1 does not stream")
                    repetition_penalty = gr.Slider(0.5, 2.0, value=DEFAULTS.repetition_penalty, step=0.05,
                                                   label="繰り返しペナルティ / Repetition penalty")
                    seed = gr.Number(value=-1, precision=0, label="シード / Seed", info="-1 = ランダム / random")
            with gr.Column(scale=7, min_width=360):
                chatbot = gr.Chatbot(
                    label="会話 / Chat", elem_id="chatbot", height=520, layout="bubble",
                    buttons=["copy", "copy_all"], feedback_options=None,
                    placeholder="画像を選んで質問してください。<br>Pick an image and ask a question.")
                textbox = gr.Textbox(
                    label="質問 / Question", show_label=False, lines=1, max_lines=8, elem_id="message",
                    placeholder="質問を入力して Enter（改行は Shift+Enter） / Ask about the image, Enter to send")
                with gr.Row():
                    send_btn = gr.Button("送信 / Send", variant="primary", elem_id="send")
                    stop_btn = gr.Button("停止 / Stop", variant="stop", elem_id="stop")
                with gr.Row():
                    regen_btn = gr.Button("再生成 / Regenerate", size="sm", elem_id="regenerate")
                    undo_btn = gr.Button("取り消し / Undo", size="sm", elem_id="undo")
                    clear_btn = gr.Button("クリア / Clear", size="sm", elem_id="clear")
        gr.Examples(
            examples=[[str(EXAMPLES_DIR / name), question] for name, question in EXAMPLES
                      if (EXAMPLES_DIR / name).is_file()],
            inputs=[editor, textbox], label="例 / Examples (examples/LICENSES.md)", examples_per_page=8)
        with gr.Accordion("このモデルについて / About this model", open=False):
            gr.Markdown(MODEL_CARD)
        gr.Markdown(f"Model: `{getattr(pipeline, 'description', '')}`", elem_classes="model-line")

        # The stateless API for researchers: hidden components, one named endpoint.
        with gr.Column(visible=False):
            api_image = gr.File(label="image", type="filepath")
            api_question = gr.Textbox(label="question")
            api_numbers = [
                gr.Number(value=DEFAULTS.max_new_tokens, precision=0, label="max_new_tokens"),
                gr.Number(value=DEFAULTS.temperature, label="temperature"),
                gr.Number(value=DEFAULTS.top_p, label="top_p"),
                gr.Number(value=DEFAULTS.num_beams, precision=0, label="num_beams"),
                gr.Number(value=DEFAULTS.repetition_penalty, label="repetition_penalty"),
                gr.Number(value=-1, precision=0, label="seed"),
            ]
            api_answer = gr.Textbox(label="answer")
            api_button = gr.Button()

        params = [max_new_tokens, temperature, top_p, num_beams, repetition_penalty, seed]
        gpu_event = dict(concurrency_limit=1, concurrency_id=GPU_QUEUE)
        chat_inputs = [visitor_state, editor, textbox, *params]
        chat_outputs = [visitor_state, chatbot, textbox]
        send_event = send_btn.click(chat, chat_inputs, chat_outputs, api_name="chat", show_progress="full",
                                    show_progress_on=[chatbot], **gpu_event)
        submit_event = textbox.submit(chat, chat_inputs, chat_outputs, api_visibility="private",
                                      show_progress="full", show_progress_on=[chatbot], **gpu_event)
        regen_event = regen_btn.click(regenerate, [visitor_state, *params], [visitor_state, chatbot],
                                      api_name="regenerate", show_progress="full", show_progress_on=[chatbot],
                                      **gpu_event)
        generating = [send_event, submit_event, regen_event]
        stop_btn.click(stop, [visitor_state], None, cancels=generating, queue=False, api_visibility="private")
        undo_btn.click(undo, [visitor_state], [visitor_state, chatbot], cancels=generating, api_name="undo",
                       concurrency_limit=None)
        clear_btn.click(clear, [visitor_state], [visitor_state, chatbot, textbox], cancels=generating,
                        api_name="clear", concurrency_limit=None)
        chatbot.clear(clear, [visitor_state], [visitor_state, chatbot, textbox], cancels=generating,
                      api_visibility="private", concurrency_limit=None)  # the Chatbot's own trash icon
        editor.upload(encode_upload, [visitor_state, editor], [visitor_state], api_visibility="private",
                      show_progress="hidden", **gpu_event)
        api_button.click(ask, [api_image, api_question, *api_numbers], [api_answer], api_name="ask", **gpu_event)
        demo.unload(_on_unload)
    return demo


# ---------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Japanese MiniGPT-4 Gradio demo")
    add_model_options(parser)
    server = parser.add_argument_group("server options")
    server.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="address to listen on (default $GRADIO_SERVER_NAME or 127.0.0.1; 0.0.0.0 for everyone)")
    server.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
                        help="port (default $GRADIO_SERVER_PORT or 7860)")
    server.add_argument("--share", action="store_true", help="also open a temporary public gradio.live link")
    server.add_argument("--queue-size", type=int, default=QUEUE_SIZE,
                        help=f"visitors who may wait in the queue (default {QUEUE_SIZE})")
    return parser


def startup_failure(err: MiniGPT4Error, args: argparse.Namespace) -> str:
    """One paragraph saying what could not be loaded and what to do instead."""
    return (f"app.py: the model could not be loaded: {err}. "
            f"The '{args.preset}' preset needs its LLM, the MiniGPT-4 projection and the LAVIS EVA ViT-g and Q-Former "
            "weights, which are downloaded on the first start (about 10 GB for bilingual-4b), so check the network "
            "connection and the Hugging Face cache, or point --llm, --eva-vit, --qformer and --projection (or "
            "--weights) at local copies. To try the app offline without any download, run "
            "`python app.py --preset tiny` (random weights: the answers mean nothing).")


def queue(demo: gr.Blocks, size: int = QUEUE_SIZE) -> gr.Blocks:
    return demo.queue(default_concurrency_limit=1, max_size=size, status_update_rate="auto")


LAUNCH_OPTIONS = dict(
    theme=gr.themes.Soft(primary_hue="rose", font=["Noto Sans JP", "Hiragino Sans", "Yu Gothic", "ui-sans-serif",
                                                   "system-ui", "sans-serif"],
                         font_mono=["ui-monospace", "monospace"]),
    css=CSS, max_file_size="20mb",
)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        pipeline = load_pipeline(ModelOptions.from_namespace(args))
    except MiniGPT4Error as err:
        print(startup_failure(err, args), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(f"loaded {pipeline.description}", flush=True)
    demo = queue(build_demo(pipeline), args.queue_size)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, **LAUNCH_OPTIONS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
