"""epd: encode / prefill / decode disaggregated serving for multimodal LLMs."""

__version__ = "0.1.0"
