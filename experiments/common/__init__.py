"""What the experiments share: one ``Run`` per training run (``run.py`` says which
library does what) and their commands' one-line errors (``cli.py``). A workdir, a
folder or ``gs://BUCKET/PATH``, holds ``.lock`` (``lock.py``), ``config.json``,
``metrics.jsonl``, ``events.out.tfevents.*`` and ``checkpoints/<step>/``.
"""

from experiments.common import cli as cli
from experiments.common import lock as lock
from experiments.common.errors import PREEMPTED_EXIT_STATUS as PREEMPTED_EXIT_STATUS
from experiments.common.errors import CheckpointError as CheckpointError
from experiments.common.errors import ConfigError as ConfigError
from experiments.common.errors import DataError as DataError
from experiments.common.errors import LeaseLost as LeaseLost
from experiments.common.errors import NonFiniteError as NonFiniteError
from experiments.common.errors import Preempted as Preempted
from experiments.common.errors import WorkdirError as WorkdirError
from experiments.common.errors import non_finite_loss as non_finite_loss
from experiments.common.files import read_metrics as read_metrics
from experiments.common.files import workdir_path as workdir_path
from experiments.common.files import write_atomic as write_atomic
from experiments.common.run import Run as Run
