"""dials-diffnet: deep-learning judgement of diffraction images inside DIALS."""

__version__ = "0.1.0"
