"""Models: the one LRA Transformer encoder, its classifier and dual-encoder heads."""
