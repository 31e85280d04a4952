"""Shipped weights: `<name>.safetensors` + `<name>.json` model card, side by side.

The card records the architecture, the representation version, label
definitions, the training recipe and the evaluation figures, and the
SHA-256 of the weight file, checked at every load. Nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import tempfile

import torch
from safetensors.torch import load_file, save_file

from dials_diffnet.models import build
from dials_diffnet.representation import N_CHANNELS, REPRESENTATION_VERSION

SHIPPED_DIR = pathlib.Path(__file__).resolve().parent
MAX_FILE_BYTES = 16 * 1024 * 1024


class WeightError(Exception):
    """A weight file or model card that is missing, tampered with or incompatible."""


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def card_path(weights_path) -> pathlib.Path:
    return pathlib.Path(weights_path).with_suffix(".json")


def save_model(model: torch.nn.Module, card: dict, weights_path) -> dict:
    """Write weights and card atomically; the card gains the file's checksum and size."""
    weights_path = pathlib.Path(weights_path)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = weights_path.with_name(weights_path.name + ".tmp")
    save_file(state, str(tmp))
    os.chmod(tmp, 0o644)
    if tmp.stat().st_size > MAX_FILE_BYTES:
        tmp.unlink()
        raise WeightError(f"{weights_path.name} would exceed {MAX_FILE_BYTES} bytes")
    card = dict(card, sha256=sha256(tmp), bytes=tmp.stat().st_size)
    card.setdefault("representation_version", REPRESENTATION_VERSION)
    _atomic_write_text(card_path(weights_path), json.dumps(card, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, weights_path)
    return card


def load_model(weights_path, device="cpu"):
    """(model in eval mode, card) from a weight file; WeightError if anything does not check out."""
    weights_path = pathlib.Path(weights_path)
    cpath = card_path(weights_path)
    if not weights_path.is_file() or not cpath.is_file():
        raise WeightError(f"model {weights_path} or its card {cpath.name} is missing")
    try:
        card = json.loads(cpath.read_text())
    except json.JSONDecodeError as e:
        raise WeightError(f"model card {cpath} is not valid JSON: {e}") from None
    if sha256(weights_path) != card.get("sha256"):
        raise WeightError(f"checksum of {weights_path} does not match its model card: file corrupted or tampered with")
    if card.get("representation_version") != REPRESENTATION_VERSION:
        raise WeightError(
            f"{weights_path.name} was trained on representation version {card.get('representation_version')}, "
            f"this code makes version {REPRESENTATION_VERSION}"
        )
    model = build(card["architecture"])
    try:
        model.load_state_dict(load_file(str(weights_path)))
    except Exception as e:
        raise WeightError(f"{weights_path} does not fit architecture {card['architecture']}: {e}") from None
    return model.to(device).eval(), card


def attach_evaluation(weights_path, name: str, command: str, metrics: dict) -> dict:
    """Record an evaluation (the command that made it and its figures) in a model's card.

    The weights are untouched, so the card's checksum stays valid.
    """
    cpath = card_path(weights_path)
    card = json.loads(cpath.read_text())
    card.setdefault("evaluation", {})[name] = {"command": command, "metrics": metrics}
    _atomic_write_text(cpath, json.dumps(card, indent=2, sort_keys=True) + "\n")
    return card


def card_planes(card: dict) -> int:
    """Representation planes a model reads (`representation.represent(..., planes)`): its input channels."""
    return card["architecture"].get("in_channels", N_CHANNELS)


def shipped_path(name: str) -> pathlib.Path:
    return SHIPPED_DIR / f"{name}.safetensors"


def _atomic_write_text(path, text):
    path = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; cards are shipped files
    os.replace(tmp, path)
