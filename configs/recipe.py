"""Every method binax implements, run the same way: ``configs/recipe.py:method=<name>``.

    python -m experiments.run --config configs/recipe.py:method=irnet
    python -m experiments.run --config configs/recipe.py:method=abc,m=3,n=3,arch=cnn
    python -m experiments.run --config configs/recipe.py:method=xnor,dataset=cifar10
    python -m experiments.run --config configs/recipe.py:method=sb,quick
    python -m experiments.run --config configs/recipe.py:method=binaryduo  # 3 stages, one command

Arguments (``key=value`` after ``:``, comma separated):

* ``method``: one of ``METHODS`` below.
* ``dataset``: ``fashion_mnist`` (default; the data every machine has), ``cifar10`` or
  ``imagenet2012`` (the papers' own architectures and optimizers, for users with the data
  and an accelerator). The ImageNet recipes' learning rate follows the batch size the run
  uses, linearly from the official code's (IR-Net: 0.8 at batch 2048, so 0.1 at the
  default 256 and 0.8 with ``--config.batch_size=2048``; Bi-Real/ReActNet: Adam 1e-3 at
  batch 512); an explicit ``--config.optimizer.learning_rate`` still wins. Sources in
  ``IRNET_IMAGENET_LR`` / ``BIREAL_IMAGENET_LR`` and docs/recipes.md.
* ``arch``: on Fashion-MNIST, ``mlp`` (784-W-W-W-10, ``bnn_mlp``) or ``cnn``
  (``cnn_small``, 32-32-64-64); ``width`` sets W for the MLP (default 512).
* ``m``, ``n``: ABC-Net's weight and activation bases (default 3, 3).
* ``epochs``, ``seed``, ``quick`` (one short epoch of a 4x narrower model, the
  learning-rate schedule compressed into it: ``configs.common.shrink_quick``).
* ``epochs_match``: ``binaryduo`` trains for BinaryDuo's total epochs (its coupled epochs
  plus its fine-tuning, e.g. 5 + 2 = 7): ``method=duo_binary,epochs_match=binaryduo`` is
  the plain binary network at BinaryDuo's cost AND training length.
* ``holdout``: Fashion-MNIST only, the training images held out as the validation split
  (``data.validation_holdout``): the last ``HOLDOUT`` = 10,000 of the 60,000 by default,
  so that every choice of a recipe setting reads validation accuracy and the test set is
  read only for the final tables; ``holdout=0`` trains on all 60,000 (the protocol of
  the tables before the validation split).

Fashion-MNIST uses one optimizer for every method (Adam 1e-3 with cosine decay, batch
128, no weight decay) so that the results table compares methods, not tuning; the other
settings follow the paper and its official code where binax can, and docs/recipes.md audits
them and names each deviation. Runs of
fewer than 10 epochs read binarizer schedules per step (``configs.common.progress_unit``).
Methods that are more than a binarizer are multi-stage procedures (``procedure``):
``self_binarizing`` folds the trained network into sign + BinaryBN thresholds and
evaluates that; ``binaryduo`` trains the coupled ternary network (at the plain binary
network's binary-op count, ``binax.recipes.binaryduo_widths``) for the full epochs,
decouples it and fine-tunes for a third as many more.
"""

from __future__ import annotations

import ml_collections

from binax import recipes
from binax.errors import ConfigError
from configs import common

EDE = {"t_min": 0.1, "t_max": 10.0}
# Self-Binarizing's nu schedule, chosen per architecture on validation accuracy among the
# variants of docs/recipes.md (benchmarks/sb_schedule.py, seeds 0-1): the MLP picks 1 -> 3,
# the CNN 1 -> 10. CIFAR-10's and ImageNet's conv nets take the CNN's (not measured there).
SB_NU = {
    "mlp": {"nu_0": 1.0, "nu_start": 3.0, "nu_max": 1e9, "start": 0.9},
    "conv": {"nu_0": 1.0, "nu_start": 10.0, "nu_max": 1e9, "start": 0.9},
}

# name -> (model overrides, description). Quantizers by binax.binarizers registry name.
METHODS: dict[str, tuple[dict, str]] = {
    "fp": (
        dict(input_quantizer=None, kernel_quantizer=None, activation="relu", latent_weight_clip=None),
        "full precision (ReLU), the reference",
    ),
    "bnn": (
        dict(input_quantizer="ste_sign", kernel_quantizer="ste_sign", latent_weight_clip=1.0),
        "BNN (Hubara et al. 2016): ste_sign weights and activations, latent weights clipped to [-1, 1]",
    ),
    "xnor": (
        dict(input_quantizer="ste_sign", kernel_quantizer="xnor_weight", latent_weight_clip=1.0),
        "XNOR-Net: mean|W| per output channel times sign(W); ste_sign activations",
    ),
    "dorefa": (
        dict(input_quantizer="dorefa", input_quantizer_kwargs={"k_bit": 1}, kernel_quantizer="duo_weight",
             latent_weight_clip=None),
        "DoReFa 1/1: {0,1} activations q_1(clip(x, 0, 1)), weights sign(w)·mean|w| per layer",
    ),
    "bireal": (
        dict(input_quantizer="approx_sign", kernel_quantizer="xnor_weight", latent_weight_clip=None),
        "Bi-Real: approx_sign activations, magnitude-aware weights (real shortcuts: arch=resnet on CIFAR)",
    ),
    "reactnet": (
        dict(input_quantizer="approx_sign", kernel_quantizer="xnor_weight", activation="rprelu",
             latent_weight_clip=None),
        "ReActNet: RPReLU after BN (its output shift is RSign's learned threshold), approx_sign; no distillation",
    ),
    "irnet": (
        # hardtanh after every batch norm, as the official code before every binarized
        # activation (CIFAR-10/VGG-Small/vgg.py nn.Hardtanh; ResNet20/1w1a/resnet.py
        # F.hardtanh): EDE's early backward (t = 0.1, k = 10) then only passes |x| <= 1.
        dict(input_quantizer="ede_sign", input_quantizer_kwargs=EDE, kernel_quantizer="libra_pb",
             kernel_quantizer_kwargs=EDE, activation="hardtanh", latent_weight_clip=None),
        "IR-Net: Libra-PB weights, EDE (t from 0.1 to 10) on weights and activations, hardtanh before every sign",
    ),
    "abc": (
        dict(layer_type="abc", latent_weight_clip=None),
        "ABC-Net: M weight bases x N activation bases (m=, n=)",
    ),
    "sb": (
        # nu from 1 to a moderate value over the first 90% of training (the network learns
        # a nearly binary forward while the learning rate is useful), then to 1e9 by the
        # last update, so the trained network IS the deployed sign network. Weights are
        # measured in units of their own mean|w| (tanh_sign relative=True) so that they
        # sharpen with the same nu as the batch-normed activations. The schedule is per
        # architecture (SB_NU, set in _method_overrides); measurements in docs/recipes.md.
        dict(input_quantizer="tanh_sign", kernel_quantizer="tanh_sign", activation="none", latent_weight_clip=None),
        "Self-Binarizing: tanh(nu x) on activations and tanh(nu w / mean|w|) on weights, nu 1 -> 3 (MLP) "
        "or 1 -> 10 (conv nets) over 90% of training, then -> 1e9 per step; evaluated as sign + BinaryBN",
    ),
    "duo_binary": (
        dict(input_quantizer="duo_binary", kernel_quantizer="duo_weight", latent_weight_clip=None),
        "BinaryDuo's plain binary network ({0,1} activations, duo_weight): the same-cost baseline",
    ),
    "binaryduo": (
        dict(input_quantizer="duo_ternary", kernel_quantizer="duo_weight", latent_weight_clip=None),
        "BinaryDuo: coupled ternary training at the same binary-op count (widths ~W/√2), decoupled "
        "(outputs copied, weights tied), fine-tuned",
    ),
}

PROCEDURES = {"sb": "self_binarizing", "binaryduo": "binaryduo"}
DATASETS = ("fashion_mnist", "cifar10", "imagenet2012")
# Fashion-MNIST's validation split: the last 10,000 of the 60,000 training images
# (binax.data.in_memory.split_holdout), the size of its test split.
HOLDOUT = 10_000
ARCHS = ("mlp", "cnn")
# BinaryDuo fine-tunes the decoupled network after the coupled network's full schedule,
# for about a third of it: the official train.lua decays at epochs 71/91/111 from scratch
# and 21/31/36 when fine-tuning (ImageNet ResNet-18), 41/71/91 and 16/26/36 (AlexNet).
BINARYDUO_FINETUNE_FRACTION = 1 / 3
# ... at this factor of the coupled network's learning rate: the official code takes the
# rate from the command line (-LR) and publishes no runs' values, so binax chooses it per
# architecture on validation accuracy (benchmarks/duo_finetune_lr.py, seeds 0-1; factors
# 1, 0.1, 0.01 on the MLP, 1 and 0.1 on the CNN; docs/recipes.md). Conv nets: the CNN's.
BINARYDUO_FINETUNE_LR_FACTOR = {"mlp": 1.0, "conv": 1.0}


def _fashion_mnist(c, args):
    width = args.width
    name, overrides = ("bnn_mlp", dict(widths=(width,) * 3)) if args.arch == "mlp" else ("cnn_small", {})
    if args.method == "binaryduo":
        # The coupled network has the plain binary network's binary-op count: ~W/√2
        # channels where a ternary activation (two binary ones) follows.
        overrides = recipes.binaryduo_widths(name, (28, 28, 1), **overrides)
    c.model = common.model_config(name, **overrides, **_method_overrides(args))
    c.data.name = "fashion_mnist"
    c.data.validation_holdout = args.holdout
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.schedule = "cosine"
    c.num_epochs = args.epochs or 5
    c.batch_size = 128


def _cifar10(c, args):
    # IR-Net's official CIFAR-10 settings: SGD momentum 0.9, wd 1e-4, cosine;
    # VGG-small lr 0.007 for 300 epochs, ResNet-20 lr 0.1 for 400 (EDE t_min 1e-3).
    overrides = _method_overrides(args)
    if args.arch == "resnet":
        if args.method == "irnet":
            ede = {"t_min": 1e-3, "t_max": 10.0}
            overrides.update(input_quantizer_kwargs=ede, kernel_quantizer_kwargs=ede)
        c.model = common.model_config("resnet20", **overrides)
        c.optimizer.learning_rate, c.num_epochs = 0.1, args.epochs or 400
    else:
        overrides.setdefault("activation", "hardtanh")
        c.model = common.model_config("vgg_small", **overrides)
        c.optimizer.learning_rate, c.num_epochs = 0.007, args.epochs or 300
    c.data.name = "cifar10"
    c.optimizer.name = "sgd"
    c.optimizer.momentum = 0.9
    c.optimizer.weight_decay = 1e-4
    c.optimizer.schedule = "cosine"
    c.batch_size = 128


# The official ImageNet recipes' (learning rate, batch size): the learning rate follows the
# batch size a run actually uses, linearly (Goyal et al. 2017, "Accurate, Large Minibatch
# SGD"), so a pod at --config.batch_size=2048 trains with IR-Net's own 0.8.
# IR-Net (htqin/IR-Net@f63a5901d02836e2cf4405da1c68e066353a025f,
# ImageNet/ResNet18/1w1a/config.yaml:14,22-24 and README.md:27): batch 64 per GPU on 32
# GPUs = 2048, lr 0.2 warmed up to 0.8 (0.1 per 256 images).
IRNET_IMAGENET_LR = (0.8, 2048)
# Bi-Real Net's PyTorch ResNet-18 (liuzechun/Bi-Real-net@f58aa4d1fa730fcd2e33c3745fcd6c479d7f42e3,
# pytorch_implementation/BiReal18_34/train.py:24,26) and ReActNet's first step
# (liuzechun/ReActNet@a6cd08d4605d94135faea6fd73354041e4130b52, resnet/1_step1/train.py:25,27;
# run.sh:4 uses the same batch 512 with 2.5e-3 for 128 epochs): Adam, lr 1e-3 at batch 512.
BIREAL_IMAGENET_LR = (1e-3, 512)


def scaled_learning_rate(c: ml_collections.ConfigDict, reference: tuple[float, int]):
    """``lr * batch_size / reference_batch`` as a reference to ``c.batch_size``: it follows
    a ``--config.batch_size=...`` given after ``get_config`` (a ``--config.optimizer.
    learning_rate=...`` flag still sets the learning rate itself)."""
    lr, batch = reference
    return c.get_ref("batch_size").to_float() * (lr / batch)


def _imagenet(c, args):
    overrides = _method_overrides(args)
    c.data.name = "imagenet2012"
    c.batch_size = 256
    c.eval_batch_size = 250
    if args.method == "irnet":
        # IR-Net's ImageNet ResNet-18 1w1a (ImageNet/ResNet18/1w1a/models/resnet.py):
        # hardtanh after the stem and every addition, 1x1 conv + BN downsampling, BN1d
        # before the FC. config.yaml: SGD Nesterov, momentum 0.9, batch 64 x 32 GPUs =
        # 2048, lr 0.2 warmed up to 0.8 over 2500 iterations (4 epochs), x0.1 at
        # iterations 18750/37500/56250 of 62500 (epochs 30/60/90 of 100), weight decay 1e-5
        # in optimizer.kwargs (the file's top level says 1e-4). The learning rate scales
        # with the batch (IRNET_IMAGENET_LR): 0.1 at batch 256, 0.8 at 2048.
        overrides.update(shortcut="B", stem_activation="hardtanh", head_bn=True)
        c.model = common.model_config("resnet18", num_classes=1000, **overrides)
        c.optimizer.name = "nesterov"
        c.optimizer.momentum = 0.9
        c.optimizer.learning_rate = scaled_learning_rate(c, IRNET_IMAGENET_LR)
        c.optimizer.schedule = "step"
        c.optimizer.step_epochs = (30, 60, 90)
        c.optimizer.warmup_epochs = 4.0
        c.optimizer.weight_decay = 1e-5
        c.num_epochs = args.epochs or 100
        return
    # Bi-Real ResNet-18; Adam with linear decay (ReActNet, Bi-Real's later code), the
    # learning rate scaled with the batch (BIREAL_IMAGENET_LR): 5e-4 at batch 256.
    c.model = common.model_config("resnet18", num_classes=1000, **overrides)
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = scaled_learning_rate(c, BIREAL_IMAGENET_LR)
    c.optimizer.schedule = "linear"
    c.num_epochs = args.epochs or 120


def _family(args) -> str:
    """'mlp' for the Fashion-MNIST MLP, 'conv' for every conv net: the settings chosen per
    architecture on validation (SB_NU, BINARYDUO_FINETUNE_LR_FACTOR) are keyed by it."""
    return "mlp" if (args.dataset, args.arch) == ("fashion_mnist", "mlp") else "conv"


def _method_overrides(args) -> dict:
    overrides = dict(METHODS[args.method][0])
    for key in ("input_quantizer", "kernel_quantizer"):
        # A method's binarizer replaces the model's default with its own keywords, not
        # the default's (vgg_small's ede_sign t_min/t_max would reach ste_sign).
        if key in overrides:
            overrides.setdefault(key + "_kwargs", {})
    if args.method == "abc":
        overrides.update(abc_m=args.m, abc_n=args.n)
    if args.method == "sb":
        nu = SB_NU[_family(args)]
        overrides.update(input_quantizer_kwargs=dict(nu), kernel_quantizer_kwargs={**nu, "relative": True})
    return overrides


def get_config(arg=None) -> ml_collections.ConfigDict:
    args = common.parse_arg(
        arg, method="irnet", dataset="fashion_mnist", arch="mlp", width=512, m=3, n=3, epochs=0, seed=0, quick=False,
        holdout=HOLDOUT, epochs_match="",
    )
    if args.method not in METHODS:
        raise ValueError(f"unknown method {args.method!r}; valid: {', '.join(METHODS)}")
    if args.dataset not in DATASETS:
        raise ValueError(f"unknown dataset {args.dataset!r}; valid: {', '.join(DATASETS)}")
    if args.dataset != "fashion_mnist" and args.holdout != HOLDOUT:
        raise ConfigError(f"holdout={args.holdout!r} applies to dataset=fashion_mnist; {args.dataset} has no validation split")
    if args.dataset == "fashion_mnist" and args.arch not in ARCHS:
        raise ValueError(f"unknown arch {args.arch!r} for fashion_mnist; valid: {', '.join(ARCHS)}")
    c = common.base_config()
    {"fashion_mnist": _fashion_mnist, "cifar10": _cifar10, "imagenet2012": _imagenet}[args.dataset](c, args)
    c.seed = args.seed
    c.progress_unit = common.progress_unit(c.num_epochs)
    c.log_every_steps = 100
    c.recipe = ml_collections.ConfigDict(
        dict(
            method=args.method,
            procedure=PROCEDURES.get(args.method, "train"),
            finetune_epochs=max(1, round(c.num_epochs * BINARYDUO_FINETUNE_FRACTION)),
        )
    )
    if args.epochs_match not in ("", "binaryduo") or (args.epochs_match and args.method == "binaryduo"):
        raise ConfigError(
            f"epochs_match={args.epochs_match!r} must be 'binaryduo' (or absent), for a method other than binaryduo"
        )
    if args.method == "binaryduo":
        c.recipe.finetune_lr_factor = BINARYDUO_FINETUNE_LR_FACTOR[_family(args)]
    if args.epochs_match:  # BinaryDuo's coupled epochs plus its fine-tuning
        c.num_epochs += c.recipe.finetune_epochs
        c.progress_unit = common.progress_unit(c.num_epochs)
    if args.method == "sb":
        # nu must sharpen smoothly up to nu_max by the last update, so that the trained
        # network is the deployed sign network: per-step progress, not per-epoch jumps.
        c.progress_unit = "step"
    if args.quick:
        common.shrink_quick(c)
        c.recipe.finetune_epochs = 1
    return c
