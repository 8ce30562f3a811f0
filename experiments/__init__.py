"""The paper's experiments, as scripts that run on a laptop CPU and on TPU/GPU."""
