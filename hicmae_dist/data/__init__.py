"""The data layer: synthetic VoxCeleb2-like clips, the shard writer and the pretraining loader.

    write_corpus(dir, 64)                      # real mp4/m4a files in VoxCeleb2's layout
    prepare_shards(dir, shards)                # -> WebDataset tar shards + manifest.json
    make_pretrain_loader(shards, data_cfg, model_cfg, rank=r, world_size=w, seed=s)

Never imports hicmae_dist.models: masks are made here with hicmae_dist.masking.
"""
from hicmae_dist.data.loader import BadDataError, make_pretrain_loader
from hicmae_dist.data.prepare import find_clips, prepare_shards
from hicmae_dist.data.synth import write_corpus

__all__ = ["BadDataError", "find_clips", "make_pretrain_loader", "prepare_shards", "write_corpus"]
