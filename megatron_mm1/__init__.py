"""megatron_mm1: MM1-style multimodal LLM training on megatron-core."""

__version__ = "0.1.0"
