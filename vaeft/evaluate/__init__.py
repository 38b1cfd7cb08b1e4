"""Evaluation: eval-set preparation, image-pair metrics, and the multi-model report."""
