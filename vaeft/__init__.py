"""vaeft: reproducible fine-tuning of Stable Diffusion kl-f8 VAE decoders.

The library never imports Prefect; orchestration lives in the top-level ``flows/`` and
``tasks/`` packages, which only call the stage functions defined here.
"""

__version__ = "0.1.0"
