"""hicmae-dist: pretrain audio-visual masked autoencoders (HiCMAE, CAV-MAE) at cluster scale."""

__version__ = "0.1.0"


def load(path, *, fold: int | None = None, dataset: str | None = None, device=None, batch_size: int = 8):
    """A model for embed / predict / preprocess (hicmae_dist.infer.model.InferenceModel) from a
    fine-tuning run dir (fold: which; default the first), a pretraining run dir, our weights file
    or the authors' checkpoint. dataset: the preset naming a fine-tuned file's classes."""
    from hicmae_dist.infer.model import InferenceModel, load_model  # torch only when asked for

    return InferenceModel(load_model(path, fold=fold, dataset=dataset), device, batch_size)
