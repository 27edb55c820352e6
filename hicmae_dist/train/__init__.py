"""Training loops on a DeepSpeed engine.

rundir.py      RunDir: the run directory's layout, the only code that knows it
runtime.py     what both loops share: stop requests, precision, seeding, tracker, resume checks
checkpoint.py  the checkpoint format: atomic saves, per-rank manifests, verification, universal
engine.py      the DeepSpeed config and engine;  step.py: one agreed optimizer step
schedule.py    the learning-rate schedule;  accounting.py: FLOPs and MFU;  progress.py: the bar
pretrain.py    the pretraining loop
finetune/      fine-tuning: task, mixing, sampling, evaluate, fold, protocol
probe.py       frozen-encoder evaluations (retrieval, linear probe);  export.py: weights out
"""
