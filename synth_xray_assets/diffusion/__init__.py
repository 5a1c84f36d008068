"""Shared Stable Diffusion helpers: pipelines, seeded sampling, resumable image sets."""
