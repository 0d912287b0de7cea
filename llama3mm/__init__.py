"""The composed multimodal model: a frozen Llama 3 LM with image, video and speech adapters (Llama3MM)."""

from llama3mm.model import CrossAttentionInputs, Llama3MM, MediaState

__all__ = ["CrossAttentionInputs", "Llama3MM", "MediaState"]
