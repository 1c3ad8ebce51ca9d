"""The S8 network: one definition, the normalization chosen by name.

Layout (C = 3x3 conv + norm + ReLU, c = 1x1 transition conv, P = 2x2 max-pool):

    C1 C2 c3 P1 C4 C5 c6 P2 C7 C8 C9 GAP C10

Skip connections (identity adds, so they cost no parameters):
  1. C2's output is added to C1's: the first stage is a one-conv residual block at 32x32.
  2. C5's output is added to P1's output (c3, pooled): C4-C5 form a ResNet basic block at 16x16.
  3. C8's output is added to P2's output (c6, pooled): C7-C8 form a ResNet basic block at 8x8.
They sit where a layer's input and output have the same shape, i.e. right after each transition,
so the 1x1 transitions double as the projection that a ResNet would otherwise need, and every
stage gives gradients a short path to the stem. C9 is left plain so the head sees one more
non-linear mixing of the stage-3 features before pooling.
"""

from dataclasses import asdict, dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

# Accepted names -> canonical name. Canonical names are what results files record.
NORM_ALIASES = {
    "batch": "batch", "bn": "batch", "batchnorm": "batch",
    "group": "group", "gn": "group", "groupnorm": "group",
    "layer": "layer", "ln": "layer", "layernorm": "layer",
    # no normalization: a reference point for the learning-rate study only (README), not a
    # fourth variant of the assignment
    "none": "none", "identity": "none",
}


def canonical_norm(name):
    """Map an alias ("bn", "GroupNorm", ...) to "batch", "group", "layer" or "none"; fail with
    the list."""
    key = str(name).strip().lower()
    if key not in NORM_ALIASES:
        raise ValueError(
            f"unknown normalization {name!r}; accepted names: {', '.join(sorted(NORM_ALIASES))}"
        )
    return NORM_ALIASES[key]


def get_norm_layer(name, num_groups=4, group_size=None):
    """Return a constructor `norm(num_channels) -> nn.Module`, as timm's get_norm_layer does.

    "layer" is GroupNorm(1, C): it normalizes each sample over (C, H, W) like
    nn.LayerNorm([C, H, W]) with per-channel affine parameters, but needs no spatial size,
    so the same block works at 32x32, 16x16 and 8x8 and under any input resolution.
    "group" splits the channels into `num_groups` groups, or, with `group_size`, into groups of
    `group_size` channels each (C / group_size groups: more groups in wider layers), the two
    views of the Group Normalization paper's ablation.
    """
    norm = canonical_norm(name)
    if norm == "batch":
        return nn.BatchNorm2d
    if norm == "none":
        return lambda num_channels: nn.Identity()
    if norm == "layer":
        return partial(nn.GroupNorm, 1)
    for what, value in (("num_groups", num_groups), ("group_size", group_size)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{what} must be a positive integer, got {value!r}")

    def group_norm(num_channels):
        if group_size:
            if num_channels % group_size:
                raise ValueError(
                    f"GroupNorm with groups of {group_size} channels cannot normalize "
                    f"{num_channels} channels: choose a group size that divides {num_channels}")
            return nn.GroupNorm(num_channels // group_size, num_channels)
        if num_channels % num_groups:
            raise ValueError(
                f"GroupNorm with {num_groups} groups cannot normalize {num_channels} channels: "
                f"choose num_groups that divides {num_channels}"
            )
        return nn.GroupNorm(num_groups, num_channels)

    return group_norm


ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "celu": nn.CELU}


def get_activation(name):
    """The activation module class for `name` (relu, gelu, silu, celu); fail with the list."""
    key = str(name).strip().lower()
    if key not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; accepted: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[key]


@dataclass
class ModelConfig:
    norm: str = "batch"       # "batch"/"bn", "group"/"gn", "layer"/"ln" (or "none": LR study)
    num_groups: int = 4       # GroupNorm groups; must divide every width below; 2 lost at 5
                              # epochs; 4-channel groups gained at 5, not at 20 (README)
    group_size: int = 0       # if > 0: GroupNorm groups of this many channels, not num_groups
    widths: tuple = (16, 28, 32)  # channels of stage 1 (32x32), stage 2 (16x16), stage 3 (8x8);
                                  # wider early stages within 50k params did not help at 20 epochs
    dropout: float = 0.0      # Dropout2d after each 3x3 block; 0 disables it
    activation: str = "relu"  # after each norm: relu, gelu, silu or celu; GELU/SiLU led at 5
                              # epochs, GELU with lr 0.4 tied at 20
    num_classes: int = 10

    def __post_init__(self):
        self.norm = canonical_norm(self.norm)
        get_activation(self.activation)  # an unknown name fails here, with the list
        self.widths = tuple(int(w) for w in self.widths)
        if len(self.widths) != 3:
            raise ValueError(f"widths needs 3 stage widths, got {self.widths!r}")

    def to_dict(self):
        return asdict(self)


class ConvBlock(nn.Sequential):
    """3x3 conv -> norm -> activation [-> Dropout2d]. The conv has no bias where the norm's
    shift replaces it; without a norm (nn.Identity) it keeps one."""

    def __init__(self, name, c_in, c_out, norm_layer, dropout, activation=nn.ReLU):
        try:
            norm = norm_layer(c_out)
        except ValueError as err:
            raise ValueError(f"layer {name}: {err}") from None
        layers = [
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=isinstance(norm, nn.Identity)),
            norm,
            activation(),
        ]
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout))
        super().__init__(*layers)


class Net(nn.Module):
    def __init__(self, config=None, **overrides):
        super().__init__()
        config = config or ModelConfig(**overrides)
        self.config = config
        w1, w2, w3 = config.widths
        norm = get_norm_layer(config.norm, config.num_groups, config.group_size or None)
        block = partial(ConvBlock, norm_layer=norm, dropout=config.dropout,
                        activation=get_activation(config.activation))

        self.C1 = block("C1", 3, w1)
        self.C2 = block("C2", w1, w1)
        self.c3 = nn.Conv2d(w1, w2, 1, bias=False)
        self.C4 = block("C4", w2, w2)
        self.C5 = block("C5", w2, w2)
        self.c6 = nn.Conv2d(w2, w3, 1, bias=False)
        self.C7 = block("C7", w3, w3)
        self.C8 = block("C8", w3, w3)
        self.C9 = block("C9", w3, w3)
        self.C10 = nn.Conv2d(w3, config.num_classes, 1)

    def forward(self, x):                      # x: (N, 3, 32, 32)
        x = self.C1(x)                         # (N, w1, 32, 32)
        x = x + self.C2(x)                     # skip 1
        x = F.max_pool2d(self.c3(x), 2)        # P1 -> (N, w2, 16, 16)
        x = x + self.C5(self.C4(x))            # skip 2
        x = F.max_pool2d(self.c6(x), 2)        # P2 -> (N, w3, 8, 8)
        x = x + self.C8(self.C7(x))            # skip 3
        x = self.C9(x)
        x = F.adaptive_avg_pool2d(x, 1)        # GAP -> (N, w3, 1, 1)
        return self.C10(x).flatten(1)          # (N, num_classes) logits

    def get_num_params(self, trainable_only=True):
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


def build_model(norm="batch", seed=None, **config_overrides):
    """The one way notebooks, CLI and tests make a model; `seed` makes its init reproducible."""
    if seed is not None:
        torch.manual_seed(seed)
    return Net(ModelConfig(norm=norm, **config_overrides))
