"""Finding weight files: the local cache, URL downloads checked by sha256, the Hub, and the projection formats.

Nothing here runs at import time; every download happens when a model is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from .errors import WeightsError
from .presets import HubFile, RemoteFile


def cache_dir() -> Path:
    root = os.environ.get("MINIGPT4_JA_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "minigpt4_ja"
    return Path(root)


def download_url(remote: RemoteFile, folder: Path | None = None) -> Path:
    """Download `remote` once into the cache, with a progress bar, and verify its sha256 before keeping it."""
    import requests
    from tqdm.auto import tqdm

    folder = folder or cache_dir() / "lavis"
    target = folder / remote.filename
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(target.suffix + ".part")
    try:
        with requests.get(remote.url, stream=True, timeout=60) as response:
            response.raise_for_status()
            total = int(response.headers.get("content-length", 0)) or remote.size_bytes
            digest = hashlib.sha256()
            with open(partial, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc=remote.filename) as bar:
                for chunk in response.iter_content(chunk_size=1 << 20):
                    f.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except (requests.RequestException, OSError) as err:
        partial.unlink(missing_ok=True)
        raise WeightsError(f"could not download {remote.url} ({err})") from err
    if digest.hexdigest() != remote.sha256:
        partial.unlink(missing_ok=True)
        raise WeightsError(f"{remote.filename} downloaded with sha256 {digest.hexdigest()}, expected {remote.sha256}")
    partial.replace(target)
    return target


def hub_file(file: HubFile) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(file.repo_id, file.filename))
    except Exception as err:  # offline, missing repo, gated repo: all mean "cannot get this file"
        raise WeightsError(f"could not get {file.filename} from the Hub repo {file.repo_id} ({err})") from err


def hub_snapshot(repo_id: str, patterns: list[str]) -> Path:
    """A local folder for `repo_id`: the folder itself if it exists, else a Hub snapshot of the matching files."""
    if Path(repo_id).is_dir():
        return Path(repo_id)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as err:
        raise WeightsError(f"could not get {repo_id} from the Hub ({err})") from err


CONVERSION_VERSION = 1  # bump when the converter's output changes, so old cached conversions are not reused


def conversion_key(*paths: Path) -> str:
    """Identifies source files cheaply (path, size, mtime) so a conversion is redone only when they change."""
    parts = [f"v{CONVERSION_VERSION}"] + [f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in paths]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


# ---------------------------------------------------------------- projection (the one trained Linear)

PROJECTION_FILE = "projection.safetensors"


def load_projection(path: str | Path, in_features: int, out_features: int | None) -> tuple[dict[str, torch.Tensor], dict]:
    """Read the projection weights from MiniGPT-4's `checkpoint.pth` or our `projection.safetensors`.

    Returns ({"weight": [out, in], "bias": [out]}, metadata). `out_features=None` accepts any LLM width. Only `llama_proj.*` is read from a checkpoint: the rest of
    rinna's file is optimizer state and frozen LLM buffers.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"projection file {path} does not exist")
    metadata: dict = {}
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
                metadata = json.loads((f.metadata() or {}).get("minigpt4_ja", "{}"))
        except Exception as err:
            raise WeightsError(f"projection file {path} cannot be read as safetensors ({err})") from err
    else:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise WeightsError(f"projection file {path} cannot be read as a PyTorch checkpoint ({err})") from err
        tensors = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else {}
    weights = {}
    for name in ("weight", "bias"):
        for key in (name, f"llama_proj.{name}"):
            if key in tensors:
                weights[name] = tensors[key].float()
                break
        else:
            found = ", ".join(list(tensors)[:5]) or "nothing"
            raise WeightsError(f"projection file {path} has no 'llama_proj.{name}' (found: {found})")
    out_features = weights["weight"].shape[0] if out_features is None else out_features
    expected = {"weight": (out_features, in_features), "bias": (out_features,)}
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise WeightsError(
                f"projection file {path}: '{name}' has shape {tuple(weights[name].shape)}, expected {shape} "
                f"(Q-Former {in_features} -> LLM hidden {out_features}); was it trained for another LLM?"
            )
    return weights, metadata


def save_projection(weight: torch.Tensor, bias: torch.Tensor, path: str | Path, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"weight": weight.detach().float().contiguous().cpu(), "bias": bias.detach().float().contiguous().cpu()}
    save_file(tensors, str(path), metadata={"minigpt4_ja": json.dumps(metadata or {}, ensure_ascii=False)})
    return path


def save_minigpt4_checkpoint(weight: torch.Tensor, bias: torch.Tensor, path: str | Path, epoch: int = 0) -> Path:
    """MiniGPT-4's save layout, so the projection also loads in rinna's and Vision-CAIR's original code."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = {"llama_proj.weight": weight.detach().float().cpu(), "llama_proj.bias": bias.detach().float().cpu()}
    torch.save({"model": model, "optimizer": {}, "config": {}, "scaler": None, "epoch": epoch}, path)
    return path
