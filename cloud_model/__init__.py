"""CLOUD: SCOPE encoding, tokenizer, transformer encoder, heads, training and ensembles."""

from cloud_model.errors import CloudlabError

__all__ = ["CloudlabError"]
