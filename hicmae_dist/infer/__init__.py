"""Inference on anyone's videos: `hicmae-dist embed` / `predict` and `hicmae_dist.load` (docs/inference.md)."""
