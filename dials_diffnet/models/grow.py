"""Starting a wider network from a trained narrower one."""

import torch


def grow_into(model: torch.nn.Module, old: torch.nn.Module, input_columns: dict | None = None) -> None:
    """Copy a trained `old` into `model` (in place), which may be wider or read more input planes.

    Every tensor of `old` must fit in the leading part of the same-named tensor of `model`. The old
    channels keep their weights; what is new gets fresh weights for its own outputs and zero weight
    into the old outputs, so `model` starts with exactly `old`'s predictions and training only has to
    learn what the extra capacity adds. `input_columns` maps a weight's name to the new input indices of
    its old inputs, for layers whose inputs are not simply the leading ones (concatenated poolings).
    """
    state, input_columns = model.state_dict(), input_columns or {}
    with torch.no_grad():
        for name, value in old.state_dict().items():
            target = state.get(name)
            if target is None:
                raise ValueError(f"{name} has no place in {type(model).__name__}")
            if target.dim() != value.dim() or target.shape[2:] != value.shape[2:] \
                    or any(t < v for t, v in zip(target.shape, value.shape)):
                raise ValueError(f"{name} is {tuple(value.shape)}, the new model's is {tuple(target.shape)}: "
                                 "depth must match and width may only grow")
            if value.dim() == 0:  # batch-norm counters
                target.copy_(value)
            elif value.dim() == 1:  # biases, batch-norm parameters and statistics
                target[: len(value)] = value
            else:
                rows = target[: value.shape[0]]
                rows.zero_()  # old outputs must not read new inputs
                rows[:, input_columns.get(name, torch.arange(value.shape[1]))] = value
