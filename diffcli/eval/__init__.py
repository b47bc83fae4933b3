"""Evaluation: how close a model's samples come to a folder of real images.

    metrics.py      FID, KID, precision/recall: pure functions of feature matrices, in float64
    classifier.py   the `auto` feature network: a small CNN trained on the real folder itself
    features.py     images -> features: clean-fid-style resizing, the auto network, torch-fidelity's Inception-v3
    cache.py        the real side's features and statistics and the trained classifier, cached and validated
    evaluate.py     evaluate(): SAMPLES (a folder, or a model file to sample) against REAL; the Evaluator
                    that training prepares once and calls every --eval-every steps
    report.py       the table `diffcli eval` prints
"""
