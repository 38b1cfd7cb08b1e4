"""Augmentation: seeded random crops (multi-scale Lanczos, rotations come with the augment issue)."""
