"""A new user's first steps: the package's submodules, the experiment's command line,
the quick benchmark, an install without TensorFlow."""

import importlib.metadata
import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib

import pytest

from benchmarks import run as benchmarks_run
from experiments.mnist import input_pipeline
from tests import ROOT
from tests.mnist_testing import make_idx_folder, mnist_command
from tests.processes import child_env


def _run(command, *, env=None, **kwargs):
  """``command`` run from the repository's root, its output captured."""
  return subprocess.run(
    command,
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    env=env or child_env(),
    **kwargs,
  )


def _python(code, *args, **kwargs):
  return _run([sys.executable, "-c", code, *args], **kwargs)


@pytest.mark.slow
def test_flax_submodules_are_reachable_from_the_package_and_load_lazily():
  result = _python(
    "import sys, bnjax\n"
    "assert 'flax' not in sys.modules, 'the core imported Flax'\n"
    "print(bnjax.linen.BatchNorm.__name__, bnjax.nnx.BatchNorm.__name__, 'nnx' in dir(bnjax))\n"
    "bnjax.no_such_thing\n"
  )
  assert result.stdout == "BatchNorm BatchNorm True\n", result.stderr
  assert (
    result.stderr.strip().splitlines()[-1]
    == "AttributeError: module 'bnjax' has no attribute 'no_such_thing'"
  )


@pytest.mark.slow
@pytest.mark.parametrize(
  "module, config_file",
  [  # each command and each way to name the config, once
    ("experiments.mnist", None),
    ("experiments.mnist.figure1", "experiments/mnist/configs/quick.py"),
  ],
)
def test_an_unknown_config_field_is_one_line_listing_the_fields(tmp_path, module, config_file):
  config_flag = [f"--config={config_file}"] if config_file else []
  result = _run(
    mnist_command(tmp_path / "run", None, *config_flag, "--config.lr=0.1", module=module)
  )
  assert result.returncode == 1
  assert result.stderr.splitlines() == [
    f"error: --config.lr: no such config field; the fields of experiments/mnist/configs/"
    f"{'quick' if config_file else 'default'}.py are: batch_norm, batch_size, bn_momentum, "
    "checkpoint_every, data_dir, dataset, eval_every, hidden_sizes, init_stddev, learning_rate, "
    "num_train_steps, seed, tfds_data_dir, tracked_unit"
  ]
  assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_flag_errors_are_one_line(tmp_path):
  for flag, expected in [
    ("--config=missing.py", "error: --config=missing.py: no such file"),
    (
      "--config.num_train_steps=abc",
      "error: flag --config.num_train_steps=abc: invalid literal for int() "
      "with base 10: 'abc' (--help lists the flags)",
    ),
  ]:
    result = _run(mnist_command(tmp_path / "run", None, flag))
    assert (result.returncode, result.stderr.splitlines()) == (1, [expected])
  assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_help_says_where_the_config_fields_are():
  result = _run([sys.executable, "-m", "experiments.mnist", "--help"])
  text = " ".join(result.stdout.split())
  assert "experiments/mnist/configs/default.py" in text and "--config.FIELD=VALUE" in text, (
    result.stdout
  )
  assert "learning_rate" in text and "hidden_sizes" in text


@pytest.mark.slow
def test_config_and_data_errors_leave_no_workdir_behind(tmp_path):
  data_dir = make_idx_folder(tmp_path / "data")
  result = _run(mnist_command(tmp_path / "a" / "run", None, "--config.num_train_steps=-5"))
  assert result.stderr.splitlines() == [
    "error: config.num_train_steps must be a positive integer, got -5"
  ]
  result = _run(mnist_command(tmp_path / "a" / "run", data_dir / "missing"))
  # One line, no traceback (the MNIST command's data errors are checked here, once).
  assert (result.returncode, result.stderr) == (
    1,
    f"error: data_dir {data_dir / 'missing'} is not a folder. {input_pipeline.OFFLINE_HINT}\n",
  )
  result = _run(
    mnist_command(tmp_path / "a" / "fig", data_dir / "missing", module="experiments.mnist.figure1")
  )
  assert (result.returncode, result.stderr) == (
    1,
    f"error: data_dir {data_dir / 'missing'} is not a folder. {input_pipeline.OFFLINE_HINT}\n",
  )
  assert not (tmp_path / "a").exists()


def _without_tensorflow(module: str) -> str:
  """Code for ``python -c`` that runs ``python -m module`` as if TensorFlow and TFDS
  were not installed: their imports fail and ``find_spec`` says None."""
  return (
    "import sys, runpy\n"
    "class WithoutTensorFlow:  # as if not installed: imports fail, find_spec says None\n"
    "  def __init__(self, finders):\n"
    "    self.finders = finders\n"
    "  def find_spec(self, name, path=None, target=None):\n"
    "    if name.split('.')[0] in ('tensorflow', 'tensorflow_datasets'):\n"
    "      return None\n"
    "    specs = (f.find_spec(name, path, target) for f in self.finders\n"
    "             if hasattr(f, 'find_spec'))\n"
    "    return next((s for s in specs if s is not None), None)\n"
    "sys.meta_path[:] = [WithoutTensorFlow(list(sys.meta_path))]\n"
    f"sys.argv = ['{module}', *sys.argv[1:]]\n"
    f"runpy.run_module('{module}', run_name='__main__', alter_sys=True)\n"
  )


@pytest.mark.slow
def test_the_idx_path_runs_without_tensorflow(tmp_path):
  """The README's command needs no TensorFlow; TFDS data says what to install."""
  data_dir = make_idx_folder(tmp_path / "data")
  no_tensorflow = _without_tensorflow("experiments.mnist")
  result = _python(
    no_tensorflow,
    f"--workdir={tmp_path / 'idx'}",
    "--config.dataset=fashion_mnist",
    f"--config.data_dir={data_dir}",
    "--config.num_train_steps=200",
    "--config.eval_every=100",
  )
  assert result.returncode == 0, result.stderr
  assert (tmp_path / "idx" / "metrics.jsonl").read_text().count("\n") == 2
  result = _python(no_tensorflow, f"--workdir={tmp_path / 'tfds'}", "--config.num_train_steps=200")
  assert result.returncode == 1
  assert result.stderr.startswith(
    "error: reading 'mnist' through TFDS needs TensorFlow Datasets "
    "(No module named 'tensorflow_datasets'): pip install -e \".[tfds]\""
  ), result.stderr
  assert not (tmp_path / "tfds").exists()


IMAGENET_TINY = [
  "--config=experiments/imagenet/configs/tiny.py",
  "--config.num_train_steps=2",
  "--config.eval_every=2",
  "--config.checkpoint_every=2",
  "--config.batch_size=8",
  "--config.eval_batch_size=8",
]


@pytest.mark.slow
def test_the_imagenet_smoke_run_and_idx_data_need_no_tensorflow(tmp_path):
  """Fake data and IDX files train without TensorFlow, TensorBoard summaries included
  (MicroNet in place of the tiny Inception, which compiles for a minute); TFDS data
  says in one line what to install."""
  no_tensorflow = _without_tensorflow("tests.imagenet_runner")
  env = child_env(JAX_PLATFORMS="cpu", IMAGENET_RUNNER_MICRO="1", IMAGENET_RUNNER_DEVICES="1")
  fake = _python(no_tensorflow, f"--workdir={tmp_path / 'fake'}", *IMAGENET_TINY, env=env)
  assert fake.returncode == 0, fake.stderr[-3000:]
  assert "TensorBoard summaries and checkpoints/" in fake.stdout  # tensorboard's own writer
  assert [r["step"] for r in _metrics(tmp_path / "fake")] == [1, 2]
  data_dir = make_idx_folder(tmp_path / "data")
  idx = _python(
    no_tensorflow,
    f"--workdir={tmp_path / 'idx'}",
    *IMAGENET_TINY,
    "--config.fake_data=False",
    "--config.dataset=fashion_mnist",
    f"--config.data_dir={data_dir}",
    "--config.num_classes=10",
    env=env,
  )
  assert idx.returncode == 0, idx.stderr[-3000:]
  assert _metrics(tmp_path / "idx")[-1]["eval_examples"] == 200
  tfds = _python(
    no_tensorflow,
    f"--workdir={tmp_path / 'tfds'}",
    *IMAGENET_TINY,
    "--config.fake_data=False",
    env=env,
  )
  assert tfds.returncode == 1
  assert tfds.stderr.splitlines() == [
    "error: config.dataset='imagenet2012' is read through TFDS, which needs TensorFlow "
    "(No module named 'tensorflow'): pip install -e \".[imagenet]\"; "
    "or --config.fake_data=True for synthetic data"
  ], tfds.stderr
  assert not (tmp_path / "tfds").exists()


def _metrics(workdir):
  import json

  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_renamed_config_field_keeps_its_old_spelling_with_a_warning(tmp_path):
  data_dir = make_idx_folder(tmp_path / "data")
  result = _run(
    mnist_command(
      tmp_path / "run",
      data_dir,
      "--config.num_steps=200",
      "--config.eval_every=100",
      "--config.checkpoint_every=100",
    )
  )
  assert result.returncode == 0, result.stderr
  assert result.stderr.splitlines()[0] == (
    "warning: --config.num_steps is now --config.num_train_steps; the old name still works for now"
  )
  assert [r["step"] for r in _metrics(tmp_path / "run")] == [100, 200]
  # The MNIST command speaks: the compile's time, one speed (tqdm's), a closing line.
  assert "Compiled in " in result.stdout and "steps/s" not in result.stderr + result.stdout
  assert result.stdout.strip().splitlines()[-1] == (
    f"done: step 200/200; wrote config.json, metrics.jsonl and checkpoints/ (newest: step 200) in "
    f"{tmp_path / 'run'}"
  )


def test_renamed_fields_rewrites_only_the_old_spelling(capsys):
  from experiments import config_flags

  argv = [
    "prog",
    "--config.num_steps=5",
    "--config.num_steps_x=1",
    "--confignum_steps=2",
    "--noconfig.num_steps",
    "--other.num_steps=3",
  ]
  assert config_flags.renamed_fields(argv, {"num_steps": "num_train_steps"}) == [
    "prog",
    "--config.num_train_steps=5",
    "--config.num_steps_x=1",
    "--confignum_steps=2",
    "--noconfig.num_train_steps",
    "--other.num_steps=3",
  ]
  assert (
    capsys.readouterr().err.count("warning: --config.num_steps is now --config.num_train_steps")
    == 2
  )


def test_extras_keep_tensorflow_out_of_the_experiments():
  extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
  assert not [r for r in extras["experiments"] if "tensorflow" in r]
  tfds = " ".join(extras["tfds"])
  # tensorflow-cpu has no wheels for macOS on Apple silicon: tensorflow there.
  assert (
    "tensorflow-datasets" in tfds
    and "tensorflow-cpu" in tfds
    and "sys_platform == 'darwin'" in tfds
  )
  assert {"bnjax[experiments]", "bnjax[tfds]"} <= set(extras["test"])


def test_a_quick_benchmark_never_overwrites_the_committed_results(tmp_path, capsys):
  quick = benchmarks_run.output_paths(quick=True, output_dir=None)
  assert not set(quick) & set(benchmarks_run.COMMITTED_RESULTS)
  assert all(not str(p).startswith(str(ROOT)) for p in quick)
  assert (
    benchmarks_run.output_paths(quick=False, output_dir=None) == benchmarks_run.COMMITTED_RESULTS
  )
  assert benchmarks_run.output_paths(quick=True, output_dir=str(tmp_path)) == (
    tmp_path / "results.json",
    tmp_path / "BENCHMARKS.md",
  )
  with pytest.raises(SystemExit) as exited:
    benchmarks_run.main(["--quick", "--output-dir", str(ROOT / "benchmarks")])
  assert exited.value.code == 2  # argparse's usage error, before anything is measured
  assert (
    f"error: --quick would overwrite the full run's results in {ROOT / 'benchmarks'}; give another "
    "--output-dir"
  ) in capsys.readouterr().err


def _site_packages() -> str:
  """This interpreter's site-packages, for a fresh venv to find the dependencies in."""
  paths = sysconfig.get_paths()
  return os.pathsep.join(dict.fromkeys([paths["purelib"], paths["platlib"]]))


def _copy_project(destination: pathlib.Path, *names: str) -> pathlib.Path:
  destination.mkdir(parents=True)
  for name in ("pyproject.toml", "README.md", *names):
    copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
    kwargs = {"ignore": shutil.ignore_patterns("__pycache__")} if (ROOT / name).is_dir() else {}
    copy(ROOT / name, destination / name, **kwargs)
  return destination


def _installed_bnjax() -> list[str]:
  """The versions of bnjax that the running environment's site-packages records."""
  site = sysconfig.get_paths()["purelib"]
  return [
    d.metadata["Version"]
    for d in importlib.metadata.distributions(path=[site])
    if d.metadata["Name"] == "bnjax"
  ]


@pytest.mark.slow  # a venv and an editable install: about 10 s
def test_an_editable_install_imports_from_the_clones_parent_and_runs_experiments_anywhere(tmp_path):
  """A clone is a folder named bnjax: from its parent, `import bnjax` must find the
  package, not the clone as an empty namespace package; and the experiments run from
  any folder, not only from the clone's root."""
  pytest.importorskip("setuptools")  # the build backend, without build isolation (offline)
  clone = _copy_project(tmp_path / "parent" / "bnjax", "bnjax", "experiments")
  installed_before = _installed_bnjax()
  venv = tmp_path / "venv"
  subprocess.run(
    [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120
  )
  subprocess.run(
    [
      sys.executable,
      "-m",
      "pip",
      "install",
      "-q",
      "--no-deps",
      "--no-build-isolation",
      "--ignore-installed",  # else pip uninstalls the running environment's bnjax first
      "--prefix",
      str(venv),
      "-e",
      str(clone),
    ],
    check=True,
    capture_output=True,
    timeout=300,
  )
  assert _installed_bnjax() == installed_before, "the test's install removed the suite's own bnjax"
  env = child_env(PYTHONPATH=_site_packages())  # the dependencies only
  python = str(venv / "bin" / "python")
  result = subprocess.run(
    [python, "-c", "import bnjax; print(bnjax.__file__, bnjax.init(2)[1].var)"],
    cwd=tmp_path / "parent",
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.stdout == f"{clone / 'bnjax' / '__init__.py'} [1. 1.]\n", result.stderr
  result = subprocess.run(
    [python, "-m", "experiments.mnist", "--help"],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert "--config.FIELD=VALUE" in result.stdout, result.stderr  # (absl exits 1 after --help)


@pytest.mark.slow
@pytest.mark.parametrize("module", ["bnjax.linen", "bnjax.nnx"])
def test_without_flax_the_drop_ins_say_what_to_install(module):
  """No index has bnjax, so `pip install "bnjax[flax]"` cannot work: the error
  names the installs that do."""
  without_flax = (
    "import sys\n"
    "class WithoutFlax:\n"
    "  def find_spec(self, name, path=None, target=None):\n"
    "    if name.split('.')[0] == 'flax':\n"
    "      raise ModuleNotFoundError(f\"No module named '{name}'\", name=name)\n"
    "sys.meta_path.insert(0, WithoutFlax())\n"
    f"import {module}\n"
  )
  result = _python(without_flax)
  flax = next(
    r
    for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
      "optional-dependencies"
    ]["flax"]
    if r.startswith("flax")
  )
  assert result.stderr.splitlines()[-1] == (
    f"ModuleNotFoundError: {module} needs Flax (No module named 'flax'): pip install '{flax}', "
    "or pip install -e '.[flax]' in a clone of bnjax"
  )


def test_no_install_line_names_bnjax_on_an_index():
  """`pip install "bnjax[...]"` (or 'bnjax[...]') needs bnjax on an index, which it is not."""
  pages = [
    ROOT / "README.md",
    *ROOT.glob("docs/**/*.md"),
    *ROOT.glob("experiments/**/*.md"),
    *ROOT.glob("bnjax/*.py"),
    *ROOT.glob("experiments/**/*.py"),
  ]
  pattern = re.compile(r"""pip install [^`\n]*?["']?bnjax\[[\w,]+\]["']?(?! @)""")
  found = [
    f"{page.relative_to(ROOT)}: {match.group()}"
    for page in pages
    for match in pattern.finditer(page.read_text())
  ]
  assert not found, found
