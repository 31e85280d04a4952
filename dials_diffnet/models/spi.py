"""Networks for XFEL single-particle imaging (SPI) patterns on the SPI_GRID representation.

`PattersonChannel` is a fixed physics layer in front of the convolutions: the
magnitude of the 2-D Fourier transform of the pattern (log intensity, validity-
masked, Hann-windowed), i.e. the autocorrelation of the projected particle
cluster. Every pair of particles in the beam puts a pair of peaks at +-its
separation vector; a single particle gives only the central blob. Counting those
peaks is easier than counting interleaved fringe systems in the pattern itself.

`SpiTrunk` is a compact VGG-like stack of ten 3x3 convolutions (Simonyan &
Zisserman 2014; the 10-layer late-branching multi-output CNN of Cai & Liu 2021
is the same idea): five stages of two conv-BN-ReLU layers, the first layer
strided, 2x2 max pooling between stages, then global average and max pooling.
`SpiMultiNet` branches late, after the whole trunk, into a particle-count head
(4 classes: 1-4 particles) and a particle-type head. `SpiTwinNet` maps a pattern
to an L2-normalised embedding for the triplet loss and few-shot classification.
"""

from __future__ import annotations

import torch
from torch import nn

from dials_diffnet.models.grow import grow_into
from dials_diffnet.models.views import ViewAveraged


def _conv(c_in, c_out, stride=1):
    return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class PattersonChannel(nn.Module):
    """Appends log1p|FFT| of a flattened pattern (x validity, Hann window), centred, scaled to max 1.

    mode "log": the pattern is channel 0 (log intensity) minus its valid mean.
    mode "flat": the pattern is intensity exp(channel 0) over its mean at the same |q|, minus 1:
    the steep fall of intensity with |q| divided out, so the Fourier transform is the
    autocorrelation of the particle cluster (the convolution theorem holds for intensity,
    not for its logarithm) with fringes from every |q| weighted alike.
    """

    def __init__(self, mode="log"):
        super().__init__()
        if mode not in ("log", "flat"):
            raise ValueError(f"unknown Patterson mode {mode!r}")
        self.mode = mode

    def _flattened(self, x, valid):
        size = x.shape[-1]
        centre = (torch.arange(size, device=x.device, dtype=x.dtype) + 0.5) - size / 2
        radius = torch.hypot(centre[:, None], centre[None, :]).round().long().reshape(-1)
        n_bins = int(radius.max()) + 1
        intensity = torch.exp(x[:, 0]) * valid
        flat_i, flat_v = intensity.reshape(len(x), -1), valid.reshape(len(x), -1)
        index = radius.expand_as(flat_i)
        sums = torch.zeros(len(x), n_bins, device=x.device, dtype=x.dtype).scatter_add_(1, index, flat_i)
        counts = torch.zeros_like(sums).scatter_add_(1, index, flat_v)
        mean = (sums / counts.clamp_min(1)).gather(1, index).reshape_as(intensity)
        return (intensity / mean.clamp_min(1e-6) - 1) * valid

    def forward(self, x):
        size = x.shape[-1]
        window = torch.hann_window(size, periodic=False, device=x.device, dtype=x.dtype)
        valid = x[:, 1]
        if self.mode == "flat":
            img = self._flattened(x, valid) * window[:, None] * window[None, :]
        else:
            level = (x[:, 0] * valid).sum((1, 2), keepdim=True) / valid.sum((1, 2), keepdim=True).clamp_min(1)
            img = (x[:, 0] - level) * valid * window[:, None] * window[None, :]
        spectrum = torch.log1p(torch.fft.fftshift(torch.fft.fft2(img).abs(), dim=(-2, -1)))
        spectrum = spectrum / spectrum.amax((1, 2), keepdim=True).clamp_min(1e-6)
        return torch.cat([x, spectrum[:, None]], dim=1)


class SpiTrunk(nn.Module):
    """Ten conv layers, (B, in_channels, S, S) -> (B, n_features); S = 128 leaves a 4 x 4 map."""

    def __init__(self, width=8, in_channels=2, patterson=True):
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width, 8 * width]
        # patterson: False, True (= "log", the first shipped models) or a PattersonChannel mode
        mode = "log" if patterson is True else patterson
        self.patterson = PattersonChannel(mode) if patterson else nn.Identity()
        layers, c_in = [], in_channels + int(bool(patterson))
        for stage, c in enumerate(widths):
            layers += _conv(c_in, c, stride=2 if stage == 0 else 1) + _conv(c, c)
            if stage < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            c_in = c
        self.features = nn.Sequential(*layers)
        self.n_features = 2 * c_in
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        y = self.features(self.patterson(x))
        return torch.cat([y.mean(dim=(2, 3)), y.amax(dim=(2, 3))], dim=1)


def _head(n_in, n_out, hidden=64):
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(inplace=True), nn.Dropout(0.2), nn.Linear(hidden, n_out))


class SpiMultiNet(nn.Module):
    """Multi-output CNN: logits for the particle count (index 0..3 = 1..4 particles) and the particle type;
    with `hit_head`, also a hit logit (a particle in the beam at all, against a blank frame)."""

    FEATURE_READERS = ("count_head.0", "type_head.0")  # the layers that read the trunk's features

    def __init__(self, n_types=8, n_counts=4, width=8, in_channels=2, patterson=True, hit_head=False):
        super().__init__()
        self.trunk = SpiTrunk(width, in_channels, patterson)
        self.count_head = _head(self.trunk.n_features, n_counts)
        self.type_head = _head(self.trunk.n_features, n_types)
        self.hit_head = _head(self.trunk.n_features, 1) if hit_head else None

    def forward(self, x):
        f = self.trunk(x)
        out = {"count_logits": self.count_head(f), "type_logits": self.type_head(f)}
        if self.hit_head is not None:
            out["hit_logits"] = self.hit_head(f)[:, 0]
        return out


@torch.no_grad()
def fold_count_prior(model: SpiMultiNet, count_frequencies) -> None:
    """Make the count logits those of a net trained on equally many shots of each count (label-shift
    correction): a net trained on unequal counts has log(frequency) learnt into its output biases."""
    frequencies = torch.as_tensor(count_frequencies, dtype=torch.float64)
    model.count_head[-1].bias -= torch.log(frequencies / frequencies.mean()).to(model.count_head[-1].bias)


def grow_spi(model, old) -> None:
    """`models.grow.grow_into` for an SPI net: the trunk's features are [channel means, channel maxima], so
    the old maxima move up by the number of channels gained."""
    n_old, n_new = old.trunk.n_features // 2, model.trunk.n_features // 2
    columns = torch.cat([torch.arange(n_old), n_new + torch.arange(n_old)])
    grow_into(model, old, {f"{layer}.weight": columns for layer in model.FEATURE_READERS})


class SpiTwinNet(nn.Module):
    """Twin (Siamese) embedding network: a pattern -> unit vector of size `embedding_size`."""

    FEATURE_READERS = ("project.0",)

    def __init__(self, embedding_size=32, width=8, in_channels=2, patterson=True):
        super().__init__()
        self.trunk = SpiTrunk(width, in_channels, patterson)
        self.project = nn.Sequential(
            nn.Linear(self.trunk.n_features, 128), nn.ReLU(inplace=True), nn.Linear(128, embedding_size)
        )

    def forward(self, x):
        return nn.functional.normalize(self.project(self.trunk(x)), dim=1)

    def embed(self, x, views=1):
        """The embedding; with views > 1, the mean over that many of the grid's square symmetries
        (models.views), renormalised. A rotation about the beam or a mirror does not change how many
        particles were hit; averaging over all 8 added 0.5-2 points few-shot accuracy on held-back types."""
        return nn.functional.normalize(ViewAveraged(self, views)(x), dim=1)
