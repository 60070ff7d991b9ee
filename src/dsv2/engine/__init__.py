"""Inference: latent KV cache, absorbed-MLA batched decode, sampling, the LLM API, chat and the CLI."""

from .cache import LatentCache
from .engine import Engine, EngineFull, Request, StepOutput
from .llm import LLM, Completion
from .sampling import SamplingParams

__all__ = ["LatentCache", "Engine", "EngineFull", "Request", "StepOutput", "LLM", "Completion", "SamplingParams"]
