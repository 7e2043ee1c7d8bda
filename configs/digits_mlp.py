"""IR-Net binary MLP on scikit-learn's 8x8 digits: a seconds-long example (and the tests' run).

1500 training and 297 test images, so every part of training (sharding, checkpoints,
resume, metrics) can be exercised in a few seconds on a laptop CPU.

    python -m experiments.run --config configs/digits_mlp.py
"""

from configs import common

EDE = {"t_min": 0.1, "t_max": 10.0}


def get_config(arg=None):
    args = common.parse_arg(arg, quick=False)
    c = common.base_config()
    c.model = common.model_config(
        "bnn_mlp",
        widths=(256, 256),
        input_quantizer="ede_sign",
        input_quantizer_kwargs=EDE,
        kernel_quantizer="libra_pb",
        kernel_quantizer_kwargs=EDE,
        latent_weight_clip=None,
    )
    c.data.name = "digits"
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 3e-3
    c.num_epochs = 20
    c.batch_size = 100
    c.eval_batch_size = 300
    c.log_every_steps = 15
    c.report_every_seconds = 5.0
    c.checkpoint.every_steps = 0
    if args.quick:
        common.shrink_quick(c)
    return c
