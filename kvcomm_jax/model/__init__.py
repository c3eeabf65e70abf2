"""The model layer: config, RoPE, the Flax transformer, KV caches, generation, tokenizers, chat formats, weights."""
