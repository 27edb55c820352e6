"""HiCMAE (docs/models.md#hicmae): per-modality encoders, cross-attention fusion, hierarchical
decoders.

config.py holds the family's model section (hicmae_dist.config imports it by name, so this
package's __init__ imports nothing), model.py the model classes, upstream.py the authors' key
names and file layout, macs.py the MACs count, spec.py the SPEC that hicmae_dist.models finds on
first use, presets/ the shipped presets.
"""
