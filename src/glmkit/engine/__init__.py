"""The inference engine: sampling, the generation loop, continuous batching and streaming text.

It owns the KV cache and positions and calls the pure model; it knows nothing about HTTP or the CLI.
"""
