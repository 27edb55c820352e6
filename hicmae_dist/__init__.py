"""hicmae-dist: pretrain audio-visual masked autoencoders (HiCMAE, CAV-MAE) at cluster scale."""
__version__ = "0.1.0"
