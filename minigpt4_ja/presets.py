"""Named model configurations: which weights to fetch and how to talk to the LLM."""

from __future__ import annotations

from dataclasses import dataclass

LAVIS_BASE = "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2"


@dataclass(frozen=True)
class RemoteFile:
    """A file fetched by URL and checked against its sha256 (LAVIS weights live outside the Hub)."""

    url: str
    sha256: str
    size_bytes: int

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class HubFile:
    repo_id: str
    filename: str


EVA_VIT_G = RemoteFile(
    f"{LAVIS_BASE}/eva_vit_g.pth",
    "99d2bb36c6b52c94fe6e2e12373afb27de57ae81378c3d8c53bf0e83b0f4275f",
    2_025_000_000,
)
# Only the flan-t5-xxl Q-Former matches MiniGPT-4 (the blip2-opt ones have their own Q-Former and ln_vision).
BLIP2_FLANT5XXL = RemoteFile(
    f"{LAVIS_BASE}/blip2_pretrained_flant5xxl.pth",
    "4b3839ea6c617f315ead9bf4036bbb0f0cf6bf62695ecfc14968ea626af03a29",
    433_000_000,
)


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    llm: str  # Hub id or local folder holding config, weights, spiece.model and tokenizer_config.json
    template: str
    projection: HubFile | None  # None: nothing published, the user must train one
    eva_vit: RemoteFile | None = EVA_VIT_G
    qformer: RemoteFile | None = BLIP2_FLANT5XXL
    random_weights: bool = False  # the `tiny` preset builds every part randomly and offline


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            name="bilingual-4b",
            description="rinna/bilingual-gpt-neox-4b-minigpt4: rinna's published Japanese/English MiniGPT-4",
            llm="rinna/bilingual-gpt-neox-4b",
            template="bilingual",
            projection=HubFile("rinna/bilingual-gpt-neox-4b-minigpt4", "checkpoint.pth"),
        ),
        Preset(
            name="japanese-3.6b",
            description="the original article's LLM, rinna/japanese-gpt-neox-3.6b (no projection was published)",
            llm="rinna/japanese-gpt-neox-3.6b",
            template="japanese-3.6b",
            projection=None,
        ),
        Preset(
            name="tiny",
            description="every part random and small, seeded; for tests and an offline preview",
            llm="tiny",
            template="bilingual",
            projection=None,
            eva_vit=None,
            qformer=None,
            random_weights=True,
        ),
    ]
}
DEFAULT_PRESET = "bilingual-4b"


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        from .errors import InputError

        raise InputError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
