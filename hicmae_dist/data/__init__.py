"""The data layer: synthetic clips, the shard writer, the pretraining loader, downstream readers.

    write_corpus(dir, 64)                      # real mp4/m4a files in VoxCeleb2's layout
    prepare_shards(dir, shards)                # -> tar shards + per-shard indexes + manifest.json
    loader = make_pretrain_loader(shards, data_cfg, model_cfg, rank=r, world_size=w, seed=s,
                                  start_batch=k)   # batches k, k+1, ... of the (seed, rank) stream
    loader.stats()                             # batches, samples, bad samples (for the trainer)
    write_downstream(dir, 60)                  # a synthetic fine-tuning set: frames, wavs, folds
    make_finetune_loader(annotation, model_cfg, "train" | "val" | "test")

Never imports hicmae_dist.models: masks are made here with hicmae_dist.masking.
"""

from hicmae_dist.data.downstream import DownstreamDataset, make_finetune_loader, read_annotations
from hicmae_dist.data.loader import BadDataError, PretrainLoader, make_pretrain_loader
from hicmae_dist.data.prepare import find_clips, prepare_shards
from hicmae_dist.data.synth import write_corpus, write_downstream

__all__ = [
    "BadDataError",
    "DownstreamDataset",
    "PretrainLoader",
    "find_clips",
    "make_finetune_loader",
    "make_pretrain_loader",
    "prepare_shards",
    "read_annotations",
    "write_corpus",
    "write_downstream",
]
