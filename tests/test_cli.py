"""The command line, exactly as scripts and CI call it, on the tiny preset."""

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from minigpt4_ja.cli import main

ASK = ["ask", "--preset", "tiny", "--temperature", "0", "--max-new-tokens", "10"]


def run_cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "minigpt4_ja", *args], capture_output=True, text=True,
                          input=stdin, timeout=300)


def test_ask_json_matches_the_python_api(tiny_pipeline, example_image, capsys):
    assert main([*ASK, "--image", str(example_image), "--json", "これは何ですか？"]) == 0
    result = json.loads(capsys.readouterr().out)
    expected = tiny_pipeline.ask(example_image, "これは何ですか？", temperature=0, max_new_tokens=10)
    assert result["answer"] == expected.text
    assert result["token_ids"] == expected.token_ids
    assert result["settings"]["temperature"] == 0


def test_embed_writes_queries_and_image_embeds(tmp_path, example_image, tiny_pipeline, capsys):
    out = tmp_path / "image.safetensors"
    assert main(["embed", "--preset", "tiny", "--image", str(example_image), "--out", str(out)]) == 0
    tensors = load_file(out)
    assert tensors["queries"].shape == (1, 32, 768)
    assert tensors["image_embeds"].shape == (1, 32, tiny_pipeline.hidden_size)
    expected = tiny_pipeline.encode_image(example_image)
    assert (tensors["queries"] - expected.queries).abs().max() < 1e-5


def test_convert_then_load_with_weights(tmp_path, example_image, capsys):
    out = tmp_path / "converted"
    assert main(["convert", "--preset", "tiny", "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} >= {"vision_encoder.safetensors", "vision_encoder.json",
                                               "projection.safetensors", "minigpt4_ja.json"}
    capsys.readouterr()
    from minigpt4_ja.loading import tiny_model_dir

    llm = str(tiny_model_dir() / "llm")
    args = ["--image", str(example_image), "--json", "--temperature", "0", "--max-new-tokens", "8", "何？"]
    assert main(["ask", "--preset", "bilingual-4b", "--weights", str(out), "--llm", llm, *args]) == 0
    converted = json.loads(capsys.readouterr().out)
    assert main(["ask", "--preset", "tiny", *args]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == converted["token_ids"]


@pytest.mark.parametrize("args, message", [
    (["ask", "--preset", "tiny", "--image", "no/such/file.png", "q"], "does not exist"),
    (["ask", "--preset", "tiny", "--image", "requirements.txt", "q"], "not an image"),
    (["ask", "--preset", "tiny", "--image", "examples/coffee.png", "--top-p", "2", "q"], "top_p"),
    (["ask", "--preset", "japanese-3.6b", "--image", "examples/coffee.png", "q"], "minigpt4_ja train"),
    (["ask", "--preset", "tiny", "--image", "examples/coffee.png", "--projection", "requirements.txt", "q"],
     "cannot be read"),
])
def test_bad_input_is_one_clear_line(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_terminal_chat(example_image):
    script = "猫は？\n/undo\n色は？\n/retry\n/image examples/coffee.png\nこれは？\n/reset\n/quit\n"
    result = run_cli("chat", "--preset", "tiny", "--image", str(example_image), "--max-new-tokens", "5",
                     "--temperature", "0", stdin=script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("システム> ") == 4
    assert "[undone]" in result.stdout and "[new conversation]" in result.stdout


def test_ask_on_local_real_layout_files_downloads_nothing(tmp_path, example_image, monkeypatch, capsys):
    """bilingual-4b with all four parts given as local files in LAVIS's and rinna's layouts: no network at all."""
    import minigpt4_ja.loading as loading
    from minigpt4_ja.loading import tiny_model_dir
    from weight_fixtures import write_lavis_pair, write_rinna_checkpoint

    def no_network(*args, **kwargs):
        raise AssertionError("tried to download")

    for name in ("download_url", "hub_file"):
        monkeypatch.setattr(loading, name, no_network)
    eva, qformer = write_lavis_pair(tmp_path)
    checkpoint = write_rinna_checkpoint(tmp_path / "checkpoint.pth", hidden=64)
    monkeypatch.setenv("MINIGPT4_JA_CACHE", str(tmp_path / "cache"))  # the conversion cache too starts empty
    llm = str(tiny_model_dir() / "llm")
    args = ["ask", "--preset", "bilingual-4b", "--llm", llm, "--eva-vit", str(eva), "--qformer", str(qformer),
            "--projection", str(checkpoint), "--image", str(example_image), "--temperature", "0",
            "--max-new-tokens", "6", "--json", "猫は？"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert len(first["token_ids"]) > 0
    assert list((tmp_path / "cache" / "converted").iterdir())  # LAVIS files converted once...
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == first["token_ids"]  # ...and the cache gives the same
