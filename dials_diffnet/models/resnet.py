"""ResNet family (He et al. 2015) for diffraction-image representations.

Depth 18/34 use basic blocks, 50 bottleneck blocks; `width` is the channel
count of the first stage (64 in the paper) so a compact model can serve
CPU-only sites. Input: the representation's planes (intensity, validity and
optionally cell signal-to-noise) of a square grid.
"""

from __future__ import annotations

import torch
from torch import nn

from dials_diffnet.representation import N_CHANNELS

STAGES = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)), 50: ("bottleneck", (3, 4, 6, 3))}


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in, c_mid, stride):
        super().__init__()
        c_out = c_mid * self.expansion
        self.conv1 = nn.Conv2d(c_in, c_mid, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_mid)
        self.conv2 = nn.Conv2d(c_mid, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = _shortcut(c_in, c_out, stride)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in, c_mid, stride):
        super().__init__()
        c_out = c_mid * self.expansion
        self.conv1 = nn.Conv2d(c_in, c_mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_mid)
        self.conv2 = nn.Conv2d(c_mid, c_mid, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_mid)
        self.conv3 = nn.Conv2d(c_mid, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.shortcut = _shortcut(c_in, c_out, stride)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return torch.relu(y + self.shortcut(x))


def _shortcut(c_in, c_out, stride):
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))


class ResNet(nn.Module):
    """Backbone to a pooled feature vector of size `n_features`."""

    def __init__(self, depth=18, width=64, in_channels=2):
        super().__init__()
        kind, counts = STAGES[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 7, 2, 3, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        layers, c_in = [], width
        for i, n in enumerate(counts):
            c_mid = width * 2**i
            for j in range(n):
                layers.append(block(c_in, c_mid, 2 if (j == 0 and i > 0) else 1))
                c_in = c_mid * block.expansion
        self.stages = nn.Sequential(*layers)
        self.n_features = c_in
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.stages(self.stem(x))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


def radius_plane(x: torch.Tensor) -> torch.Tensor:
    """|q| of every grid cell as a fraction of the grid's reach, shaped (N, 1, H, W) like `x`'s planes.

    The grid centre is q = 0 (representation.py), so this is the resolution coordinate.
    """
    n_rows, n_cols = x.shape[-2:]
    rows = torch.arange(n_rows, device=x.device, dtype=x.dtype) - (n_rows - 1) / 2
    cols = torch.arange(n_cols, device=x.device, dtype=x.dtype) - (n_cols - 1) / 2
    radius = torch.hypot(rows[:, None], cols[None, :]) / (n_rows / 2)
    return radius.expand(x.shape[0], 1, n_rows, n_cols)


class CrystalNet(nn.Module):
    """One backbone, three heads: resolution as |q| = 1/d (1/Angstrom), multi-lattice and hit logits.

    One forward pass per image serves all three judgements, which is what keeps
    inference at detector rate on a CPU.

    `radius_channel` appends |q| as an input plane: convolutions and average
    pooling do not know where a feature sits, and resolution is where on the
    radius spots fade. A control run found no gain from it at width 16
    (docs/training.md); the shipped models since 0.4.0 have it.
    """

    OUTPUTS = ("s_min", "multi_logit", "hit_logit")

    def __init__(self, depth=18, width=64, in_channels=2, radius_channel=False):
        super().__init__()
        self.radius_channel = radius_channel
        self.backbone = ResNet(depth, width, in_channels + int(radius_channel))
        self.head = nn.Linear(self.backbone.n_features, len(self.OUTPUTS))

    def forward(self, x):
        if self.radius_channel:
            # after the two planes every model reads, before any later one: a model grown with a new
            # data plane keeps its predecessor's input order (train.initialise_from copies leading channels)
            x = torch.cat([x[:, :N_CHANNELS], radius_plane(x), x[:, N_CHANNELS:]], dim=1)
        out = self.head(self.backbone(x))
        # Softplus keeps 1/d positive; blank images are judged by the hit head, not here.
        return {
            "s_min": nn.functional.softplus(out[:, 0]),
            "multi_logit": out[:, 1],
            "hit_logit": out[:, 2],
        }
