"""The figures of one run, drawn the same way by the notebooks, the command line and the tools:
the learning curves, a grid of misclassified images and a preview of the training data.

Every figure is saved before it is shown (`finish_figure`), since showing can leave an empty
canvas behind; a leaf module, so that any module may draw with it.
"""

from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator
import torch
from PIL import Image

from dataset import augment_batch, stratified_indices


def finish_figure(fig, path, show, source=None):
    """Save before showing (show can leave an empty canvas behind), then free the figure.
    `source` (the results file of the run that drew it) is kept in the PNG's text, where
    `figure_source` reads it: a later run can tell its own figures from another's."""
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight",
                    metadata={"Source": str(source)} if source else None)
    if show:
        plt.show()
    plt.close(fig)
    return fig


def integer_epochs(*axes):
    """Whole-epoch ticks on each axis's x axis (matplotlib would put some at 2.5, 7.5, ...)."""
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def figure_source(path):
    """The `source` a figure was saved with, or None (another program's, or unreadable)."""
    try:
        with Image.open(path) as image:
            return image.text.get("Source")
    except (OSError, AttributeError, ValueError):
        return None


def plot_history(history, path=None, title="", show=False, source=None):
    """Loss and accuracy per epoch, train and test; saved to `path` when given."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    epochs = history["epoch"]
    ax_loss.plot(epochs, history["train_loss"], label="train (smoothed targets)")
    ax_loss.plot(epochs, history["test_loss"], label="test")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="Loss")
    ax_acc.plot(epochs, [100 * a for a in history["train_acc"]], label="train (augmented)")
    ax_acc.plot(epochs, [100 * a for a in history["test_acc"]], label="test")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    integer_epochs(ax_loss, ax_acc)
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return finish_figure(fig, path, show, source)


def plot_misclassified(mistakes, classes, path=None, title="", ncols=5, show=False,
                       source=None):
    """A grid of misclassified images with the true and predicted class under each."""
    count = len(mistakes["true"])
    nrows = max(1, -(-count // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.2 * ncols, 2.9 * nrows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < count:
            ax.imshow(mistakes["images"][i].permute(1, 2, 0).numpy())
            ax.set_title(f"true: {classes[int(mistakes['true'][i])]}\n"
                         f"pred: {classes[int(mistakes['pred'][i])]}", fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return finish_figure(fig, path, show, source)


def plot_data_preview(data, path=None, *, pad, flip, per_class=5, seed=0, show=False):
    """A row per class: `per_class` training images as stored, then the same images as the
    training loader augments them (crop from the `pad`-pixel reflect-padded image, flip): pass
    the run's TrainConfig.pad and .flip, so the preview shows what the run trains on.
    Returns the figure and the indices of the images shown (one row per class, in class order)."""
    keep = stratified_indices(data.train_y, per_class, seed)
    rows = [keep[data.train_y[keep] == c] for c in range(len(data.classes))]
    images = data.train_x[torch.cat(rows)].float().div(255)
    augmented = augment_batch(images, torch.Generator().manual_seed(seed), pad, flip)
    fig, axes = plt.subplots(len(rows), 2 * per_class + 1, figsize=(1.1 * (2 * per_class + 1),
                                                                     1.1 * len(rows)))
    for r, cls in enumerate(data.classes):
        for c in range(per_class):
            i = r * per_class + c
            axes[r, c].imshow(images[i].permute(1, 2, 0).numpy())
            axes[r, per_class + 1 + c].imshow(augmented[i].clamp(0, 1).permute(1, 2, 0).numpy())
        axes[r, 0].set_ylabel(cls, rotation=0, ha="right", va="center", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
        ax.spines[:].set_visible(False)
    axes[0, per_class // 2].set_title("training images", fontsize=10)
    axes[0, per_class + 1 + per_class // 2].set_title(
        f"as trained on (crop, pad {pad}{', flip' if flip else ''})", fontsize=10)
    fig.subplots_adjust(wspace=0.05, hspace=0.05)
    finish_figure(fig, path, show)
    return fig, torch.stack(rows)
