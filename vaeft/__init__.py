"""vaeft: reproducible fine-tuning of Stable Diffusion kl-f8 VAE decoders.

The library never imports Prefect; orchestration lives in the top-level ``flows/`` and
``tasks/`` packages, which only call the stage functions defined here.
"""

from vaeft.compat.torchvision_cpu import install_import_hook

__version__ = "0.1.0"

# diffusers, lpips and torch-fidelity import torchvision, whose CUDA-only build fails beside a CPU
# torch: after `import vaeft` they work (the hook does nothing until torchvision is imported).
install_import_hook()
