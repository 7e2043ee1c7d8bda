"""IR-Net binary MLP on Fashion-MNIST: the default config (``bash dev.sh run``).

1-bit weights and activations in the hidden layers (Libra-PB weights, EDE sign
activations, Qin et al. CVPR 2020); the first layer (pixels in) and the classifier stay
full precision. EDE's t goes from t_min to t_max once per epoch, as IR-Net's code does.

Measured: see the README/report (test accuracy and wall time on 2 CPU cores).

    python -m experiments.run                                   # this config
    python -m experiments.run --config configs/default.py:quick # one short epoch
"""

from configs import common

EDE = {"t_min": 0.1, "t_max": 10.0}


def get_config(arg=None):
    args = common.parse_arg(arg, quick=False)
    c = common.base_config()
    c.model = common.model_config(
        "bnn_mlp",
        widths=(1024, 1024, 1024),
        input_quantizer="ede_sign",
        input_quantizer_kwargs=EDE,
        kernel_quantizer="libra_pb",
        kernel_quantizer_kwargs=EDE,
        latent_weight_clip=None,
    )
    c.data.name = "fashion_mnist"
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.schedule = "cosine"
    c.num_epochs = 6
    c.batch_size = 128
    c.progress_unit = "epoch"
    if args.quick:
        common.shrink_quick(c)
    return c
