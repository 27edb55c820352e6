"""CAV-MAE (docs/models.md#cav-mae): modality-specific blocks, shared blocks, a joint decoder.

config.py holds the family's model section (hicmae_dist.config imports it by name, so this
package's __init__ imports nothing), model.py the model classes, upstream.py the authors' key
names and file layout, macs.py the MACs count, spec.py the SPEC that hicmae_dist.models finds on
first use, presets/ the shipped presets.
"""
