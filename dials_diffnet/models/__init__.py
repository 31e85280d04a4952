"""Network definitions only. `build(architecture)` makes a model from a model card's architecture dict;
`grow.grow_into(model, old)` starts a wider model from a trained narrower one."""

from dials_diffnet.models.resnet import CrystalNet
from dials_diffnet.models.spi import SpiMultiNet, SpiTwinNet

# class name -> constructor; a card's "architecture" dict is {"class": name, **constructor kwargs}
ARCHITECTURES = {"CrystalNet": CrystalNet}
ARCHITECTURES.update(SpiMultiNet=SpiMultiNet, SpiTwinNet=SpiTwinNet)


def build(architecture: dict):
    kwargs = dict(architecture)
    name = kwargs.pop("class")
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name](**kwargs)
