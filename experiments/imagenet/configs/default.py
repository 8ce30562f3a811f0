"""Every config field, set to the paper's Inception (Section 4.2; no batch norm).

    python -m experiments.imagenet --workdir=W --config=experiments/imagenet/configs/default.py

The other configs in this folder start from this one and change a few fields (the
BN-x5 family through ``with_section_4_2_1``). Each value is marked with
the section of the paper (Ioffe & Szegedy, 2015) that gives it, or "our choice"
with the reason. Values the paper gives for the Inception it compares with come
from GoogLeNet (Szegedy et al., 2014, Section 6), which it builds on: SGD with
momentum 0.9, the learning rate decreased by 4% every 8 epochs, 40% dropout.

Learning rates: the paper's are for its asynchronous SGD on mini-batches of 32
(Section 4.2; Figure 3 lists the initial rates). Our runs are synchronous over one
global batch, so ``learning_rate`` follows the linear scaling rule (Goyal et al.,
2017), ``base_learning_rate * batch_size / base_batch_size``, and is recomputed
when ``--config.batch_size`` changes (or set it directly). The ratios between
the configs are the paper's.

Conventions: ``batch_size`` and ``eval_batch_size`` are global (all devices of all
hosts); steps count global batches; ``-1`` in ``num_train_steps`` means "from
``num_epochs``", in ``eval_every`` and ``checkpoint_every`` "once per epoch".
"""

import ml_collections

# Section 4.2 trains on ImageNet's 1,281,167 training images; steps of Figure 3
# are mini-batches of 32, so S steps are S * 32 / 1,281,167 epochs.
IMAGENET_TRAIN_IMAGES = 1_281_167


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # ---- Model --------------------------------------------------------------------------
  config.model = "inception"  # Section 4.2's network (appendix table); see models.MODEL_NAMES
  config.batch_norm = False  # Section 4.2.2: "Inception" is the network without BN
  config.activation = "relu"  # Section 4.2: ReLU; "sigmoid" for the sigmoid variants (4.2.2)
  # Our choice: GoogLeNet's local response normalization, which Section 4.2.1 removes
  # from the BN variants ("Inception and other networks benefit from it").
  config.lrn = True
  config.dropout_rate = 0.4  # Section 4.2.1: "the original used 40%" (GoogLeNet)
  # Our choice: 96 = 576 channels out of 4c/4d, as the table's output column and
  # tf-slim's inception_v2; 128 = the table's pool projection column (608 channels).
  config.pool_projection_4cd = 96
  config.num_classes = 1000  # ImageNet
  config.width_multiplier = 1.0  # 1.0 = the paper's widths; smaller for CPU runs (our option)
  config.image_size = 224  # Section 4.2 (the table's input); any multiple of 32 from 32 up works
  config.half_precision = False  # our choice: float32 as the paper; True = bfloat16 (on TPU)

  # ---- Batch norm (used by the configs with batch_norm=True) ---------------------------
  # Our choice: running averages over about the last 100 steps (the paper evaluates
  # with population statistics, Section 3.1; recompute_bn_batches does that).
  config.bn_momentum = 0.99
  config.bn_epsilon = 1e-3  # our choice: tf-slim's for its BN-Inception (the paper gives none)
  config.bn_group_size = (
    0  # our choice: 0 = statistics over all devices (synchronized); k = groups of k
  )
  # Our choice: 0 = statistics over each group's whole batch. 32 = the paper's
  # mini-batch statistics (each replica normalized its own 32 examples, Section 4.2).
  config.bn_virtual_batch_size = 0
  # 0: evaluate with the running averages; K: the paper's population statistics
  # (Algorithm 2, Section 3.1) over K training batches before each evaluation.
  config.recompute_bn_batches = 0

  # ---- Optimization ----------------------------------------------------------------------
  config.optimizer = "momentum"  # Section 4.2: "stochastic gradient descent with momentum"
  config.momentum = 0.9  # our choice: GoogLeNet's 0.9 (the paper gives no value)
  config.nesterov = False  # our choice: plain momentum, as GoogLeNet
  config.batch_size = 256  # our choice: 8 devices x the paper's 32 (Section 4.2); global
  config.base_batch_size = 32  # Section 4.2: the paper's rates are for mini-batches of 32
  config.base_learning_rate = 0.0015  # Figure 3: Inception's initial learning rate
  config.learning_rate = (
    config.get_ref("base_learning_rate")
    * config.get_ref("batch_size")
    / config.get_ref("base_batch_size")
  )  # our choice: linear scaling
  config.lr_schedule = "exponential"  # Section 4.2.1: exponential decay
  # Our choice: GoogLeNet's "decrease by 4% every 8 epochs", staircase (the paper
  # says the BN variants decay 6x faster, not the base rate).
  config.lr_decay_rate = 0.96
  config.lr_decay_epochs = 8.0
  config.lr_staircase = True
  # Our choice: 1 epoch of linear warm-up, for the linearly scaled rate on a
  # synchronous global batch (Goyal et al., 2017); the paper has none.
  config.warmup_epochs = 1.0
  # Our choice: L2 coefficient lambda (lambda / 2 * ||w||^2 added to the loss) on
  # kernels only: 5 x tf-slim's 4e-5, since tf-slim's BN-Inception has the
  # Section 4.2.1 reduction by 5 and this network precedes it.
  config.weight_decay = 2e-4
  config.label_smoothing = 0.0  # the paper uses none
  config.num_epochs = (
    775.0  # Figure 3: Inception reached 72.2% after 31.0M steps of 32 = 774 epochs
  )
  config.num_train_steps = -1  # -1: num_epochs * 1,281,167 / batch_size
  config.seed = 0

  # ---- Data -------------------------------------------------------------------------------
  config.dataset = "imagenet2012"  # TFDS name (Section 4.2: ImageNet classification)
  config.tfds_data_dir = ml_collections.config_dict.placeholder(
    str
  )  # None = TFDS's default (~/tensorflow_datasets)
  config.data_dir = ml_collections.config_dict.placeholder(
    str
  )  # a folder of IDX files (mnist, fashion_mnist: idx_data.py); None = TFDS
  config.fake_data = False  # True: synthetic batches, for throughput and smoke runs only
  # Our choice: 0 = no example-level shuffle buffer (shards in random order, each
  # shard's examples in stored order): the Inception before Section 4.2.1 added
  # "within-shard shuffling". > 0: a buffer of that many examples per host.
  config.shuffle_buffer = 0
  # Photometric distortions (brightness, saturation, hue, contrast), as a fraction
  # of tf-slim's Inception preprocessing amounts; 0 = none. Our choice: 1.0 here,
  # Section 4.2.1 reduces them for the BN variants without saying by how much.
  config.photometric_distortion = 1.0
  config.eval_batch_size = 1024  # our choice; global; every validation image scored once
  config.eval_crop_fraction = (
    0.875  # our choice: central 224 of 256, the usual single crop (Section 4.2)
  )

  # ---- Bookkeeping ------------------------------------------------------------------------
  config.parallelism = "jit"  # our choice: "jit" (one sharded program) or "pmap"
  config.log_every = 100  # steps between metrics.jsonl rows
  config.eval_every = -1  # steps between evaluations; -1 = once per epoch
  config.checkpoint_every = -1  # steps between checkpoints; -1 = once per epoch
  return config


def with_section_4_2_1(
  config: ml_collections.ConfigDict, learning_rate_factor: float
) -> ml_collections.ConfigDict:
  """``config`` with Section 4.2.1's changes, the base rate times ``learning_rate_factor``."""
  config.base_learning_rate = (
    0.0015 * learning_rate_factor
  )  # 4.2.1 "increase learning rate"; Figure 3
  config.dropout_rate = 0.0  # 4.2.1 "remove dropout"
  config.weight_decay /= 5  # 4.2.1 "reduce the L2 weight regularization" by a factor of 5
  config.lr_decay_epochs /= 6  # 4.2.1 "accelerate the learning rate decay": 6 times faster
  config.lrn = False  # 4.2.1 "remove local response normalization"
  # 4.2.1 "shuffle training examples more thoroughly" (within shards). Our choice:
  # 10,000 examples per host, about 1.1 GB of encoded ImageNet JPEGs.
  config.shuffle_buffer = 10_000
  # 4.2.1 "reduce the photometric distortions"; by how much is not given: half (our choice).
  config.photometric_distortion = 0.5
  return config
