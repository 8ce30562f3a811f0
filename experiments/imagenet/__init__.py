"""The paper's ImageNet experiment (Section 4.2): models, input pipeline, training.

    python -m experiments.imagenet --workdir=W --config=experiments/imagenet/configs/NAME.py

See README.md in this folder.
"""
