"""Evaluation of dense and compressed models on the same data."""

from .perplexity import perplexity

__all__ = ["perplexity"]
