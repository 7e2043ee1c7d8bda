"""PyTorch worker for ``benchmarks/vs_peers.py``; runs in ``.venv-torch``.

The same networks as binax's ``vgg_small`` / ``bnn_mlp`` / ``resnet18`` with ``ste_sign`` on inputs and
kernels: ``sign`` with ``sign(0) = +1`` forward and ``g·1[|x| <= 1]`` backward as an
autograd Function (BNN's STE, Larq's ``ste_sign``); binarized inputs padded with +1; a float
first layer, no biases, pooling before batch norm (momentum 0.1 in PyTorch's convention =
0.9 in Keras/Flax's, epsilon 1e-5), a float classifier with a bias; Adam(1e-3) on softmax
cross-entropy.

``--channels-last`` runs the convolutions in NHWC memory format; ``--compile`` wraps the
model in ``torch.compile`` (minutes of compilation on 2 cores).

Usage: ``python torch_worker.py --batch 128 --models vgg_small,bnn_mlp [--channels-last] [--compile]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Run as a script by vs_peers in its own venv: this directory is sys.path[0].
from _worker import serve, worker_parser


class SteSign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x.abs() <= 1.0).to(g.dtype)


class BinaryConv(nn.Conv2d):
    """3x3 stride-1 SAME convolution of sign(x) with sign(W), padded with +1."""

    def __init__(self, cin, cout):
        super().__init__(cin, cout, 3, padding=0, bias=False)

    def forward(self, x):
        xb = F.pad(SteSign.apply(x), (1, 1, 1, 1), value=1.0)
        return F.conv2d(xb, SteSign.apply(self.weight))


class BinaryConvStrided(nn.Conv2d):
    """3x3 convolution of sign(x) with sign(W), padded with +1 as TensorFlow's SAME."""

    def __init__(self, cin, cout, stride):
        super().__init__(cin, cout, 3, stride=stride, padding=0, bias=False)

    def forward(self, x):
        h = x.shape[-1]
        total = max((-(-h // self.stride[0]) - 1) * self.stride[0] + 3 - h, 0)
        xb = F.pad(SteSign.apply(x), (total // 2, total - total // 2) * 2, value=1.0)
        return F.conv2d(xb, SteSign.apply(self.weight), stride=self.stride)


class BinaryLinear(nn.Linear):
    def __init__(self, cin, cout):
        super().__init__(cin, cout, bias=False)

    def forward(self, x):
        return F.linear(SteSign.apply(x), SteSign.apply(self.weight))


def _bn2d(c):
    return nn.BatchNorm2d(c, momentum=0.1, eps=1e-5)


def vgg_small(widths=(128, 128, 256, 256, 512, 512), pool_after=(2, 4, 6)) -> nn.Module:
    layers, cin = [], 3
    for i, width in enumerate(widths):
        layers.append(nn.Conv2d(cin, width, 3, padding=1, bias=False) if i == 0 else BinaryConv(cin, width))
        if i + 1 in pool_after:
            layers.append(nn.MaxPool2d(2))
        layers.append(_bn2d(width))
        cin = width
    side = 32 // 2 ** len(pool_after)
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(cin * side * side, 10))


def bnn_mlp(widths=(2048, 2048, 2048)) -> nn.Module:
    layers, cin = [nn.Flatten()], 784
    for i, width in enumerate(widths):
        layers.append(nn.Linear(cin, width, bias=False) if i == 0 else BinaryLinear(cin, width))
        layers.append(nn.BatchNorm1d(width, momentum=0.1, eps=1e-5))
        cin = width
    return nn.Sequential(*layers, nn.Linear(cin, 10))


class ResidualUnit(nn.Module):
    """binax's residual unit: sign -> binary 3x3 conv (padded with +1) -> BN -> + shortcut."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv, self.bn = BinaryConvStrided(cin, cout, stride), _bn2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            # Bi-Real's downsampling: 2x2 average pool -> float 1x1 conv -> BN.
            pool = [nn.AvgPool2d(stride, stride)] if stride != 1 else []
            self.down = nn.Sequential(*pool, nn.Conv2d(cin, cout, 1, bias=False), _bn2d(cout))

    def forward(self, x):
        return self.bn(self.conv(x)) + (x if self.down is None else self.down(x))


def resnet18(widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2), classes=1000) -> nn.Module:
    """binax's ``resnet18`` with ste_sign (vs_peers.py): float 7x7/2 stem -> BN -> 3x3/2
    max-pool, 16 residual units, global average pool, float linear with a bias."""
    layers = [nn.Conv2d(3, widths[0], 7, stride=2, padding=3, bias=False), _bn2d(widths[0]), nn.MaxPool2d(3, 2, padding=1)]
    cin = widths[0]
    for s, (n, width) in enumerate(zip(blocks, widths)):
        for u in range(2 * n):
            layers.append(ResidualUnit(cin, width, 2 if (s > 0 and u == 0) else 1))
            cin = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes))


NETWORKS = {
    "vgg_small": (vgg_small, (3, 32, 32), 10),
    "bnn_mlp": (bnn_mlp, (1, 28, 28), 10),
    "resnet18": (resnet18, (3, 224, 224), 1000),
}


def make_step(name: str, batch: int, channels_last: bool, compile_: bool):
    builder, shape, classes = NETWORKS[name]
    torch.manual_seed(0)
    net = builder()
    x = torch.randn(batch, *shape)
    y = torch.randint(0, classes, (batch,))
    if channels_last and name in ("vgg_small", "resnet18"):
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    fwd = torch.compile(net) if compile_ else net

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(fwd(x), y)
        loss.backward()
        opt.step()

    return step


def main():
    p = worker_parser()
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: PyTorch's default)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    steps = {m: make_step(m, a.batch, a.channels_last, a.compile) for m in a.models.split(",")}
    info = {"framework": "torch", "torch": torch.__version__, "threads": torch.get_num_threads()}
    info.update(channels_last=a.channels_last, compile=a.compile)
    serve(steps, info)


if __name__ == "__main__":
    main()
