"""Data: image sources, validation/normalisation, the curated manifest and its split."""
