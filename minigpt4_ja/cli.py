"""`python -m minigpt4_ja {ask,embed,chat,convert,train,evaluate,bench}`.

Each subcommand lives next to what it drives: a module exposing `add_arguments(parser)` and `main(args) -> int`.
Errors meant for people (InputError, WeightsError) are printed as one line and exit with status 2, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from .errors import MiniGPT4Error
from .generation import GenerationSettings
from .loading import DTYPES, QUANTIZATIONS, ModelOptions
from .presets import DEFAULT_PRESET, PRESETS
from .templates import TEMPLATES

# name -> (module, help). Modules are imported only when their command runs.
COMMANDS = {
    "ask": ("minigpt4_ja.cli", "answer one question about one image"),
    "embed": ("minigpt4_ja.cli", "write an image's 32 Q-Former queries (and projected embeddings) to safetensors"),
    "chat": ("minigpt4_ja.cli", "interactive terminal chat"),
    "convert": ("minigpt4_ja.cli", "write the encoder and projection as one loadable folder"),
    "train": ("minigpt4_ja.training", "train the projection (only the Linear learns)"),
    "evaluate": ("minigpt4_ja.evaluation", "score answers on a VQA-style set"),
    "bench": ("minigpt4_ja.bench", "measure encode time, time to first token, decode speed and memory"),
}


def add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model options")
    group.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS),
                       help=f"named configuration (default {DEFAULT_PRESET}; 'tiny' is random and offline)")
    group.add_argument("--llm", help="LLM Hub id or local folder (overrides the preset)")
    group.add_argument("--eva-vit", metavar="FILE", help="LAVIS eva_vit_g.pth")
    group.add_argument("--qformer", metavar="FILE", help="LAVIS blip2_pretrained_flant5xxl.pth")
    group.add_argument("--projection", metavar="FILE", help="MiniGPT-4 checkpoint.pth or projection.safetensors")
    group.add_argument("--weights", metavar="DIR", help="a folder or Hub repo written by `convert`")
    group.add_argument("--template", choices=sorted(TEMPLATES), help="prompt format (default: the preset's)")
    group.add_argument("--dtype", choices=sorted(DTYPES), help="LLM dtype (default float16 on CUDA, float32 on CPU)")
    group.add_argument("--quantization", choices=QUANTIZATIONS, help="LLM quantization (default int8 on CUDA)")
    group.add_argument("--device", help="cpu, cuda, cuda:1... (default: cuda when available)")


def add_generation_options(parser: argparse.ArgumentParser) -> None:
    defaults = GenerationSettings()
    group = parser.add_argument_group("generation options")
    group.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    group.add_argument("--temperature", type=float, default=defaults.temperature, help="0 means greedy")
    group.add_argument("--top-p", type=float, default=defaults.top_p)
    group.add_argument("--num-beams", type=int, default=defaults.num_beams)
    group.add_argument("--repetition-penalty", type=float, default=defaults.repetition_penalty)
    group.add_argument("--seed", type=int, default=None)


def generation_settings(args: argparse.Namespace) -> GenerationSettings:
    return GenerationSettings.from_values(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        num_beams=args.num_beams, repetition_penalty=args.repetition_penalty, seed=args.seed)


def load_from_args(args: argparse.Namespace, require_projection: bool = True):
    from .loading import load_pipeline

    return load_pipeline(ModelOptions.from_namespace(args), require_projection=require_projection)


# ---------------------------------------------------------------- ask / embed / chat / convert

def _ask_arguments(parser):
    add_model_options(parser)
    parser.add_argument("--image", required=True, help="image file")
    add_generation_options(parser)
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of the answer text")
    parser.add_argument("question", help="the question (Japanese or English); empty asks for a caption")


def _ask_main(args) -> int:
    settings = generation_settings(args)
    pipeline = load_from_args(args)
    image = pipeline.encode_image(args.image)
    reply = pipeline.ask(image, args.question, settings)
    for notice in reply.notices:
        print(notice, file=sys.stderr)
    if args.json:
        print(json.dumps({"answer": reply.text, "token_ids": reply.token_ids, "finish_reason": reply.finish_reason,
                          "prompt_tokens": reply.prompt_tokens, "notices": reply.notices,
                          "settings": settings.to_dict(), "model": pipeline.description}, ensure_ascii=False))
    else:
        print(reply.text)
    return 0


def _embed_arguments(parser):
    add_model_options(parser)
    parser.add_argument("--image", required=True)
    parser.add_argument("--out", required=True, metavar="FILE.safetensors")


def _embed_main(args) -> int:
    from safetensors.torch import save_file

    # The queries need no projection; the projected embeddings are written when one is available.
    pipeline = load_from_args(args, require_projection=False)
    image = pipeline.encode_image(args.image)
    tensors = {"queries": image.queries.float().contiguous()}
    if pipeline.projection_source is not None:
        tensors["image_embeds"] = image.embeds.float().cpu().contiguous()
    save_file(tensors, args.out, metadata={"image": str(args.image), "model": pipeline.description})
    print(f"wrote {args.out}: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in tensors.items()))
    return 0


def _chat_arguments(parser):
    add_model_options(parser)
    parser.add_argument("--image", help="image to start with (add more later with /image PATH)")
    add_generation_options(parser)


CHAT_HELP = "commands: /image PATH  /undo  /retry  /reset  /quit   (Ctrl-C stops an answer)"


def _chat_main(args) -> int:
    from .errors import InputError

    settings = generation_settings(args)
    pipeline = load_from_args(args)
    session = pipeline.chat()
    print(pipeline.description)
    print(CHAT_HELP)
    if args.image:
        session.add_image(args.image)
        print(f"[image] {args.image}")
    while True:
        try:
            line = input("ユーザー> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        command, _, rest = line.strip().partition(" ")
        try:
            if command in ("/quit", "/exit"):
                return 0
            if command == "/image":
                session.add_image(rest.strip())
                print(f"[image] {rest.strip()}")
                continue
            if command == "/undo":
                print("[undone]" if session.undo() else "[nothing to undo]")
                continue
            if command == "/reset":
                session.reset()
                print("[new conversation]")
                continue
            stream = session.regenerate(settings) if command == "/retry" else session.stream(line, settings)
            _print_stream(stream)
        except InputError as err:
            print(f"[error] {err}")


def _print_stream(stream) -> None:
    shown = ""
    print("システム> ", end="", flush=True)
    try:
        for text in stream:
            if text.startswith(shown):
                print(text[len(shown):], end="", flush=True)
            shown = text
    except KeyboardInterrupt:
        stream.stop()
        print(" [stopped]", end="")
    print()
    if stream.reply:
        for notice in stream.reply.notices:
            print(f"[note] {notice}")


def _convert_arguments(parser):
    add_model_options(parser)
    parser.add_argument("--out", required=True, metavar="DIR")


def _convert_main(args) -> int:
    from .loading import convert

    out = convert(ModelOptions.from_namespace(args), args.out)
    print(f"wrote {out}: " + ", ".join(sorted(p.name for p in out.iterdir())))
    print(f"load it with --weights {out} (or push the folder to the Hub and pass its repo id)")
    return 0


add_arguments = {"ask": _ask_arguments, "embed": _embed_arguments, "chat": _chat_arguments,
                 "convert": _convert_arguments}
main_functions = {"ask": _ask_main, "embed": _embed_main, "chat": _chat_main, "convert": _convert_main}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m minigpt4_ja", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if module_name == __name__:
            add_arguments[name](sub)
        else:
            importlib.import_module(module_name).add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module_name = COMMANDS[args.command][0]
    run = main_functions[args.command] if module_name == __name__ else importlib.import_module(module_name).main
    try:
        return run(args)
    except MiniGPT4Error as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
