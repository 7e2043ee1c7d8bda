"""The accelerator path lowers on the CPU test machine: ``jax.export`` for ``("cuda",)``
and ``("tpu",)`` of the jitted, sharded train step of the IR-Net ResNet-18 ImageNet recipe
(float32 and bfloat16) and of ``vgg_small``'s packed inference. Lowering only, nothing is
compiled; an op that has no lowering for a platform fails here, not on the user's pod.

The binary layers' ``impl="auto"`` (and the packed kernels' ``method="auto"``) is chosen
for the platform the code is lowered for, not the host: XLA convolutions / int8 matmuls
for GPU and TPU, XNOR-popcount for CPU (``binax.ops``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import binax.data
import binax.export
import binax.models
from binax import train
from configs import recipe

ACCELERATORS = ("cuda", "tpu")
DEVICES = 4  # an abstract mesh: the lowered step is sharded over 4 devices of the target


def _sharded_train_step(compute_dtype: str):
    config = recipe.get_config("method=irnet,dataset=imagenet2012")
    config.compute_dtype = compute_dtype
    trainer = train.build_trainer(config, binax.data.create({"name": "synthetic"}, seed=0))
    mesh = jax.sharding.AbstractMesh((DEVICES,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    step = jax.jit(trainer.train_fn, in_shardings=(replicated, data), out_shardings=replicated, donate_argnums=0)
    state = jax.eval_shape(trainer.init)
    batch = {
        "image": jax.ShapeDtypeStruct((2 * DEVICES, 224, 224, 3), jnp.float32),
        "label": jax.ShapeDtypeStruct((2 * DEVICES,), jnp.int32),
    }
    return step, state, batch


@pytest.mark.slow
@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_irnet_resnet18_train_step_lowers_for_gpu_and_tpu(compute_dtype):
    step, state, batch = _sharded_train_step(compute_dtype)
    for platform in ACCELERATORS:
        exported = jax.export.export(step, platforms=(platform,))(state, batch)
        text = exported.mlir_module()
        assert exported.platforms == (platform,) and exported.nr_devices == DEVICES
        # The binary convolutions run as XLA convolutions there (impl "auto" on GPU/TPU):
        # 7x7 stem, 16 binary 3x3 convs and 3 1x1 downsampling convs, forward and backward
        # (59: the stem has no input gradient).
        assert "popcnt" not in text
        assert text.count("stablehlo.convolution") >= 2 * 20
        if compute_dtype == "bfloat16":
            assert "bf16" in text


def _random_variables(model, shape, rng):
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *shape)), train=False))

    def leaf(path, s):
        name = path[-1].key
        if name == "var":
            return rng.uniform(0.5, 2.0, s.shape).astype(np.float32)
        return rng.standard_normal(s.shape).astype(np.float32) * (0.1 if name in ("bias", "mean") else 1.0)

    return jax.tree_util.tree_map_with_path(leaf, abstract)


def test_vgg_small_packed_inference_lowers_for_gpu_and_tpu():
    model = binax.models.create("vgg_small", width_multiplier=0.25)  # the same ops, less packing
    variables = _random_variables(model, (32, 32, 3), np.random.default_rng(0))
    packed = binax.export.export(model, variables, preprocessing=None, input_shape=(32, 32, 3))
    assert packed.runtime == "chain"
    for platform in ACCELERATORS:
        text = packed.jax_export(platforms=(platform,)).mlir_module()
        # Packed products as int8 matmuls on the accelerators' integer units, not popcounts.
        assert "popcnt" not in text and "xi8>" in text


def _lowered(fn, platform, *shapes):
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    return jax.export.export(jax.jit(fn), platforms=(platform,))(*args).mlir_module()


def test_auto_implementation_follows_the_platform_lowered_for_not_the_host():
    from binax import ops
    from binax.packed import kernels, pack_bits

    def conv_grad(x, k):  # forward and backward of the binary convolution
        return jax.value_and_grad(lambda x, k: ops.binary_conv2d(jnp.sign(x), k).sum(), argnums=(0, 1))(x, k)

    def dense(x, k):
        return ops.binary_dense(jnp.sign(x), k)

    def packed(x, k):
        return kernels.packed_dense(pack_bits(x, axis=-1), pack_bits(k, axis=0), 40)

    for fn, shapes in ((conv_grad, [(2, 6, 6, 8), (3, 3, 8, 4)]), (dense, [(2, 40), (40, 4)]), (packed, [(2, 40), (40, 4)])):
        assert "popcnt" in _lowered(fn, "cpu", *shapes), fn.__name__
        for platform in ACCELERATORS:
            assert "popcnt" not in _lowered(fn, platform, *shapes), (fn.__name__, platform)
