"""Causal tracing and representation zeroing."""
