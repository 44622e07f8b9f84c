"""Reproducible CIFAR classification pipeline: data, models, training and evaluation."""
