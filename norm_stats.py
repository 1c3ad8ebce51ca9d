"""What the normalization layers see and produce inside a trained network, measured.

Two measurements, both on fixed, class-balanced batches so that runs and variants compare:

- `measure_norm_statistics` (end of a run, test images, evaluation mode): at every normalization
  layer, the mean and standard deviation of its input, of its normalized output (before the
  learned scale and shift) and of its output, along each method's axes: per channel over the
  images and pixels (BatchNorm's sets), per image over channels and pixels (LayerNorm's) and per
  image and group of channels (GroupNorm's, 4 groups). A method's normalized output has mean 0
  and std 1 along its own axes by construction (BatchNorm's only approximately: it uses running
  statistics at test time); along the other methods' axes it need not.
- `probe_layers` (once per epoch, training images, training mode): each normalization layer's
  input scale (its RMS) and the gradient norm of the convolution before it, on a copy of the
  model, so that the run itself is untouched (same weights, buffers, gradients and random state).

Results files keep them under "norm_statistics" and in the history ("activation_rms",
"grad_norm"); S8_Compare.ipynb and lab/report/ draw them with the plots below.
"""

import copy

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dataset import TensorLoader, stratified_indices
from normalizations import batch_norm, group_norm
from plots import finish_figure, integer_epochs

AXES = {  # which elements share one statistic, as dims of N x C x H x W (groups: see _groups)
    "per_channel": "BatchNorm's sets: one channel over every image and pixel",
    "per_image": "LayerNorm's sets: one image over every channel and pixel",
    "per_group": "GroupNorm's sets: one image over a group of channels (4 groups) and pixels",
}
STAT_GROUPS = 4  # the model's GroupNorm count; divides every width of the network
SAMPLES_PER_CLASS = 25  # 250 images a batch: the datasets are sorted by class, so stratify
NORM_TYPES = (nn.BatchNorm2d, nn.GroupNorm)


def norm_layers(model):
    """[(block name, norm module)] in forward order: "C1", "C2", ... for the S8 network."""
    return [(name.rsplit(".", 1)[0] if "." in name else name, m)
            for name, m in model.named_modules() if isinstance(m, NORM_TYPES)]


def fixed_batch(images, labels, mean, std, device, seed=0, per_class=SAMPLES_PER_CLASS):
    """A class-balanced batch of normalized, unaugmented images (and labels), the same every time
    (fewer per class when a small subset has fewer)."""
    per_class = min(per_class, int(torch.bincount(labels).min()))
    keep = stratified_indices(labels, per_class, seed)
    loader = TensorLoader(images[keep], labels[keep], mean, std, len(keep), train=False,
                          device=device, channels_last=False)
    return next(iter(loader))


def _groups(x, num_groups=STAT_GROUPS):
    n, c, h, w = x.shape
    return x.reshape(n, num_groups, c // num_groups, h, w)


def axis_statistics(x):
    """{axes: {"abs_mean", "std_min", "std_median", "std_max"}} of an N x C x H x W tensor: the
    mean |mean| and the range of the (biased) std over the sets each method normalizes."""
    x = x.double()
    sets = {"per_channel": x.transpose(0, 1).reshape(x.shape[1], -1),
            "per_image": x.reshape(x.shape[0], -1),
            "per_group": _groups(x).reshape(x.shape[0] * STAT_GROUPS, -1)}
    out = {}
    for axes, rows in sets.items():
        mean, std = rows.mean(1), rows.std(1, unbiased=False)
        out[axes] = {"abs_mean": mean.abs().mean().item(), "std_min": std.min().item(),
                     "std_median": std.median().item(), "std_max": std.max().item()}
    return out


def normalized(module, x):
    """The module's normalization of x without its affine scale and shift, in evaluation mode."""
    ones = torch.ones(x.shape[1], dtype=x.dtype, device=x.device)
    if isinstance(module, nn.BatchNorm2d):
        return batch_norm(x, ones, 0 * ones, module.running_mean.to(x.dtype),
                          module.running_var.to(x.dtype), training=False, eps=module.eps)
    return group_norm(x, module.num_groups, ones, 0 * ones, eps=module.eps)


@torch.no_grad()
def measure_norm_statistics(model, data, device):
    """Statistics at every normalization layer of `model` (evaluation mode, fp32) on a fixed
    class-balanced batch of test images: {"layers", "images", "input", "normalized", "output"},
    the last three a list (one per layer) of axis_statistics."""
    model = copy.deepcopy(model).to(device).float().eval()
    x, _ = fixed_batch(data.test_x, data.test_y, data.mean, data.std, device)
    layers = norm_layers(model)
    seen = {}
    hooks = [m.register_forward_hook(lambda m, inp, out, name=name:
                                     seen.__setitem__(name, (inp[0].float(), out.float())))
             for name, m in layers]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    summary = {"layers": [name for name, _ in layers], "images": len(x),
               "input": [], "normalized": [], "output": []}
    for name, m in layers:
        inp, out = seen[name]
        summary["input"].append(axis_statistics(inp))
        summary["normalized"].append(axis_statistics(normalized(m, inp)))
        summary["output"].append(axis_statistics(out))
    return summary


def probe_layers(model, batch):
    """{"activation_rms": [per layer], "grad_norm": [per layer]}: the RMS of each normalization
    layer's input and the gradient norm of the convolution that feeds it, from one fp32
    forward/backward pass in training mode on `batch` (images, labels).

    Runs on a copy: BatchNorm's running statistics, the gradients and the random state of the
    model being trained stay as they were, so a run with the probe equals one without it."""
    probe = copy.deepcopy(model).float().train()
    for p in probe.parameters():
        p.requires_grad_(True)  # a frozen layer (not trained) still has a gradient to report
    for m in probe.modules():
        if isinstance(m, nn.Dropout2d | nn.Dropout):
            m.eval()  # no random draws
    x, y = batch
    rms, convs = {}, {}
    hooks = []
    for name, norm in norm_layers(probe):
        hooks.append(norm.register_forward_hook(
            lambda m, inp, out, name=name: rms.__setitem__(name, inp[0].float().pow(2).mean()
                                                           .sqrt().item())))
        block = probe.get_submodule(name)
        # the conv nearest the norm feeds it (of a separable block, the 1x1 after the depthwise)
        convs[name] = [c for c in block.modules() if isinstance(c, nn.Conv2d)][-1]
    try:
        F.cross_entropy(probe(x), y).backward()
    finally:
        for h in hooks:
            h.remove()
    return {"activation_rms": [rms[name] for name in convs],
            "grad_norm": [conv.weight.grad.norm().item() for conv in convs.values()]}


# ---------------------------------------------------------------------------------- figures

def plot_norm_statistics(summaries, path=None, show=False):
    """Per variant (columns): the std of each layer's input (top) and normalized output
    (bottom) along each method's axes, median with the min-max band, against depth.
    `summaries`: {variant: measure_norm_statistics(...)}. Returns the figure."""
    variants = list(summaries)
    fig, axes = plt.subplots(2, len(variants), figsize=(4.6 * len(variants), 7), squeeze=False,
                             sharey="row")
    colors = {"per_channel": "C0", "per_image": "C1", "per_group": "C2"}
    for col, variant in enumerate(variants):
        s = summaries[variant]
        depth = np.arange(1, len(s["layers"]) + 1)
        for row, kind in enumerate(("input", "normalized")):
            ax = axes[row, col]
            for axis_name, color in colors.items():
                stats = [layer[axis_name] for layer in s[kind]]
                ax.fill_between(depth, [t["std_min"] for t in stats],
                                [t["std_max"] for t in stats], color=color, alpha=0.15)
                ax.plot(depth, [t["std_median"] for t in stats], "o-", color=color, ms=3,
                        label=axis_name.replace("_", " "))
            ax.set_xticks(depth, s["layers"])
            ax.set_yscale("log")
            ax.grid(alpha=0.3, which="both")
            ax.set_title(f"{variant}: {'input' if kind == 'input' else 'normalized output'}")
            if col == 0:
                ax.set_ylabel("std over each set (median, min-max)")
        axes[0, col].axhline(1, color="k", lw=0.6)
        axes[1, col].axhline(1, color="k", lw=0.6)
    axes[0, 0].legend(title="sets of", fontsize=8)
    fig.suptitle("How normalized each layer is, along each method's axes\n(fixed batch of test "
                 "images, evaluation mode)")
    fig.tight_layout()
    return finish_figure(fig, path, show)


def plot_layer_probe(histories, layers, path=None, show=False):
    """Per variant (columns): each layer's input RMS (top) and its convolution's gradient norm
    (bottom) per epoch, one line per layer coloured by depth. `histories`: {variant: history}
    holding "activation_rms" and "grad_norm"; epochs without a probe (None) are skipped."""
    variants = list(histories)
    fig, axes = plt.subplots(2, len(variants), figsize=(4.6 * len(variants), 6.5), squeeze=False,
                             sharey="row")
    cmap = plt.get_cmap("viridis")
    for col, variant in enumerate(variants):
        h = histories[variant]
        kept = [i for i, v in enumerate(h["activation_rms"]) if v is not None]
        epochs = [h["epoch"][i] for i in kept]
        for row, key in enumerate(("activation_rms", "grad_norm")):
            ax = axes[row, col]
            for j, name in enumerate(layers):
                ax.plot(epochs, [h[key][i][j] for i in kept], ".-", color=cmap(j / max(1, len(layers) - 1)),
                        label=name)
            ax.set_yscale("log")
            ax.grid(alpha=0.3, which="both")
            ax.set_title(f"{variant}: " + ("input RMS of each norm layer" if row == 0
                                           else "gradient norm of its conv"))
            ax.set_xlabel("epoch")
            integer_epochs(ax)
    axes[0, 0].legend(ncol=3, fontsize=7)
    fig.suptitle("Inside training: activation scale and gradient norm per layer\n(fixed batch of "
                 "training images, once per epoch)")
    fig.tight_layout()
    return finish_figure(fig, path, show)


def _range(layers, axes):
    return (min(layer[axes]["std_min"] for layer in layers),
            max(layer[axes]["std_max"] for layer in layers))


def statistics_table(summaries):
    """Markdown: per variant, the range (over every layer and set) of the std of the layers'
    inputs and normalized outputs along each method's axes; 1.00-1.00 means normalized there."""
    head = ["variant", "layers"] + [f"{kind}, {axes.replace('_', ' ')}"
                                    for kind in ("input", "normalized") for axes in AXES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, s in summaries.items():
        cells = [variant, f"{s['layers'][0]}-{s['layers'][-1]} ({len(s['layers'])})"]
        for kind in ("input", "normalized"):
            cells += ["{:.2f}-{:.2f}".format(*_range(s[kind], axes)) for axes in AXES]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
