"""Offline fixtures: tiny randomly initialised models, pipelines and inputs (tests, demos, defaults)."""

from .tiny import TINY_VAE, random_prompt_embeds, tiny_hunyuan_video15_pipeline, tiny_inputs, tiny_model

__all__ = ["tiny_model", "tiny_inputs", "tiny_hunyuan_video15_pipeline", "random_prompt_embeds", "TINY_VAE"]
