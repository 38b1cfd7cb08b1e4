"""Export: fine-tuned models in the layouts users load (diffusers; LDM comes with model I/O)."""
