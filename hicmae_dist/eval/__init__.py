"""Evaluation: metrics (UAR, WAR, weighted F1, PCC, CCC, mAP, retrieval), dataset presets,
retrieval and linear-probe evaluation of pretrained encoders."""
