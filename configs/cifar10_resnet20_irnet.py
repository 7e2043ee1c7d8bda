"""IR-Net ResNet-20, 1-bit weights and activations, on CIFAR-10 (Qin et al., CVPR 2020).

The recipe of IR-Net's official code (htqin/IR-Net): SGD with momentum 0.9, weight decay
1e-4, learning rate 0.1 with cosine decay over 400 epochs, batch 128
(``CIFAR-10/ResNet20/1w1a/trainer.py:29-39`` at f63a590); EDE's t from 1e-3 to 10, stepped per epoch;
first conv and classifier full precision (the model's defaults). Standard augmentation
(4-pixel pad + crop, flip). Paper: 86.5% (1w1a). Needs CIFAR-10 built for tfds.

    python -m experiments.run --config configs/cifar10_resnet20_irnet.py
    python -m experiments.run --config configs/cifar10_resnet20_irnet.py:quick
"""

from configs import common


def get_config(arg=None):
    args = common.parse_arg(arg, quick=False)
    c = common.base_config()
    c.model = common.model_config("resnet20")  # IR-Net 1w1a defaults: libra_pb + ede_sign
    c.data.name = "cifar10"
    c.optimizer.name = "sgd"
    c.optimizer.momentum = 0.9
    c.optimizer.weight_decay = 1e-4
    c.optimizer.learning_rate = 0.1
    c.optimizer.schedule = "cosine"
    c.num_epochs = 400
    c.batch_size = 128
    c.progress_unit = "epoch"
    c.log_every_steps = 100
    c.checkpoint.every_steps = 1000
    if args.quick:
        common.shrink_quick(c)
    return c
