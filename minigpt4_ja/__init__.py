"""Japanese MiniGPT-4: BLIP-2's EVA ViT-g and Q-Former, one trained Linear, and rinna's GPT-NeoX."""

from .chat import ChatSession, Reply, ReplyStream, Turn
from .errors import InputError, MiniGPT4Error, WeightsError
from .generation import GenerationSettings
from .loading import ModelOptions, load_pipeline
from .pipeline import ImageEmbedding, Pipeline
from .presets import PRESETS

__all__ = [
    "ChatSession", "GenerationSettings", "ImageEmbedding", "InputError", "MiniGPT4Error", "ModelOptions",
    "PRESETS", "Pipeline", "Reply", "ReplyStream", "Turn", "WeightsError", "load_pipeline",
]
