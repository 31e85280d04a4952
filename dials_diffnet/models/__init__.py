"""Network definitions only. `build(architecture)` makes a model from a model card's architecture dict."""

from dials_diffnet.models.resnet import CrystalNet

# class name -> constructor; a card's "architecture" dict is {"class": name, **constructor kwargs}
ARCHITECTURES = {"CrystalNet": CrystalNet}


def build(architecture: dict):
    kwargs = dict(architecture)
    name = kwargs.pop("class")
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name](**kwargs)
