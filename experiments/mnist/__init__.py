"""Section 4.1 and Figure 1 of the paper: a 3-hidden-layer sigmoid MLP on MNIST,
with and without batch normalization.

    python -m experiments.mnist --workdir=W                 # one network
    python -m experiments.mnist.figure1 --workdir=W         # both, and Figure 1
"""
