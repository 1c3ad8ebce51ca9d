"""The registry of normalizations: every place that lists the variants reads it from here.

A variant is a name (what results files record), the aliases the command line accepts, its
labels and colour in tables and figures, the README's targets for it, the one line a notebook
opens with, and the layer it builds. Adding a normalization is adding one `Variant` below: the
model, the command line, the sweeps, the tables, the figures and the notebook generator follow.
"""

from dataclasses import dataclass
from typing import Callable, Optional

import torch.nn as nn


@dataclass(frozen=True)
class Variant:
    name: str                    # canonical name, recorded in results files and run names
    aliases: tuple               # other names accepted wherever a normalization is named
    title: str                   # "BatchNorm": notebook titles (S8_<title>.ipynb) and headings
    short: str                   # "BN": table columns
    colour: str                  # its colour in every figure
    make_layer: Callable         # (num_channels, num_groups, group_size) -> nn.Module
    axes: Optional[str] = None   # which activations share one statistic (normalizations.AXES)
    target: Optional[float] = None  # README target, mean test accuracy over seeds (%); None:
                                    # a reference point of a study, not a variant of the course
    next_target: Optional[float] = None  # the course's next goal (issue 52), the same measure
    description: str = ""        # the notebook's first line about it
    uses_groups: bool = False    # reads ModelConfig.num_groups / group_size
    running_stats: bool = False  # normalizes by batch statistics in training, running ones after

    @property
    def in_course(self):
        """A variant of the assignment (with a notebook and a results row), not a reference."""
        return self.target is not None


def _group_norm(num_channels, num_groups, group_size):
    """`num_groups` groups, or with `group_size` groups of that many channels (more groups in
    wider layers): the two views of the Group Normalization paper's ablation."""
    for what, value in (("num_groups", num_groups), ("group_size", group_size)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{what} must be a positive integer, got {value!r}")
    if group_size:
        if num_channels % group_size:
            raise ValueError(
                f"GroupNorm with groups of {group_size} channels cannot normalize "
                f"{num_channels} channels: choose a group size that divides {num_channels}")
        return nn.GroupNorm(num_channels // group_size, num_channels)
    if num_channels % num_groups:
        raise ValueError(f"GroupNorm with {num_groups} groups cannot normalize {num_channels} "
                         f"channels: choose num_groups that divides {num_channels}")
    return nn.GroupNorm(num_groups, num_channels)


REGISTRY = {v.name: v for v in (
    Variant("batch", ("bn", "batchnorm"), "BatchNorm", "BN", "C0",
            lambda c, groups, size: nn.BatchNorm2d(c), "per_channel", 85.0, 87.0, running_stats=True,
            description="BatchNorm normalizes each channel over the batch and the image, and "
                        "keeps running statistics for evaluation."),
    # GroupNorm(1, C) normalizes each image over (C, H, W) like nn.LayerNorm([C, H, W]) but
    # needs no spatial size, so one block works at 32x32, 16x16 and 8x8
    Variant("layer", ("ln", "layernorm"), "LayerNorm", "LN", "C1",
            lambda c, groups, size: nn.GroupNorm(1, c), "per_image", 83.0, 86.0,
            description="LayerNorm normalizes each image over all its channels and pixels (here "
                        "`GroupNorm(1, C)`, which works at every spatial size); no batch "
                        "statistics."),
    Variant("group", ("gn", "groupnorm"), "GroupNorm", "GN", "C2", _group_norm, "per_group", 83.0, 86.0,
            description="GroupNorm normalizes each image over groups of channels (4 groups "
                        "here) and their pixels; no batch statistics.", uses_groups=True),
    # the learning-rate study's reference: the network without normalization (conv biases back)
    Variant("none", ("identity",), "no normalization", "none", "C3",
            lambda c, groups, size: nn.Identity()),
)}

DEFAULT = next(iter(REGISTRY))  # the variant a run uses when none is named


def norm_aliases():
    """{every accepted name: its variant's canonical name}, read from the registry when asked."""
    return {alias: v.name for v in REGISTRY.values() for alias in (v.name, *v.aliases)}


def course_variants():
    """The assignment's variants (those with a target), in registry order."""
    return tuple(name for name, v in REGISTRY.items() if v.in_course)


def canonical_norm(name):
    """The canonical name of a normalization named by any alias ("bn", "GroupNorm", ...); an
    unknown name fails with the accepted ones."""
    key, aliases = str(name).strip().lower(), norm_aliases()
    if key not in aliases:
        raise ValueError(
            f"unknown normalization {name!r}; accepted names: {', '.join(sorted(aliases))}")
    return aliases[key]


def get_variant(name):
    return REGISTRY[canonical_norm(name)]


def in_order(names):
    """`names` in registry order, any unknown ones after them."""
    order = list(REGISTRY)
    return sorted(names, key=lambda n: order.index(n) if n in order else len(order))
