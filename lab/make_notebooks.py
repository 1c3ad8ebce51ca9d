"""Write the S8 notebooks from templates (outputs empty; run them to fill them).

    python -m lab.make_notebooks                      # the four notebooks, unless executed
    python -m lab.make_notebooks S8_Compare.ipynb     # one of them
    python -m lab.make_notebooks --force ...          # also overwrite executed notebooks
    python -m lab.make_notebooks --clean S8_BatchNorm.ipynb   # tidy an executed notebook
    python -m lab.make_notebooks --sources            # new cell sources, outputs kept

The training notebooks only configure and call into dataset.py, model.py and utils.py, so they
differ in their title and NORM alone; generating them keeps the three in step. S8_Compare.ipynb
reads the committed results files through lab/compare.py and trains nothing.
"""

import argparse
import re
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from model import ModelConfig
from utils import TrainConfig
from variants import REGISTRY, course_variants

ROOT = Path(__file__).resolve().parents[1]

# Where the repository is published; the Colab badge and setup cell use it. Until it is set,
# the Colab setup cell stops at once and says what to do (docs/publishing.md).
REPO = "YOUR-GITHUB-USER/s8-normalization"
PLACEHOLDER_OWNER = "YOUR-GITHUB-USER"


def colab_setup_cell(entry_module, extra_install=""):
    """Clone the repository in Colab (locally: nothing), refusing the placeholder URL up front
    rather than dying later at the first import with ModuleNotFoundError."""
    return new_code_cell(
        "# Setup. In Colab: fetch the repository" + (" and the one package Colab lacks" if
                                                     extra_install else "") + ". Locally: nothing.\n"
        "import os, sys\n"
        f"REPO = \"{REPO}\"  # set in lab/make_notebooks.py, then regenerate the notebooks\n"
        f"if \"google.colab\" in sys.modules and not os.path.exists(\"{entry_module}\"):\n"
        f"    if REPO.startswith(\"{PLACEHOLDER_OWNER}/\"):\n"
        "        raise RuntimeError(\n"
        "            f\"REPO is still the placeholder {REPO!r}, so there is nothing to clone. Set REPO \"\n"
        "            \"in lab/make_notebooks.py to the GitHub repository you published, regenerate \"\n"
        "            \"the notebooks (docs/publishing.md), or set REPO in this cell to it.\")\n"
        "    !git clone -q https://github.com/{REPO}.git\n"
        "    %cd {REPO.split('/')[1]}"
        + (f"\n    !pip install -q {extra_install}" if extra_install else ""))


EXERCISES = (
    "## Exercises\n\n"
    "Each is one edit of the configuration cell; Run all, then compare with the run above.\n\n"
    "1. **BatchNorm at batch size 4.** Set `BATCH_SIZE = 4` here and in `S8_GroupNorm.ipynb` "
    "(the learning rate follows the batch size). Expect BatchNorm to fall behind GroupNorm: its "
    "statistics over 4 images are noisy, and at test time it uses running averages that no "
    "longer match them, while GroupNorm computes its statistics per image. The batch-size study "
    "(`docs/batch-size.md`) measured this on a shorter budget. Batch 4 takes 32 times as many "
    "steps: on a CPU, lower `EPOCHS` as well.\n"
    "2. **GroupNorm with one group.** In `S8_GroupNorm.ipynb` set `NUM_GROUPS = 1`: one group "
    "holds all the channels, so each image is normalized over all its channels and pixels, which "
    "is LayerNorm. Expect the summary to show the same layers and parameter count as "
    "`S8_LayerNorm.ipynb`'s, and on the same machine the same accuracy to the last digit (this "
    "repository builds LayerNorm as `GroupNorm(1, C)`).\n"
    "3. **No normalization.** Set `NORM = \"none\"`. Expect the summary to show a convolution "
    "with a bias and SiLU in each block, and fewer parameters (a bias per channel instead of a "
    "scale and a shift). Then raise `LR`: the learning-rate study (`docs/learning-rate.md`) "
    "found the network without normalization the first to diverge, its loss turning into NaN, "
    "which stops the run with an error that names the epoch.")


def configuration_cell(norm):
    """What a student changes, and one call for the plumbing (smoke and publish runs)."""
    choices = ", ".join(f'"{v}"' for v in course_variants())
    groups = (f"NUM_GROUPS = {ModelConfig.num_groups}          # groups of channels per layer; "
              f"must divide {', '.join(map(str, ModelConfig.widths))}\n"
              if REGISTRY[norm].uses_groups else "")
    return new_code_cell(
        "# Configuration: the settings to change, then Run all\n"
        f"NORM = \"{norm}\"            # {choices}\n"
        f"{groups}"
        "SEED = 0                  # initial weights, data order and augmentation\n"
        "EPOCHS = 20               # at most 20 in this course\n"
        f"BATCH_SIZE = {TrainConfig.batch_size}          # images per training step\n"
        f"LR = {TrainConfig.lr} * BATCH_SIZE / {TrainConfig.batch_size}  # SGD's peak learning rate, "
        "scaled with the batch\n"
        "PRECISION = \"auto\"        # bf16 where native, fp16 on a T4 GPU, else fp32\n"
        "RESUME = True             # continue from the last checkpoint after a disconnect\n\n"
        "from results import notebook_run\n"
        "setup = notebook_run(NORM, EPOCHS)  # S8_SMOKE=1: 1 epoch on a subset (CI); "
        "S8_PUBLISH=1: results/")


def notebook(norm):
    title = REGISTRY[norm].title
    name = f"S8_{title}.ipynb"
    model_args = "NORM, seed=SEED, num_groups=NUM_GROUPS" if REGISTRY[norm].uses_groups else \
        "NORM, seed=SEED"
    cells = [
        new_markdown_cell(
            f"# S8 · {title} on CIFAR-10\n\n"
            f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
            f"(https://colab.research.google.com/github/{REPO}/blob/main/{name})\n\n"
            f"{REGISTRY[norm].description} The network (`C1 C2 c3 P1 C4 C5 c6 P2 C7 C8 C9 GAP C10` "
            f"with three skip adds, under 50,000 parameters) and its training are the same in "
            f"all three notebooks; the README has the results of every variant over several "
            f"seeds.\n\n"
            f"Change the configuration cell, then Run all: a run of yours writes its results file "
            f"and figures into `runs/`, under a name that carries every setting you changed. The "
            f"outputs below are a real 20-epoch run (seed 0)."),
        colab_setup_cell("model.py", extra_install="torchsummary"),
        configuration_cell(norm),
        new_code_cell(
            "from dataset import load_cifar10\n"
            "from model import build_model, show_summary\n"
            "from normalizations import plot_norm_axes\n"
            "from norm_stats import plot_layer_probe, plot_norm_statistics\n"
            "from plots import plot_data_preview, plot_history, plot_misclassified\n"
            "from precision import get_device\n"
            "from results import (check_publishable, collect_misclassified, config_run_name,\n"
            "                     make_results, save_json_atomic)\n"
            "from utils import TrainConfig, fit, make_loaders\n\n"
            "data = load_cifar10(setup.data)\n"
            "if setup.subset:\n"
            "    data = data.subset(setup.subset, setup.subset, seed=SEED)\n"
            "device = get_device()\n"
            "print(\"device:\", device)"),
        new_markdown_cell(
            "## What the normalization computes\n\n"
            "Every normalization subtracts a mean and divides by a standard deviation, then "
            "applies a learned per-channel scale and shift; the methods differ only in which "
            "activations share one mean and variance (shaded below, for one activation). "
            "`normalizations.py` writes each one out in a few lines, checked against PyTorch."),
        new_code_cell("plot_norm_axes(show=True);"),
        new_markdown_cell("## The data\n\nA row per class: training images as stored, then "
                          "the same images as the training loader augments them (a random "
                          "crop of the padded image, and a horizontal flip half of the time)."),
        new_code_cell("plot_data_preview(data, setup.images_dir / \"data_preview.png\", "
                      "pad=TrainConfig.pad,\n"
                      "                  flip=TrainConfig.flip, show=True);"),
        new_code_cell("# NBVAL_CHECK_OUTPUT\nprint(data.classes)"),
        new_markdown_cell("## The model\n\nEach `C` block is a convolution, then the "
                          "normalization, then SiLU; the summary lists every layer with its "
                          "output shape and parameter count."),
        new_code_cell(
            "# NBVAL_CHECK_OUTPUT\n"
            f"model = build_model({model_args})\n"
            "print(f\"{model.config.norm}: {model.get_num_params():,} trainable parameters\")\n"
            "show_summary(model)"),
        new_markdown_cell("## Training\n\nOne line per epoch: the loss and accuracy on the "
                          "training batches as the model saw them, then on the test images."),
        new_code_cell(
            "config = TrainConfig(epochs=setup.epochs, seed=SEED, batch_size=BATCH_SIZE, lr=LR,\n"
            "                     precision=PRECISION)\n"
            "run = config_run_name(model.config, config, subset=setup.subset)  # e.g. batch_seed0_e5\n"
            "check_publishable(setup.results_dir / f\"{run}.json\", model, config)  # never another run's files\n"
            "history = fit(model, data, config, device, checkpoint_path=setup.checkpoint_dir / f\"{run}.pt\",\n"
            "              resume=RESUME)"),
        new_code_cell(
            "title = f\"{model.config.norm} norm, seed {SEED}\"\n"
            "plot_history(history, setup.images_dir / f\"{run}_curves.png\", title=title, show=True);"),
        new_markdown_cell(
            "**What to notice.** The train loss ends above the test loss although the train "
            "accuracy ends above the test accuracy: the train loss is measured on augmented "
            "batches (crops and flips) with label smoothing (each target keeps "
            f"{100 * (1 - TrainConfig.label_smoothing):.0f}% of its probability, the rest is "
            "spread over all classes), which keeps it from falling towards zero; the test loss "
            "sees neither. The gap between train and test accuracy at the end is how much the "
            "network has fitted its training images beyond what generalizes. Both accuracies "
            "still gain in the last epochs, as the learning rate falls to nearly zero: 20 "
            "epochs is a short budget for this network."),
        new_code_cell(
            "_, test_loader = make_loaders(data, config, device)\n"
            "mistakes = collect_misclassified(model, test_loader, limit=10,\n"
            "                                 precision=history[\"precision\"][-1])\n"
            "plot_misclassified(mistakes, data.classes, setup.images_dir / f\"{run}_misclassified.png\",\n"
            "                   title=title, show=True);"),
        new_markdown_cell(
            "**What to notice.** Most mistakes are between classes that look alike at 32 × 32 "
            "pixels: cat and dog are each other's most frequent confusion for all three "
            "normalizations (`S8_Compare.ipynb` counts them), then bird, deer and airplane, or "
            "truck and automobile. Some of the true labels are arguable even for a person."),
        new_code_cell(
            "results = make_results(model, data, config, history, device)\n"
            "save_json_atomic(setup.results_dir / f\"{run}.json\", results)\n"
            "print(f\"{run}: final test accuracy {100 * results['final_test_acc']:.2f}% \"\n"
            "      f\"(flip-TTA {100 * results['final_test_acc_flip_tta']:.2f}%), train accuracy \"\n"
            "      f\"{100 * history['train_acc'][-1]:.2f}% after \"\n"
            "      f\"{results['epochs']} epochs, {results['time_per_epoch_s']:.1f} s/epoch on \"\n"
            "      f\"{results['hardware'].get('gpu', results['hardware']['cpu'])} in \"\n"
            "      f\"{results['precision']}, \"\n"
            "      f\"data: {results['data']['source']}\")"),
        new_markdown_cell(
            "Flip-TTA (test-time augmentation) scores each test image by the average of the "
            "model's outputs on the image and on its mirror image: a free gain, reported beside "
            "the plain accuracy, never instead of it."),
        new_markdown_cell(
            "## Inside the trained network\n\n"
            "At every normalization layer, on a fixed batch of test images: how far its input and "
            "its normalized output are from mean 0 and std 1, along this method's own axes and "
            "the other methods' (`norm_stats.py`). Then, once per epoch during training, each "
            "layer's input scale and the gradient norm of its convolution. `S8_Compare.ipynb` "
            "puts the three variants side by side."),
        new_code_cell(
            "plot_norm_statistics({NORM: results[\"norm_statistics\"]}, show=True)\n"
            "plot_layer_probe({NORM: history}, results[\"norm_statistics\"][\"layers\"], show=True);"),
        new_markdown_cell(EXERCISES),
    ]
    nb = new_notebook(cells=cells, metadata={
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
        "accelerator": "GPU",
        "colab": {"provenance": []},
    })
    return name, nb


def compare_notebook():
    name = "S8_Compare.ipynb"
    cells = [
        new_markdown_cell(
            "# S8 · Comparing BatchNorm, LayerNorm and GroupNorm\n\n"
            f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
            f"(https://colab.research.google.com/github/{REPO}/blob/main/{name})\n\n"
            "No training here: this notebook reads the committed results files (one JSON per run) "
            "and draws the comparisons the README reports, in seconds.\n\n"
            "- `results/<norm>_seed<seed>.json`: the 20-epoch runs at batch 128 (the results "
            "table), with per-class accuracy and the confusion matrix of the final model.\n"
            "- `results/batch_size/<norm>_bs<B>_seed<seed>.json`: the batch-size study, a shorter "
            "budget with the learning rate scaled linearly with the batch size. BatchNorm runs "
            "also record the test accuracy with *batch* statistics (train-mode normalization, "
            "batches of the training size) next to the usual running statistics.\n\n"
            "All accuracies were measured on the JPEG re-encoding of CIFAR-10 (see the README)."),
        colab_setup_cell("lab/compare.py"),
        new_code_cell(
            "from lab.compare import (LR_STUDY_DIR, RESULTS_DIR, STUDY_DIR, load_runs, load_study,\n"
            "                         mean_std, most_confused_lines, norm_statistics_runs,\n"
            "                         per_class_table, plot_batch_size_study, plot_confusion_matrices,\n"
            "                         plot_variant_curves, study_findings, study_table)\n"
            "from lab.lr_study import load_lr_study, lr_table, plot_lr_study\n"
            "from normalizations import check_against_torch, plot_norm_axes\n"
            "from norm_stats import plot_layer_probe, plot_norm_statistics, statistics_table\n\n"
            "runs = load_runs(RESULTS_DIR)    # {variant: [20-epoch runs]}\n"
            "study = load_study(STUDY_DIR)    # {variant: {batch size: [accuracy per seed]}}"),
        new_markdown_cell(
            "## What each normalization computes\n\n"
            "Each method subtracts a mean and divides by a standard deviation, then applies a "
            "learned per-channel scale and shift. Which activations share one mean and variance "
            "is the whole difference: BatchNorm, one channel across the batch; LayerNorm, one "
            "image across all channels; GroupNorm, one image across a group of channels; "
            "InstanceNorm (for reference), one image and one channel. `normalizations.py` "
            "writes each in a few lines of tensor code; the check below runs them against "
            "PyTorch's modules."),
        new_code_cell("plot_norm_axes(show=True);"),
        new_code_cell(
            "# NBVAL_CHECK_OUTPUT\n"
            "for check, difference in check_against_torch().items():\n"
            "    print(f\"{check}: from scratch equals PyTorch within 1e-12: {difference < 1e-12}\")"),
        new_markdown_cell(
            "### Inside the trained networks\n\n"
            "The seed-0 run of each variant measured, at every normalization layer and on a "
            "fixed batch of 250 test images, the std of the layer's input and of its normalized "
            "output (before the learned scale and shift) over the sets each method normalizes: "
            "per channel (BatchNorm's), per image (LayerNorm's), per image and group of 4 "
            "channels (GroupNorm's). A range of 1.00-1.00 means normalized along those axes."),
        new_code_cell(
            "# NBVAL_CHECK_OUTPUT\n"
            "measured = norm_statistics_runs(runs)   # {variant: the run that measured them}\n"
            "print(statistics_table({v: r[\"norm_statistics\"] for v, r in measured.items()}))"),
        new_code_cell("plot_norm_statistics({v: r[\"norm_statistics\"] for v, r in measured.items()},\n"
                      "                     show=True);"),
        new_code_cell("plot_layer_probe({v: r[\"history\"] for v, r in measured.items()},\n"
                      "                 next(iter(measured.values()))[\"norm_statistics\"][\"layers\"],\n"
                      "                 show=True);"),
        new_markdown_cell(
            "## Does normalization allow higher learning rates?\n\n"
            "Every variant, and the same network without normalization (conv biases in place of "
            "the norms' shifts), trained at peak learning rates from 0.0125 to 1.6 on the "
            "batch-size study's budget, 3 seeds each, scored on the validation split held out "
            "of the training set; a run whose loss became NaN is recorded where it diverged "
            "(`results/lr_study/`). `docs/learning-rate.md` says what the numbers show."),
        new_code_cell(
            "# NBVAL_CHECK_OUTPUT\n"
            "lr_study = load_lr_study(LR_STUDY_DIR)   # {variant: {peak lr: [runs]}}\n"
            "print(lr_table(lr_study))"),
        new_code_cell("plot_lr_study(lr_study, show=True);"),
        new_markdown_cell("## Accuracy vs batch size\n\nBatchNorm normalizes with the statistics "
                          "of the batch while training and with running averages at test time; "
                          "GroupNorm and LayerNorm normalize each image on its own, so the batch "
                          "size changes their gradient noise only."),
        new_code_cell(
            "# NBVAL_CHECK_OUTPUT\n"
            "print(study_table(study))\n"
            "print()\n"
            "print(\"\\n\".join(study_findings(study)))"),
        new_code_cell("plot_batch_size_study(study, show=True);"),
        new_markdown_cell("## Per-class accuracy and confusions (20-epoch runs, batch 128)"),
        new_code_cell(
            "# NBVAL_CHECK_OUTPUT\n"
            "print(per_class_table(runs))\n"
            "print()\n"
            "print(\"\\n\".join(most_confused_lines(runs)))"),
        new_code_cell("plot_confusion_matrices(runs, show=True);"),
        new_markdown_cell("## Learning curves (mean over seeds, min–max band)"),
        new_code_cell("plot_variant_curves(runs, show=True);"),
        new_code_cell(
            "# NBVAL_CHECK_OUTPUT\n"
            "for variant, rs in runs.items():\n"
            "    accs = [100 * r[\"final_test_acc\"] for r in rs]\n"
            "    print(f\"{variant}: {mean_std(accs)}% over {len(accs)} seeds \"\n"
            "          f\"({rs[0]['epochs']} epochs, {rs[0]['num_params']:,} parameters)\")"),
    ]
    return name, nbformat.v4.new_notebook(cells=cells, metadata={
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
        "colab": {"provenance": []},
    })


def all_notebooks():
    return dict([*(notebook(norm) for norm in course_variants()), compare_notebook()])


def has_outputs(path):
    return path.exists() and any(
        cell.get("outputs") for cell in nbformat.read(path, as_version=4).cells)


def collapse_carriage_returns(text):
    """What a notebook displays for text that redraws a line with \\r (tqdm): the last draw."""
    return "\n".join(re.sub(r"^.*\r(?=[^\r]*$)", "", line) if "\r" in line else line
                     for line in text.split("\n"))


def coalesce_streams(outputs):
    """Consecutive outputs of one stream joined into one, as a notebook front-end shows them:
    nbconvert saves each of tqdm's redraws ("\\r" + bar) as an output of its own, which GitHub
    would list one under another."""
    merged = []
    for out in outputs:
        last = merged[-1] if merged else None
        if (out.get("output_type") == "stream" and last is not None
                and last.get("output_type") == "stream" and last["name"] == out["name"]):
            last["text"] += out["text"]
        else:
            merged.append(out)
    return merged


def clean(path):
    """Strip what breaks GitHub's viewer or only adds noise; outputs themselves are kept.

    Widget state (metadata.widgets, saved by Colab) breaks GitHub's notebook view; execution
    timestamps change on every run; tqdm's redraws are collapsed to the final line of each bar.
    """
    nb = nbformat.read(path, as_version=4)
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        if "outputs" in cell:
            cell.outputs = coalesce_streams(cell.outputs)
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                out["text"] = collapse_carriage_returns(out["text"])
            out.get("metadata", {}).pop("widgets", None)
        if "outputs" in cell:  # a bar cleared to print an epoch line displays as nothing
            cell.outputs = [o for o in cell.outputs
                            if o.get("output_type") != "stream" or o["text"]]
    nbformat.write(nb, path)


def update_sources(path, template):
    """Give an executed notebook the template's cells and keep its code cells' outputs, for a
    change that leaves what the code computes as it was (an import moved, a comment, a setting
    passed at its default, a markdown cell added); refuses when the code cells no longer line
    up one to one, since then the outputs would belong to other code."""
    nb = nbformat.read(path, as_version=4)
    ran = [c for c in nb.cells if c.cell_type == "code"]
    code = [c for c in template.cells if c.cell_type == "code"]
    if len(ran) != len(code):
        raise SystemExit(f"{path.name}: its code cells no longer match the template's; "
                         f"re-execute it instead (docs/contributing.md: The notebooks)")
    for old, new in zip(ran, code):
        old.source = new.source
    by_code = iter(ran)
    text = {c.source: c for c in nb.cells if c.cell_type == "markdown"}  # unchanged: same id
    nb.cells = [next(by_code) if c.cell_type == "code" else text.get(c.source, c)
                for c in template.cells]
    nbformat.write(nb, path)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("names", nargs="*", help="notebooks to write (default: all four)")
    p.add_argument("--force", action="store_true",
                   help="overwrite notebooks that hold outputs (the committed full runs)")
    p.add_argument("--clean", nargs="+", metavar="NOTEBOOK",
                   help="clean these executed notebooks instead of rewriting the templates")
    p.add_argument("--sources", action="store_true",
                   help="give executed notebooks the templates' cell sources, keeping their "
                        "outputs (for changes that compute the same)")
    args = p.parse_args()
    if args.clean:
        for path in args.clean:
            clean(path)
            print("cleaned", path)
        return
    notebooks = all_notebooks()
    unknown = sorted(set(args.names) - set(notebooks))
    if unknown:
        p.error(f"unknown notebook(s) {', '.join(unknown)}; choose from {', '.join(notebooks)}")
    for name in args.names or notebooks:
        path = ROOT / name
        if args.sources and has_outputs(path):
            update_sources(path, notebooks[name])
            print("updated the sources of", name)
            continue
        if has_outputs(path) and not args.force:
            print(f"kept {name}: it holds outputs of a run (--force overwrites them)")
            continue
        nbformat.write(notebooks[name], path)
        print("wrote", name)


if __name__ == "__main__":
    main()
