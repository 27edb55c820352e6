"""Fine-tuning and its evaluation protocol (docs/models.md, HiCMAE fine-tuning model and CAV-MAE fine-tuning),
one module per concern:

    task.py       the task (dataset preset or finetune.*), the model and its optimiser groups,
                  the pretrained encoder weights, the task's loss
    mixing.py     mixup / cutmix with label smoothing (one-hot, or the release's multi-hot)
    sampling.py   per-epoch batches of each rank (EpochBatches: shuffled, or balanced draws
                  with replacement), the loaders
    evaluate.py   predictions (multi-view: probabilities averaged over chunks x crops), metrics,
                  the test pass with the last, the validation-selected (and the averaged)
                  weights, in the training mode and each of finetune.eval_modes (CAV-MAE)
    averaging.py  finetune.weight_average: the epoch checkpoints of a range averaged
    fold.py       finetune_fold: one fold: the DeepSpeed engine over the training split,
                  validation every `finetune.eval_every` epochs, the best epoch's weights kept,
                  then the test pass
    protocol.py   run_protocol: every fold of a k-fold / leave-one-session-out protocol in its
                  own run directory and MLflow run (nested under one protocol run), then the
                  table of per-fold results with mean and std per metric

Unlike the releases (which pick the best epoch on the test fold), the selecting split is never
the test split: val.csv when the fold has one, else subjects carved from training
(data.downstream.load_fold), checked disjoint from test clip by clip.

Checkpoints are the pretraining ones (atomic, `--resume auto`, RNG per rank) and carry the
epoch and the position inside it, so a killed fold resumes at the batch it stopped at; a fold
whose results.json exists is done and skipped. Evaluation runs on rank 0 (ZeRO 0-2 keep the
whole model on every rank; stage 3 is refused: fine-tuning models fit one GPU).
"""
