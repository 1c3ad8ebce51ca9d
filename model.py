"""The S8 network: one definition, the normalization chosen by name.

    C1 C2 c3 P1 C4 C5 c6 P2 C7 C8 C9 GAP C10

C = 3x3 conv -> norm -> activation, c = 1x1 transition conv, P = 2x2 max-pool, GAP = global
average pool, C10 = the 1x1 head. Three identity adds (no parameters) make C2, C4-C5 and C7-C8
residual branches; they sit right after each transition, where a branch's input and output
have the same shape. C9 stays plain: one more mixing of the 8x8 features before the pool.

The 3x3 blocks after C1 are separable by default: a depthwise 3x3 conv (one filter per
channel) then a 1x1 conv (MobileNet), about 9c + c^2 weights instead of 9c^2, so 50,000
parameters buy stages of 32, 64 and 88 channels instead of 16, 28 and 32. C1 stays a full conv:
a depthwise filter on an RGB image would see each colour alone. docs/learning-per-epoch.md
measures both; the lab's variants of the network (lab/levers.py) subclass Net.
"""

import copy
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchsummary import summary

from variants import DEFAULT, canonical_norm, get_variant

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "celu": nn.CELU}
CONVS = ("full", "separable")


@dataclass
class ModelConfig:
    norm: str = DEFAULT           # normalization, by any name of variants.py
    num_groups: int = 4           # GroupNorm only: groups a layer; must divide every stage width
    widths: tuple = (32, 64, 88)  # channels at 32x32, 16x16 and 8x8
    conv: str = "separable"       # the 3x3 blocks after C1: separable (depthwise + 1x1) or full
    activation: str = "silu"      # after each norm: relu, gelu, silu or celu
    num_classes: int = 10         # logits

    def __post_init__(self):
        self.norm = canonical_norm(self.norm)
        get_activation(self.activation)  # an unknown name fails here, with the list
        self.widths = tuple(int(w) for w in self.widths)
        if len(self.widths) != 3 or min(self.widths) < 1:
            raise ValueError(f"widths needs 3 positive stage widths, got {self.widths!r}")
        check_range(self, num_groups=(1, None), num_classes=(2, None))
        check_choice(self, conv=CONVS)

    def to_dict(self):
        return asdict(self)


class Net(nn.Module):
    def __init__(self, config=None, **overrides):
        super().__init__()
        self.config = config = config or ModelConfig(**overrides)
        w1, w2, w3 = config.widths
        self.C1 = self.block("C1", 3, w1)
        self.C2 = self.block("C2", w1, w1)
        self.c3 = nn.Conv2d(w1, w2, 1, bias=False)
        self.C4 = self.block("C4", w2, w2)
        self.C5 = self.block("C5", w2, w2)
        self.c6 = nn.Conv2d(w2, w3, 1, bias=False)
        self.C7 = self.block("C7", w3, w3)
        self.C8 = self.block("C8", w3, w3)
        self.C9 = self.block("C9", w3, w3)
        self.C10 = nn.Conv2d(w3, config.num_classes, 1)

    def forward(self, x):                      # x: (N, 3, 32, 32)
        x = self.C1(x)                         # (N, w1, 32, 32)
        x = self.C2(x) + x                     # skip: C2 is a residual branch
        x = F.max_pool2d(self.c3(x), 2)        # P1 -> (N, w2, 16, 16)
        x = self.C5(self.C4(x)) + x            # skip: C4-C5, a ResNet basic block
        x = F.max_pool2d(self.c6(x), 2)        # P2 -> (N, w3, 8, 8)
        x = self.C8(self.C7(x)) + x            # skip: C7-C8
        x = self.C9(x)
        x = F.adaptive_avg_pool2d(x, 1)        # GAP -> (N, w3, 1, 1)
        return self.C10(x).flatten(1)          # (N, num_classes) logits

    def block(self, name, c_in, c_out):
        """The block called `name`: 3x3 conv -> norm -> activation. The conv has no bias where
        the norm's shift replaces it; without a norm (nn.Identity) it keeps one."""
        try:
            norm = self.norm_layer(c_out)
        except ValueError as err:
            raise ValueError(f"layer {name}: {err}") from None
        conv = self.conv3x3(name, c_in, c_out, bias=isinstance(norm, nn.Identity))
        return ConvBlock(conv, norm, get_activation(self.config.activation)())

    def norm_layer(self, num_channels):
        return get_norm_layer(self.config.norm, self.config.num_groups)(num_channels)

    def conv3x3(self, name, c_in, c_out, bias):
        """C1 is always a full conv; the square blocks after it are `config.conv`."""
        if name == "C1" or self.config.conv == "full":
            return nn.Conv2d(c_in, c_out, 3, padding=1, bias=bias)
        return SeparableConv2d(c_in, c_out, bias=bias)

    def get_num_params(self, trainable_only=True):
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


class ConvBlock(nn.Sequential):
    """conv -> norm -> activation, as block[0], block[1], block[2]."""

    def __init__(self, conv, norm, activation):
        super().__init__(conv, norm, activation)


class SeparableConv2d(nn.Sequential):
    """A depthwise 3x3 conv (one filter per input channel) then a pointwise 1x1 conv: a 3x3
    conv factorized into its spatial and its channel-mixing part (MobileNet)."""

    def __init__(self, c_in, c_out, bias=False):
        super().__init__(nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in, bias=False),
                         nn.Conv2d(c_in, c_out, 1, bias=bias))


def get_norm_layer(name, num_groups=4, group_size=None):
    """Return a constructor `norm(num_channels) -> nn.Module`, as timm's get_norm_layer does:
    the variant named (any alias, variants.py) with this network's group settings bound."""
    variant = get_variant(name)
    return lambda num_channels: variant.make_layer(num_channels, num_groups, group_size)


def get_activation(name):
    """The activation module class for `name` (relu, gelu, silu, celu); fail with the list."""
    key = str(name).strip().lower()
    if key not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; accepted: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[key]


def check_range(config, **bounds):
    """One line per setting out of its range, before anything loads: {field: (low, high[, how])}
    with None for no bound, how "open" (low excluded) or "half" (high excluded)."""
    for field, (low, high, *how) in bounds.items():
        value = getattr(config, field)
        open_low, open_high = how == ["open"], how == ["half"]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value \
            and (low is None or (value > low if open_low else value >= low)) \
            and (high is None or (value < high if open_high else value <= high))
        if not ok:
            where = " and ".join(filter(None, [
                low is not None and f"{'above' if open_low else 'at least'} {low}",
                high is not None and f"{'below' if open_high else 'at most'} {high}"]))
            raise ValueError(f"{field} must be {where}, got {value!r}")


def check_choice(config, **choices):
    """One line per setting that is none of its accepted names: {field: names}."""
    for field, accepted in choices.items():
        if getattr(config, field) not in accepted:
            raise ValueError(f"{field} must be one of {', '.join(accepted)}, got "
                             f"{getattr(config, field)!r}")


def build_model(norm=ModelConfig.norm, seed=None, net=Net, **config_overrides):
    """The one way notebooks, CLI and tests make a model; `seed` makes its init reproducible;
    `net`: Net or a subclass (the lab's LabNet), which makes its configuration."""
    if seed is not None:
        torch.manual_seed(seed)
    return net(norm=norm, **config_overrides)


def show_summary(model, input_size=(3, 32, 32)):
    """torchsummary's table, computed on a CPU copy in eval mode.

    torchsummary runs a forward pass in whatever mode the model is in (train mode would update
    BatchNorm's running statistics) and only accepts "cpu"/"cuda"; a CPU eval copy leaves the
    real model untouched wherever it lives (cuda, mps, cpu).
    """
    probe = copy.deepcopy(model).to("cpu").eval()
    rng = torch.get_rng_state()  # summary draws its input from the global RNG; keep runs comparable
    summary(probe, input_size, device="cpu")
    torch.set_rng_state(rng)
