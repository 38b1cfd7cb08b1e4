"""Model: building, loading/saving and freezing kl-f8-shaped ``AutoencoderKL`` models."""
