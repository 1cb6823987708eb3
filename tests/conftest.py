import os

# The tests never touch the network: everything they load is written by them or by the tiny preset.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_IMAGES = REPO.parent / "shared" / "images"


@pytest.fixture(scope="session")
def tiny_pipeline():
    """The seeded tiny model (ViT, Q-Former, projection and GPT-NeoX all random and small), loaded once."""
    from minigpt4_ja import Pipeline

    return Pipeline.from_preset("tiny")


@pytest.fixture(scope="session")
def example_image() -> Path:
    local = REPO / "examples" / "chelsea.png"
    return local if local.is_file() else SHARED_IMAGES / "chelsea.png"


@pytest.fixture
def one_thread():
    """The tiny model's matrices are so small that extra threads only add overhead (a lot on a busy machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched_app(pipeline):
    """Serve app.py's demo for `pipeline` on a free loopback port; yields the URL, closes the server after."""
    import app

    demo = app.queue(app.build_demo(pipeline))
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                            quiet=True, **app.LAUNCH_OPTIONS)
    try:
        yield url
    finally:
        demo.close()
