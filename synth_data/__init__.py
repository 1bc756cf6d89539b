"""Prompts -> teacher samples -> dataset: the synthetic data stage."""
