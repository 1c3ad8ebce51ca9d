"""What each normalization computes, written out for reading (the model keeps PyTorch's modules).

Every method below does the same three things to an activation tensor x of shape N x C x H x W:
subtract a mean, divide by a standard deviation (sqrt(variance + eps)), then apply a learned
per-channel scale (weight) and shift (bias). They differ only in which elements share one mean
and one variance:

    BatchNorm     one channel, across every image of the batch and every pixel   -> (N, H, W)
    LayerNorm     one image, across every channel and every pixel                -> (C, H, W)
    GroupNorm     one image, across one group of C/G channels and every pixel    -> (C/G, H, W)
    InstanceNorm  one image, one channel, across its pixels                      -> (H, W)

So BatchNorm's output depends on the other images of the batch (and at test time it uses
running averages collected in training instead), while the other three normalize each image by
itself, identically in training and at test time. tests/test_normalizations.py checks each
function against PyTorch's module: outputs, gradients and BatchNorm's running statistics.
"""

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn

from plots import finish_figure
from variants import REGISTRY, course_variants

EPS = 1e-5  # PyTorch's default for all four modules


def _per_channel(v):
    """A per-channel vector (C,) shaped to broadcast over N x C x H x W."""
    return v.reshape(1, -1, 1, 1)


def _normalize(x, mean, var, eps):
    return (x - mean) / torch.sqrt(var + eps)


def batch_norm(x, weight, bias, running_mean, running_var, training, momentum=0.1, eps=EPS):
    """nn.BatchNorm2d. Training: each channel's mean and variance over (N, H, W) of this batch,
    and the running statistics updated in place for evaluation; evaluation: those running
    statistics, so the output no longer depends on the rest of the batch."""
    if training:
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3), unbiased=False)  # the batch is normalized with the biased one
        n = x.numel() // x.shape[1]  # elements per channel
        with torch.no_grad():  # the running statistics are bookkeeping, not part of the graph
            # an exponential moving average; the variance it stores is the unbiased estimate
            running_mean.mul_(1 - momentum).add_(momentum * mean)
            running_var.mul_(1 - momentum).add_(momentum * var * n / (n - 1))
    else:
        mean, var = running_mean, running_var
    x_hat = _normalize(x, _per_channel(mean), _per_channel(var), eps)
    return x_hat * _per_channel(weight) + _per_channel(bias)


def layer_norm(x, weight, bias, eps=EPS):
    """Each image over all its channels and pixels. `weight`/`bias` of shape (C,) give
    nn.GroupNorm(1, C), the model's LayerNorm; of shape (C, H, W) they give nn.LayerNorm([C, H, W])
    (an affine parameter per element, tied to one input size)."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)  # N x 1 x 1 x 1
    var = x.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
    x_hat = _normalize(x, mean, var, eps)
    if weight.dim() == 1:
        weight, bias = _per_channel(weight), _per_channel(bias)
    return x_hat * weight + bias


def group_norm(x, num_groups, weight, bias, eps=EPS):
    """nn.GroupNorm: each image over each group of C / num_groups consecutive channels and their
    pixels. num_groups = 1 is LayerNorm (with per-channel affine), num_groups = C InstanceNorm."""
    n, c, h, w = x.shape
    if c % num_groups:
        raise ValueError(f"num_groups={num_groups} does not divide the {c} channels; "
                         f"choose a divisor of {c}")
    groups = x.reshape(n, num_groups, c // num_groups, h, w)
    mean = groups.mean(dim=(2, 3, 4), keepdim=True)  # N x G x 1 x 1 x 1
    var = groups.var(dim=(2, 3, 4), unbiased=False, keepdim=True)
    x_hat = _normalize(groups, mean, var, eps).reshape(n, c, h, w)
    return x_hat * _per_channel(weight) + _per_channel(bias)


def instance_norm(x, weight, bias, eps=EPS):
    """nn.InstanceNorm2d(affine=True): each image and channel over its pixels alone."""
    return group_norm(x, x.shape[1], weight, bias, eps)


# Which elements share one mean and variance, by the name of that set (Variant.axes)
AXES = ("per_channel", "per_image", "per_group", "per_image_channel")
# {title: its sets}: the course's variants, then InstanceNorm for reference
METHODS = {**{REGISTRY[v].title: REGISTRY[v].axes for v in course_variants()},
           "InstanceNorm": "per_image_channel"}


def shared_statistics_mask(axes, shape, anchor=(0, 0, 0), num_groups=4):
    """Which elements of an N x C x (H*W) tensor share one mean and variance with `anchor`
    (an (image, channel, pixel) index) under a method whose sets are `axes` (one of AXES): a
    boolean array of `shape`, as the Group Normalization paper's Figure 2 shades it."""
    n, c, _ = shape
    image, channel, _ = anchor
    images = np.arange(n)[:, None, None]
    channels = np.arange(c)[None, :, None]
    same_image = images == image
    same_channel = channels == channel
    if axes == "per_channel":
        mask = same_channel
    elif axes == "per_image":
        mask = same_image
    elif axes == "per_group":
        if c % num_groups:
            raise ValueError(f"num_groups={num_groups} does not divide the {c} channels")
        per_group = c // num_groups
        mask = same_image & (channels // per_group == channel // per_group)
    elif axes == "per_image_channel":
        mask = same_image & same_channel
    else:
        raise ValueError(f"unknown axes {axes!r}; choose from {', '.join(AXES)}")
    return np.broadcast_to(mask, shape).copy()


def plot_norm_axes(path=None, num_groups=4, shape=(6, 8, 5), show=False):
    """The activation tensor drawn as an N x C x (H*W) block per method, the elements that share
    one mean and variance shaded (after Wu & He, 2018, Figure 2). Returns the figure and the
    masks it drew, {method: boolean array}, so that tests can check what is shaded."""
    masks = {title: shared_statistics_mask(axes, shape, num_groups=num_groups)
             for title, axes in METHODS.items()}
    fig = plt.figure(figsize=(13, 3.6))
    for i, method in enumerate(METHODS):
        ax = fig.add_subplot(1, len(METHODS), i + 1, projection="3d")
        # voxel axes: x = channels, y = pixels (H*W), z = images (batch), as in the paper
        filled = np.ones((shape[1], shape[2], shape[0]), dtype=bool)
        shaded = masks[method].transpose(1, 2, 0)
        colors = np.where(shaded[..., None], np.array([0.18, 0.42, 0.80, 0.95]),
                          np.array([0.85, 0.85, 0.85, 0.25]))
        ax.voxels(filled, facecolors=colors, edgecolor=(0.3, 0.3, 0.3, 0.3), linewidth=0.3)
        ax.set_title(f"{method} ({num_groups} groups)" if METHODS[method] == "per_group"
                     else method, fontsize=11)
        ax.set_xlabel("C", labelpad=-12)
        ax.set_ylabel("H, W", labelpad=-12)
        ax.set_zlabel("N", labelpad=-12)
        ax.set_xticks([]), ax.set_yticks([]), ax.set_zticks([])
        ax.set_box_aspect(shape[1:] + shape[:1])
        ax.view_init(elev=22, azim=-58)
    fig.suptitle("Which activations share one mean and variance (shaded), for one of them",
                 fontsize=12)
    finish_figure(fig, path, show)
    return fig, masks


def check_against_torch(seed=0, shape=(8, 12, 5, 5), num_groups=4):
    """{check: max |from scratch - PyTorch|} over one random batch in float64, for the notebook
    to print: each function above against the module the model uses."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * 3 + 1
    c = shape[1]
    weight = torch.randn(c, generator=g, dtype=torch.float64)
    bias = torch.randn(c, generator=g, dtype=torch.float64)

    def with_affine(module):
        module = module.double()
        with torch.no_grad():
            module.weight.copy_(weight), module.bias.copy_(bias)
        return module

    bn = with_affine(nn.BatchNorm2d(c)).train()
    mean, var = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    checks = {"BatchNorm, training": (batch_norm(x, weight, bias, mean, var, True), bn(x))}
    checks["BatchNorm, running statistics"] = (torch.cat([mean, var]),
                                               torch.cat([bn.running_mean, bn.running_var]))
    checks["BatchNorm, evaluation"] = (batch_norm(x, weight, bias, mean, var, False),
                                       bn.eval()(x))
    checks["LayerNorm = GroupNorm(1, C)"] = (layer_norm(x, weight, bias),
                                             with_affine(nn.GroupNorm(1, c))(x))
    checks[f"GroupNorm ({num_groups} groups)"] = (
        group_norm(x, num_groups, weight, bias), with_affine(nn.GroupNorm(num_groups, c))(x))
    checks["InstanceNorm"] = (instance_norm(x, weight, bias),
                              with_affine(nn.InstanceNorm2d(c, affine=True))(x))
    return {name: (ours - theirs).abs().max().item() for name, (ours, theirs) in checks.items()}
