"""Training: EMA, checkpoint/resume and the training engine."""
