"""Model code: one decoder covers the Llama, Mistral, Qwen2 and Qwen3 families."""

from tropical.engine.models.llama import CausalLM

__all__ = ["CausalLM"]
