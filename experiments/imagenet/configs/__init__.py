"""Experiment configs (``get_config()`` files, as the Flax examples), one per network.

``default.py`` holds every field with the paper's Inception (Section 4.2); each
other file is ``default.get_config()`` and the few fields its variant changes:

  inception.py          the paper's Inception, no BN (= default.py)
  inception_sigmoid.py  ... with sigmoid instead of ReLU (stays at chance, 4.2.2)
  bn_baseline.py        Inception + BN before each nonlinearity (4.2.2)
  bn_x5.py              BN-Baseline + Section 4.2.1's changes, learning rate x5
  bn_x30.py             BN-x5 with learning rate x30
  bn_x5_sigmoid.py      BN-x5 with sigmoid instead of ReLU
  resnet50.py           the Flax ImageNet example's ResNet-50 recipe
  tiny.py               BN-x5 at 32x32, tiny width, fake data: a CPU smoke run
"""
