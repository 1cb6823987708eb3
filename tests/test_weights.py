"""Weight files: rinna's projection in both formats, errors that name the file and the key or shapes, the sha256-checked
download (against a local HTTP server), and the cache of converted LAVIS weights."""

from __future__ import annotations

import hashlib
import http.server
import os
import re
import shutil
import threading
from pathlib import Path
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from weight_fixtures import (
    TINY, eva_vit_state_dict, qformer_state_dict, rinna_checkpoint, save_blip2_checkpoint, save_eva_vit,
    write_blip2_qformer, write_lavis_pair, write_rinna_checkpoint,
)
from minigpt4_ja import WeightsError, cli, loading, vision
from minigpt4_ja.presets import DEFAULT_PRESET, RemoteFile, get_preset
from minigpt4_ja.weights import download_url, load_projection, save_projection

HIDDEN = 64


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIGPT4_JA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def lavis_files(tmp_path_factory):
    return write_lavis_pair(tmp_path_factory.mktemp("lavis"), TINY)


def load_cli_encoder(eva: Path, qformer: Path) -> vision.VisionEncoder:
    """What `--eva-vit FILE --qformer FILE` does on every model-loading command."""
    options = loading.ModelOptions(eva_vit=str(eva), qformer=str(qformer))
    return loading.load_vision_encoder(options, get_preset(DEFAULT_PRESET), None)


class RunsCodeOnLoad:
    """A pickle that would create `marker` if it were unpickled without weights_only."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ---------------------------------------------------------------- the projection

def test_rinna_checkpoint_and_safetensors_give_identical_projection(tmp_path):
    checkpoint = write_rinna_checkpoint(tmp_path / "checkpoint.pth", hidden=HIDDEN)
    saved = torch.load(checkpoint, weights_only=True)["model"]

    from_checkpoint, metadata = load_projection(checkpoint, 768, HIDDEN)
    assert metadata == {}
    assert torch.equal(from_checkpoint["weight"], saved["llama_proj.weight"])
    assert torch.equal(from_checkpoint["bias"], saved["llama_proj.bias"])
    assert from_checkpoint["weight"].dtype == torch.float32

    converted = save_projection(from_checkpoint["weight"], from_checkpoint["bias"], tmp_path / "projection.safetensors",
                                {"llm": "rinna/bilingual-gpt-neox-4b", "template": "bilingual"})
    from_safetensors, metadata = load_projection(converted, 768, HIDDEN)
    assert metadata == {"llm": "rinna/bilingual-gpt-neox-4b", "template": "bilingual"}
    for name in ("weight", "bias"):
        assert torch.equal(from_safetensors[name], from_checkpoint[name]), name

    linear = loading.build_projection(checkpoint, 768, HIDDEN)
    assert torch.equal(linear.weight, saved["llama_proj.weight"]) and torch.equal(linear.bias, saved["llama_proj.bias"])


def test_projection_checkpoint_is_read_with_weights_only(tmp_path):
    """A checkpoint.pth that would run code when unpickled is refused, and the code does not run."""
    marker = tmp_path / "code-ran"
    checkpoint = rinna_checkpoint(hidden=HIDDEN) | {"config": RunsCodeOnLoad(marker)}
    torch.save(checkpoint, tmp_path / "checkpoint.pth")
    with pytest.raises(WeightsError, match=re.escape(str(tmp_path / "checkpoint.pth"))):
        load_projection(tmp_path / "checkpoint.pth", 768, HIDDEN)
    assert not marker.exists()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _without_llama_proj(path: Path) -> Path:
    checkpoint = rinna_checkpoint(hidden=HIDDEN)
    checkpoint["model"] = {k: v for k, v in checkpoint["model"].items() if not k.startswith("llama_proj.")}
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize("case, make, expected", [
    ("missing file", lambda p: p, ["does not exist"]),
    ("garbage", lambda p: _write(p, b"<html>404 Not Found</html>" * 40), ["cannot be read"]),
    ("no llama_proj", _without_llama_proj, ["llama_proj.weight"]),
    ("wrong shape", lambda p: write_rinna_checkpoint(p, hidden=HIDDEN * 2), ["(128, 768)", f"({HIDDEN}, 768)"]),
    ("garbage safetensors", lambda p: _write(p.with_suffix(".safetensors"), b"\x00" * 64), ["cannot be read"]),
    ("wrong shape safetensors", lambda p: save_projection(torch.zeros(HIDDEN, 1024), torch.zeros(HIDDEN),
                                                           p.with_suffix(".safetensors")), ["(64, 1024)", "(64, 768)"]),
])
def test_projection_errors_name_the_file_and_the_problem(case, make, expected, tmp_path):
    path = make(tmp_path / "checkpoint.pth")
    with pytest.raises(WeightsError) as caught:
        load_projection(path, 768, HIDDEN)
    message = str(caught.value)
    assert str(path) in message, message
    for part in expected:
        assert part in message, message


@pytest.mark.parametrize("case", ["garbage", "missing", "garbage safetensors"])
def test_convert_reports_an_unreadable_projection_as_a_weights_error(case, lavis_files, tmp_path, capsys):
    """`convert --projection FILE` with a bad FILE must end with a one-line error (exit 2), not a traceback."""
    eva, qformer = lavis_files
    projection = tmp_path / ("projection.safetensors" if "safetensors" in case else "checkpoint.pth")
    if case != "missing":
        projection.write_bytes(b"not a checkpoint at all" * 10)
    argv = ["convert", "--eva-vit", str(eva), "--qformer", str(qformer), "--projection", str(projection),
            "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 2
    assert str(projection) in capsys.readouterr().err


# ---------------------------------------------------------------- LAVIS files: errors

def _eva_without(key: str):
    def make(folder: Path) -> Path:
        return save_eva_vit({k: v for k, v in eva_vit_state_dict(TINY).items() if k != key}, folder / "eva_vit_g.pth")
    return make


def _qformer_with(key: str, value: torch.Tensor | None):
    def make(folder: Path) -> Path:
        model = qformer_state_dict(TINY)
        if value is None:
            del model[key]
        else:
            model[key] = value
        return save_blip2_checkpoint(model, folder / "blip2_pretrained_flant5xxl.pth")
    return make


def _qformer_for_another_vit(folder: Path) -> Path:
    """A Q-Former trained on a 64-wide ViT (like BLIP-2's ViT-L Q-Formers next to ViT-g) with the 32-wide ViT."""
    return write_blip2_qformer(folder / "blip2_pretrained_flant5xxl.pth", replace(TINY, vit_width=64))


def _garbage(name: str):
    def make(folder: Path) -> Path:
        (folder / name).write_text("this is not a checkpoint\n" * 20)
        return folder / name
    return make


def _pickle_running_code(name: str):
    def make(folder: Path) -> Path:
        torch.save({"model": qformer_state_dict(TINY), "config": RunsCodeOnLoad(folder / "code-ran")}, folder / name)
        return folder / name
    return make


# (case, which file is broken, how to make it, regexes the message must contain besides the file's path or name)
LAVIS_ERRORS = [
    ("EVA file missing", "eva", lambda folder: folder / "eva_vit_g.pth", [r"does not exist"]),
    ("EVA file garbage", "eva", _garbage("eva_vit_g.pth"), [r"cannot be read"]),
    ("EVA block key missing", "eva", _eva_without("blocks.1.mlp.fc2.weight"), [r"(blocks|layers)\.1\.mlp\.fc2\.weight"]),
    ("EVA first block key missing", "eva", _eva_without("blocks.0.mlp.fc1.weight"),
     [r"(blocks|layers)\.0\.mlp\.fc1\.weight"]),
    ("files swapped", "eva", lambda folder: write_blip2_qformer(folder / "eva_vit_g.pth"), [r"cls_token"]),
    ("Q-Former file missing", "qformer", lambda folder: folder / "blip2_pretrained_flant5xxl.pth",
     [r"does not exist"]),
    ("Q-Former garbage", "qformer", _garbage("blip2_pretrained_flant5xxl.pth"), [r"cannot be read"]),
    ("Q-Former runs code", "qformer", _pickle_running_code("blip2_pretrained_flant5xxl.pth"), [r"cannot be read"]),
    ("Q-Former without query_tokens", "qformer", _qformer_with("query_tokens", None), [r"query_tokens"]),
    ("Q-Former key with a wrong shape", "qformer",
     _qformer_with("Qformer.bert.encoder.layer.1.attention.output.dense.weight", torch.zeros(768, 700)),
     [r"layer\.1\.attention\.output\.dense\.weight", r"\(768, 700\)", r"\(768, 768\)"]),
    ("Q-Former for another ViT width", "qformer", _qformer_for_another_vit, [r"\b64\b", r"\b32\b"]),
]


@pytest.mark.parametrize("case, broken, make, expected", LAVIS_ERRORS, ids=[case[0] for case in LAVIS_ERRORS])
def test_lavis_file_errors_name_the_file_and_the_key(case, broken, make, expected, lavis_files, tmp_path):
    eva, qformer = lavis_files
    bad = make(tmp_path)
    if broken == "eva":
        eva = bad
    else:
        qformer = bad
    with pytest.raises(WeightsError) as caught:
        load_cli_encoder(eva, qformer)
    message = str(caught.value)
    assert bad.name in message, message
    for pattern in expected:
        assert re.search(pattern, message), f"{pattern!r} not in: {message}"
    # torch's mmap complaint would send the user off to re-save a file that is simply not a checkpoint
    assert "_use_new_zipfile_serialization" not in message, message
    assert not (tmp_path / "code-ran").exists()


# ---------------------------------------------------------------- sha256-checked download

@pytest.fixture
def http_server(tmp_path, monkeypatch):
    """A local static server on 127.0.0.1 that records the paths asked for. `/truncated/NAME` promises more bytes
    than it sends, then closes the connection."""
    root = tmp_path / "www"
    root.mkdir()
    seen: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):
            pass

        def do_GET(self):
            seen.append(self.path)
            if self.path.startswith("/truncated/"):
                self.send_response(200)
                self.send_header("Content-Length", "100000")
                self.end_headers()
                self.wfile.write(b"x" * 1000)
                self.wfile.flush()
                self.close_connection = True
                return
            super().do_GET()

    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield SimpleNamespace(root=root, url=f"http://127.0.0.1:{server.server_address[1]}", seen=seen)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _serve(server, name: str, size: int = 300_000) -> tuple[bytes, str]:
    content = hashlib.sha256(name.encode()).digest() * (size // 32)
    (server.root / name).write_bytes(content)
    return content, hashlib.sha256(content).hexdigest()


def test_download_keeps_a_file_whose_sha256_matches(http_server, tmp_path):
    content, digest = _serve(http_server, "eva_vit_g.pth")
    remote = RemoteFile(f"{http_server.url}/eva_vit_g.pth", digest, len(content))
    folder = tmp_path / "downloads"
    path = download_url(remote, folder)
    assert path == folder / "eva_vit_g.pth" and path.read_bytes() == content
    assert sorted(p.name for p in folder.iterdir()) == ["eva_vit_g.pth"]
    assert download_url(remote, folder) == path
    assert http_server.seen == ["/eva_vit_g.pth"], "a file already downloaded must not be fetched again"


def test_download_goes_to_the_cache_by_default(http_server, private_cache):
    content, digest = _serve(http_server, "blip2_pretrained_flant5xxl.pth")
    path = download_url(RemoteFile(f"{http_server.url}/blip2_pretrained_flant5xxl.pth", digest, len(content)))
    assert path.parent.parent == private_cache and path.read_bytes() == content


def test_download_with_a_wrong_sha256_leaves_nothing_behind(http_server, tmp_path):
    content, digest = _serve(http_server, "eva_vit_g.pth")
    wrong = "0" * 64
    folder = tmp_path / "downloads"
    with pytest.raises(WeightsError) as caught:
        download_url(RemoteFile(f"{http_server.url}/eva_vit_g.pth", wrong, len(content)), folder)
    message = str(caught.value)
    assert "eva_vit_g.pth" in message and digest in message and wrong in message
    assert list(folder.iterdir()) == []
    # and a retry with the right hash downloads it afresh
    assert download_url(RemoteFile(f"{http_server.url}/eva_vit_g.pth", digest, len(content)), folder).is_file()


@pytest.mark.parametrize("path", ["/missing.pth", "/truncated/eva_vit_g.pth"])
def test_failed_download_leaves_nothing_behind(path, http_server, tmp_path):
    folder = tmp_path / "downloads"
    url = http_server.url + path
    with pytest.raises(WeightsError, match=re.escape(url)):
        download_url(RemoteFile(url, "0" * 64, 100_000), folder)
    assert not folder.exists() or list(folder.iterdir()) == []


# ---------------------------------------------------------------- the conversion cache

def test_converted_lavis_weights_are_reused(lavis_files, tmp_path, monkeypatch, private_cache):
    eva, qformer = (Path(shutil.copy2(path, tmp_path / path.name)) for path in lavis_files)  # its mtime changes below
    reads: list[Path] = []
    read_eva = vision.read_eva_vit_file

    def counting(path, *args, **kwargs):
        reads.append(Path(path))
        return read_eva(path, *args, **kwargs)

    monkeypatch.setattr(vision, "read_eva_vit_file", counting)
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))

    first = load_cli_encoder(eva, qformer)
    assert len(reads) == 1
    converted = sorted((private_cache / "converted").glob("*/vision_encoder.safetensors"))
    assert len(converted) == 1
    stamp = converted[0].stat().st_mtime_ns

    second = load_cli_encoder(eva, qformer)
    assert len(reads) == 1, "the second load must use the converted safetensors, not the LAVIS file"
    assert converted[0].stat().st_mtime_ns == stamp
    with torch.no_grad():
        assert torch.equal(first.place("cpu", False)(pixels), second.place("cpu", False)(pixels))

    # a changed source file is converted again
    os.utime(eva, ns=(stamp + 10**9, stamp + 10**9))
    load_cli_encoder(eva, qformer)
    assert len(reads) == 2
    newest = max((private_cache / "converted").glob("*/vision_encoder.safetensors"), key=lambda p: p.stat().st_mtime_ns)

    # a damaged conversion is redone rather than failing
    newest.write_bytes(newest.read_bytes()[:1000])
    third = load_cli_encoder(eva, qformer)
    assert len(reads) == 3
    with torch.no_grad():
        assert torch.equal(third.place("cpu", False)(pixels), first(pixels))
