"""BNN MLP on Fashion-MNIST trained with Bop (Helwegen et al., NeurIPS 2019).

The hidden layers' weights and activations are ste_sign (BNN); Bop flips the binary
weights (``latent_kernel``) and Adam trains everything else (batch norm, the float first
and last layers), as in Larq's Bop examples. Bop's gamma decays with the cosine schedule.
An example of per-group optimizers; its settings are not tuned.

    python -m experiments.run --config configs/fashion_mnist_mlp_bop.py:quick
"""

from configs import common


def get_config(arg=None):
    args = common.parse_arg(arg, quick=False)
    c = common.base_config()
    c.model = common.model_config("bnn_mlp", widths=(1024, 1024, 1024))
    c.data.name = "fashion_mnist"
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 1e-3
    c.binary_optimizer.name = "bop"
    c.binary_optimizer.threshold = 1e-6
    c.binary_optimizer.gamma = 1e-3
    c.binary_optimizer.schedule = "cosine"
    c.num_epochs = 6
    c.batch_size = 128
    if args.quick:
        common.shrink_quick(c)
    return c
