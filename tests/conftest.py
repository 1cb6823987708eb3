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
