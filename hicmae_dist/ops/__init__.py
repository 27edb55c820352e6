"""Hot ops, one public function each, with a plain reference and faster backends."""

from hicmae_dist.ops.attention import attention, attention_reference
from hicmae_dist.ops.gather import gather_visible, native_available
from hicmae_dist.ops.info_nce import info_nce
from hicmae_dist.ops.tokens import assemble_decoder_tokens, patch_norm

__all__ = [
    "assemble_decoder_tokens",
    "attention",
    "attention_reference",
    "gather_visible",
    "info_nce",
    "native_available",
    "patch_norm",
]
