"""The recipe study: settings screened on a validation split, never on the test set.

    # the screen: each lever alone from the current recipe, 2 seeds, a 5-epoch proxy budget
    python -m lab.tune --epochs 5 --seeds 0 1 --jobs 2
    # a combination of screened levers: names joined with "+"
    python -m lab.tune --configs w24-32-28+lr0.2+ls0 --epochs 5 --seeds 0 1
    # the proxy check: some of the screen's configurations again at the full 20 epochs
    python -m lab.tune --configs base lr0.2 ls0 --epochs 20 --seeds 0
    python -m lab.tune --list          # the configurations and their train.py arguments
    # the learning-per-epoch study's whole grid, in order; --list with it: what is done
    python -m lab.tune --grid --jobs 8
    # the lever study's grid (issue 52), on a GPU, many runs at a time
    python -m lab.tune --grid levers --jobs 14
    # its part on the CPU, paired with results/tuning/'s runs of recipe v3 (AVX2 fp32)
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_CBWR=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
        python -m lab.tune --grid levers-cpu --jobs 2 --precision fp32

Every run is `train.py --validation`: it trains on 45,000 training images and is scored on the
5,000 held out (500 per class, a fixed split: dataset.CIFAR10Data.validation_split), with the
one-cycle schedule compressed into --epochs. One results file per run,
results/tuning/<norm>_<config>_e<epochs>_seed<seed>.json; finished runs are skipped and
interrupted ones resume from their checkpoints, so the study can be stopped and restarted at
will. `lab/report/` turns the files into the README's ablation table. Paired seeds must
share arithmetic: on another kind of CPU, check with `lab/repeat.py` that it repeats the
study's runs (docs/learning-per-epoch.md, "Same seeds, other arithmetic") before adding to them.
"""

import argparse
import os
import sys
from pathlib import Path

import torch

from results import ResultsFileError, finished, load_results, run_name
from train import flag_name
from checkpoints import FIRST_DEFAULTS
from variants import DEFAULT, canonical_norm, course_variants, get_variant

from lab.sweep import run_all, threads_per_run

ROOT = Path(__file__).resolve().parents[1]

OUT_DIR = ROOT / "results" / "tuning"
CEILING_DIR = ROOT / "results" / "ceiling"  # recipe v1 beyond 20 epochs: a scale

# Every configuration is a change from the recipe the studies started from (recipe v1: today's
# defaults at their first values: SGD, full 3x3 convs of 16, 28 and 32 channels, 4-pixel
# padding, ReLU), so a name keeps its meaning as the defaults move on.
RECIPE_V1 = [arg for field, value in FIRST_DEFAULTS.items()
             for arg in (flag_name(field),
                         *map(str, value if isinstance(value, tuple) else [value]))]

# One lever at a time from recipe v1, in the order worth running first: the runs of 20 epochs
# say the network under-fits (train accuracy at or below test accuracy), so capacity and
# optimisation come before regularisation.
CONFIGS = {
    "base": [],                                  # recipe v1 itself
    "w24-32-28": ["--widths", "24", "32", "28"],    # 47,778 parameters
    "w28-32-28": ["--widths", "28", "32", "28"],    # 49,902 parameters
    "lr0.2": ["--lr", "0.2"],
    "lr0.4": ["--lr", "0.4"],
    "bs256": ["--batch-size", "256", "--lr", "0.2"],  # rate scaled with the batch
    "ls0": ["--label-smoothing", "0"],
    "wd2e-4": ["--weight-decay", "2e-4"],
    "gelu": ["--activation", "gelu"],
    "warmup0.4": ["--pct-start", "0.4"],
    "pad2": ["--pad", "2"],
    "bs64": ["--batch-size", "64", "--lr", "0.05"],
    "lr0.05": ["--lr", "0.05"],
    "wd1e-3": ["--weight-decay", "1e-3"],
    "silu": ["--activation", "silu"],
    "warmup0.1": ["--pct-start", "0.1"],
    "ema0.99": ["--ema", "0.99"],     # an average over the last ~100 steps
    "ema0.998": ["--ema", "0.998"],   # ~500 steps: about 1.4 epochs at batch 128
    # The learning-per-epoch study (README): techniques from fast CIFAR-10 training, at 20
    # epochs with paired seeds, in the order of the effect expected
    "whiten": ["--whiten", "frozen"],            # C1 whitens 3x3 patches, frozen
    "whiten-train": ["--whiten", "trainable"],   # the same start, then trained
    "dirac": ["--identity-init", "dirac"],       # square 3x3 convs start near identity
    "aflip": ["--alternate-flip"],               # each image flipped every other epoch
    "blr8-fs": ["--norm-bias-lr", "8", "--freeze-norm-scale"],  # fast shifts, scales at 1
    "skipinit": ["--identity-init", "skipinit"],  # each branch gated by a gain from 0
    "ls0.2": ["--label-smoothing", "0.2"],
    "wstd": ["--weight-std"],                    # Weight Standardization (for LN and GN)
    "wstd-pw": ["--weight-std", "--no-weight-std-depthwise"],  # the same, depthwise filters raw
    "muon": ["--optimizer", "muon"],             # Muon for the 3x3 kernels, SGD for the rest
    "adamw": ["--optimizer", "adamw", "--lr", "0.003"],
    "lookahead": ["--lookahead", "5"],           # k = 5, alpha = 0.5 (Zhang et al., 2019)
    # Muon's peak rate (0.05) was placed by a 4-epoch check; the full budget decides
    "mlr0.1": ["--muon-lr", "0.1"],
    "mlr0.025": ["--muon-lr", "0.025"],
    # where the capacity sits: channels moved to the 8x8 stage (w24-32-28 moved them earlier)
    "w12-24-36": ["--widths", "12", "24", "36"],    # 48,862 parameters
    "w16-20-36": ["--widths", "16", "20", "36"],    # 46,698 parameters
    # depthwise 3x3 + 1x1 blocks after C1: the parameters buy 2-3x the channels (46,610)
    "sep": ["--conv", "separable", "--widths", "32", "64", "88"],
    # where the skip adds sit (no parameters): every square 3x3 conv its own branch, or none
    "skips-per-conv": ["--skips", "per-conv"],
    "no-skips": ["--skips", "off"],
    # GroupNorm only (--norm group): 1, 2, 4 groups are all that divide 16/28/32 channels; the
    # group-size view keeps channels per group fixed instead (GN paper, Table 3)
    "g2": ["--groups", "2"],
    "gs4": ["--group-size", "4"],     # 4, 7, 8 groups at 16, 28, 32 channels
    "gs2": ["--group-size", "2"],     # 8, 14, 16 groups
    # The levers never tried on the separable network (issue 52), each on top of `sep`:
    "mdw": ["--muon-depthwise"],                 # Muon for each layer's depthwise filters too
    "dwlr4": ["--depthwise-lr", "4"],            # or SGD's depthwise filters at 4x the rate
    "dw5": ["--depthwise-kernel", "5", "--widths", "32", "60", "84"],  # 5x5 filters (49,038)
    "dil2": ["--depthwise-dilation", "2"],       # 3x3 taps spread over 5x5, no parameters
    "se4": ["--se-hidden", "4"],                 # squeeze-and-excitation (+1,668 parameters)
    "w24-52-96": ["--widths", "24", "52", "96"],  # channels moved to 8x8 (46,114 parameters)
    # Round 2 (issue 67), on recipe v4: more steps per epoch, with both rates kept or both scaled
    # by the linear rule (rate proportional to the batch, as scaled_lr); the schedule is in steps
    "bs64-keep": ["--batch-size", "64"],
    "bs64-lin": ["--batch-size", "64", "--lr", "0.05", "--muon-lr", "0.025"],
    "bs32-keep": ["--batch-size", "32"],
    "bs32-lin": ["--batch-size", "32", "--lr", "0.025", "--muon-lr", "0.0125"],
    "ls0.05": ["--label-smoothing", "0.05"],
    # the 3,390 parameters left under 50,000 on the separable network, added (not moved)
    "w32-64-92": ["--widths", "32", "64", "92"],  # 8x8 wider: 49,198
    "w32-72-88": ["--widths", "32", "72", "88"],  # 16x16 wider: 49,922
}
GROUP_ONLY = {"g2", "gs4", "gs2"}
# Every arm's first seeds in the learning-per-epoch study; no verdict with fewer
PROTOCOL_SEEDS = [0, 1, 2, 3]
# Added to both arms of a pair whose interval still straddles zero after PROTOCOL_SEEDS
EXTRA_SEEDS = [4, 5, 6, 7]
# Refinements of other changes, meaningful only on top of them: {configuration: what it refines,
# names joined with "+"}
REFINES = {"mlr0.1": "muon", "mlr0.025": "muon", "wstd-pw": "sep", "mdw": "muon+sep", "dwlr4": "sep",
           "dw5": "sep", "dil2": "sep", "se4": "sep", "w24-52-96": "sep",
           "bs64-lin": "muon", "bs32-lin": "muon", "w32-64-92": "sep", "w32-72-88": "sep"}


def missing_bases(config):
    """The combinations to run instead where `config` holds a refinement without its base."""
    parts = config.split("+")
    return [f"{REFINES[p]}+{p}" for p in parts if p in REFINES
            and not set(REFINES[p].split("+")) <= set(parts)]


def default_configs(norm):
    """Every configuration that applies to `norm`, in the order of CONFIGS: each change alone
    from recipe v1, a refinement on top of what it refines."""
    return [f"{REFINES[c]}+{c}" if c in REFINES else c for c in CONFIGS
            if get_variant(norm).uses_groups or c not in GROUP_ONLY]


def change_flags(config):
    """The flags a configuration changes from recipe v1: a name of CONFIGS, or names joined with
    "+" (a combination; a later name's flag wins where two set the same one)."""
    parts = config.split("+")
    unknown = [c for c in parts if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}; see --list")
    missing = missing_bases(config)
    if missing:
        raise SystemExit(f"{config} refines a change it does not make; run "
                         f"{', '.join(missing)} instead")
    return [flag for part in parts for flag in CONFIGS[part]]


def config_flags(config):
    """train.py flags of a configuration: recipe v1's, then its changes."""
    return [*RECIPE_V1, *change_flags(config)]


def tuning_run_name(norm, config, epochs, seed):
    return run_name(norm, seed, study=f"{config}_e{epochs}")


def plan(configs, seeds, epochs, norm=DEFAULT):
    """[(name, train.py arguments)], configuration by configuration, so that a study cut short
    leaves configurations with all their seeds rather than many with one."""
    norm = canonical_norm(norm)
    flags = {config: config_flags(config) for config in configs}
    return [(name, ["--norm", norm, "--seed", str(seed), "--epochs", str(epochs),
                    "--validation", *flags[config], "--run-name", name])
            for config in configs for seed in seeds
            for name in [tuning_run_name(norm, config, epochs, seed)]]


def per_epoch_grid():
    """The learning-per-epoch study (README), as [(variant, configurations, epochs, seeds,
    folder)] in the order worth running: each winner on every variant first (the recipe
    changes only when it holds on all three), then the next candidates on top of recipe
    v3 (Muon + separable blocks), the candidates measured on top of Muon alone, the ceiling
    scale, and the single changes for the ablation table. A pair whose interval still straddles
    zero after its first 4 seeds joins the grid with EXTRA_SEEDS for both arms."""
    every, seeds = course_variants(), PROTOCOL_SEEDS
    batch_free = [v for v in every if not get_variant(v).running_stats]
    return [
        *[(v, ["base", "muon"], 20, seeds, OUT_DIR) for v in every],
        # the largest gain seen on top of Muon, won on every variant, now the default network
        *[(v, ["muon+sep"], 20, seeds, OUT_DIR) for v in every],
        # the greedy step: the next candidates on top of both winners
        (DEFAULT, ["muon+sep+mlr0.1", "muon+sep+lookahead", "muon+sep+aflip", "muon+sep+ls0.2"],
         20, seeds, OUT_DIR),
        # the greedy step's leading candidate straddled zero at 4 seeds: both arms, seeds 4 to 7
        (DEFAULT, ["muon+sep", "muon+sep+mlr0.1"], 20, EXTRA_SEEDS, OUT_DIR),
        # alternating flips straddled zero at 4 seeds too (muon+sep has seeds 4 to 7 above)
        (DEFAULT, ["muon+sep+aflip"], 20, EXTRA_SEEDS, OUT_DIR),
        # 2-pixel padding: besides Muon, the one change on recipe v1 with a positive mean;
        # seeds 4 to 7 because it straddled zero at 4 too (muon+sep has them above)
        (DEFAULT, ["muon+sep+pad2"], 20, seeds + EXTRA_SEEDS, OUT_DIR),
        # it won on BatchNorm at 8 seeds; the default changes only if it holds on all three
        *[(v, ["muon+sep+pad2"], 20, seeds, OUT_DIR) for v in batch_free],
        # it won on LayerNorm at 4 seeds but straddled zero on GroupNorm: both arms, seeds 4 to 7
        *[(v, ["muon+sep", "muon+sep+pad2"], 20, EXTRA_SEEDS, OUT_DIR) for v in every
          if get_variant(v).uses_groups],
        *[(v, ["muon+sep+wstd"], 20, seeds, OUT_DIR) for v in batch_free],
        # WS lost 2.5 points on LayerNorm's first seeds; is it the depthwise filters' zero mean?
        *[(v, ["muon+sep+wstd-pw"], 20, seeds, OUT_DIR) for v in batch_free],
        (DEFAULT, ["muon+blr8-fs", "muon+lookahead", "muon+skipinit", "muon+aflip", "muon+dirac",
                   "muon+ls0.2", "muon+mlr0.1", "muon+mlr0.025"], 20, seeds, OUT_DIR),
        *[(v, ["muon+wstd"], 20, seeds, OUT_DIR) for v in batch_free],
        (DEFAULT, ["muon+w12-24-36", "muon+w16-20-36", "muon+skips-per-conv"], 20, seeds,
         OUT_DIR),
        *[(v, ["base"], 40, [0, 1] if v == DEFAULT else [0], CEILING_DIR) for v in every],
        (DEFAULT, ["base"], 80, [0, 1], CEILING_DIR),
        (DEFAULT, ["whiten", "whiten-train", "dirac", "aflip", "blr8-fs", "skipinit", "ls0.2",
                   "lookahead", "adamw", "pad2", "bs256", "no-skips"], 20, seeds, OUT_DIR),
        *[(v, ["gs4"], 20, seeds, OUT_DIR) for v in every if get_variant(v).uses_groups],
    ]


# The lever study (issue 52) ran on a lent GPU: its pairs share that GPU's arithmetic (bf16),
# so its runs live apart from results/tuning's CPU fp32 ones and are paired only among themselves
LEVERS_DIR = ROOT / "results" / "levers-h200"
LEVER_BASE = "muon+sep"  # the lever study's baseline: recipe v3, the defaults until 2026-12-06
LEVER_BASE_LABEL = "recipe v3"  # its name in the lever study's tables
ADOPTED_LEVER = "pad2+silu"  # what recipe v4, today's defaults, adds to recipe v3
# Each lever alone on top of recipe v3, in the order of the effect expected: the recipe
# study's 2-seed hint (GELU), then the separable blocks' untuned parts, then the rates
LEVERS = ["gelu", "mdw", "dw5", "se4", "ema0.998", "dil2", "lr0.2", "silu", "wd1e-3",
          "warmup0.1", "dwlr4", "w24-52-96", "lr0.05", "wd2e-4", "bs64"]


def lever_grid():
    """The lever study (docs/levers.md) as a grid, in the order worth running: every lever alone
    on BatchNorm, paired with recipe v3 on PROTOCOL_SEEDS (the screen); its leaders with
    EXTRA_SEEDS for both arms, the greedy stack on the winner, the leaders on LayerNorm and
    GroupNorm; then the screen's last levers."""
    on_base = [LEVER_BASE, *(f"{LEVER_BASE}+{lever}" for lever in LEVERS)]
    # the screen's positive means (docs/levers.md): SiLU won at 4 seeds; the others straddled
    leaders = [f"{LEVER_BASE}+{lever}" for lever in ("silu", "mdw", "gelu", "warmup0.1")]
    return [(DEFAULT, on_base[:-2], 20, PROTOCOL_SEEDS, LEVERS_DIR),  # run 2026-12-04
            (DEFAULT, [LEVER_BASE, *leaders[1:]], 20, EXTRA_SEEDS, LEVERS_DIR),
            (DEFAULT, [f"{LEVER_BASE}+silu+mdw"], 20, PROTOCOL_SEEDS, LEVERS_DIR),
            *[(v, [LEVER_BASE, *leaders], 20, PROTOCOL_SEEDS, LEVERS_DIR) for v in course_variants()
              if v != DEFAULT],
            (DEFAULT, on_base[-2:], 20, PROTOCOL_SEEDS, LEVERS_DIR)]


def cpu_lever_grid():
    """The lever study's part on the CPU (issue 52), for days without a GPU: levers on
    recipe v3, each paired with the learning-per-epoch study's own runs of recipe v3 in
    results/tuning/ (fp32, AVX2 arithmetic, seeds 0 to 7 on BatchNorm and GroupNorm, 0 to 3 on
    LayerNorm), so that only the lever's arm runs. In order: SiLU stacked on 2-pixel padding on
    BatchNorm (the greedy step on padding, which won here; with SiLU, the GPU screen's one win,
    the likeliest to clear +0.5); SiLU on LayerNorm and GroupNorm, which the GPU has not
    reached; the same stack on LayerNorm, the greedy step there too, as padding won on it, and
    on GroupNorm, where it would make padding and SiLU one recipe for all three; then seeds 4
    to 7 of both arms of SiLU alone on LayerNorm (undecided at 4; recipe v3 has only 0 to 3
    there); then Muon for the depthwise filters, the GPU screen's largest mean, on LayerNorm and
    GroupNorm. The BatchNorm stack runs 8 seeds at once, as 4 left its greedy step undecided."""
    others = [v for v in course_variants() if v != DEFAULT]
    without_groups = [v for v in others if not get_variant(v).uses_groups]
    return [(DEFAULT, [f"{LEVER_BASE}+pad2+silu"], 20, PROTOCOL_SEEDS + EXTRA_SEEDS, OUT_DIR),
            *[(v, [f"{LEVER_BASE}+silu"], 20, PROTOCOL_SEEDS, OUT_DIR) for v in others],
            *[(v, [f"{LEVER_BASE}+pad2+silu"], 20, PROTOCOL_SEEDS, OUT_DIR) for v in others],
            *[(v, [LEVER_BASE, f"{LEVER_BASE}+silu"], 20, EXTRA_SEEDS, OUT_DIR) for v in without_groups],
            *[(v, [f"{LEVER_BASE}+mdw"], 20, PROTOCOL_SEEDS, OUT_DIR) for v in others]]


ROUND2_BASE = f"{LEVER_BASE}+{ADOPTED_LEVER}"  # recipe v4, the baseline of round 2
# Round 2's levers on recipe v4 (issue 67), in the issue's order: smaller batches; the stack of
# the near-winners of round 1 (Muon for the depthwise filters, Muon at 0.1, alternating flips)
# and the stack with each removed once; the parameters left under 50,000; label smoothing
ROUND2_LEVERS = ["bs64-keep", "bs64-lin", "bs32-keep", "bs32-lin", "mdw+mlr0.1",
                 "mdw+mlr0.1+aflip", "mlr0.1+aflip", "mdw+aflip", "w32-64-92", "w32-72-88",
                 "ls0.05", "ls0"]
ROUND2_SMALL_BATCHES = [lever for lever in ROUND2_LEVERS if lever.startswith("bs")]


def round2_cpu_grid():
    """Round 2 of the lever study (issue 67) on the CPU: each lever on recipe v4, BatchNorm first,
    paired with the validation runs of recipe v4 in results/tuning/ that chose it (fp32, AVX2
    arithmetic, 1 thread; seeds 0 to 7 on BatchNorm, 0 to 3 on LayerNorm and GroupNorm), so that
    only the lever's arm runs. Every lever's seeds 0 to 3 come first; seeds 4 to 7 follow for a
    lever whose interval straddled the bar after 4 (bs64-keep: +0.09 [-0.78, +0.96]; bs32-keep:
    -0.15 [-1.13, +0.83]). Then the smaller batches on LayerNorm and GroupNorm whatever they did
    on BatchNorm: a small batch costs BatchNorm noisier statistics, and the two norms that see
    one image at a time do not pay it; the other levers reach them where they win on BatchNorm."""
    small = [f"{ROUND2_BASE}+{lever}" for lever in ROUND2_SMALL_BATCHES]
    return [(DEFAULT, [f"{ROUND2_BASE}+{lever}" for lever in ROUND2_LEVERS], 20, PROTOCOL_SEEDS,
             OUT_DIR),
            (DEFAULT, [f"{ROUND2_BASE}+bs64-keep", f"{ROUND2_BASE}+bs32-keep"], 20, EXTRA_SEEDS,
             OUT_DIR),
            *((norm, small, 20, PROTOCOL_SEEDS, OUT_DIR) for norm in course_variants()
              if norm != DEFAULT)]


# Round 2 on a lent GPU: both arms, recipe v4 and each lever, run there in its default precision,
# since a GPU's runs pair only with runs in the same arithmetic (no GPU has run recipe v4)
ROUND2_GPU_DIR = ROOT / "results" / "round2-gpu"


def round2_gpu_grid():
    """Round 2 of the lever study (issue 67) on a lent GPU: recipe v4 and every round-2 lever on
    BatchNorm, seeds 0 to 3, into results/round2-gpu/, recipe v4 first so that a call cut short
    leaves pairs; the smaller batches last, as a GPU step's time is set by the kernels it
    launches, not their size (batch 32 costs four times batch 128's epoch)."""
    levers = [lever for lever in ROUND2_LEVERS if lever not in ROUND2_SMALL_BATCHES]
    levers += ROUND2_SMALL_BATCHES
    return [(DEFAULT, [ROUND2_BASE, *(f"{ROUND2_BASE}+{lever}" for lever in levers)], 20,
             PROTOCOL_SEEDS, ROUND2_GPU_DIR)]


GRIDS = {"per-epoch": per_epoch_grid, "levers": lever_grid, "levers-cpu": cpu_lever_grid,
         "round2-cpu": round2_cpu_grid, "round2-gpu": round2_gpu_grid}
# The grids whose runs pair only with runs of one GPU kind (their arithmetic): {grid: GPU name}
GRID_GPUS = {"levers": "H200"}
# The grids whose runs pair only with runs of the GPU and torch that made the first in their folder
GRID_FOLDER_GPU = {"round2-gpu": ROUND2_GPU_DIR}
# The grids whose runs pair only with fp32 CPU runs in the AVX2 EPYC's arithmetic
GRID_AVX2 = {"levers-cpu", "round2-cpu"}
AVX2_CAPS = "ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_CBWR=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2"


def check_grid_device(grid, train_args=(), jobs=1):
    """Fail in one line, before any run starts, where this machine's runs would not share the
    arithmetic of the grid's runs so far (a CPU run paired with an H200 run measures both; a
    CPU run with 2 threads, one with 1: normalization's reductions split by thread)."""
    need = GRID_GPUS.get(grid)
    have = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA GPU"
    if need and need not in have:
        raise SystemExit(f"error: the {grid} grid's runs pair only with runs made on an NVIDIA "
                         f"{need} in bf16 (results/levers-h200/README.md), and this machine has "
                         f"{have}: run the grid there, or single configurations with --configs "
                         f"into another --out-dir")
    if grid in GRID_FOLDER_GPU:
        folder = os.path.relpath(GRID_FOLDER_GPU[grid], ROOT)
        if not torch.cuda.is_available():
            raise SystemExit(f"error: the {grid} grid runs on a CUDA GPU, and this machine has "
                             f"none: run it on a lent GPU (lab/gpu_grid.sh {grid})")
        made_by, here = folder_gpus(GRID_FOLDER_GPU[grid]), (have, torch.__version__)
        if made_by and here not in made_by:
            before = ", ".join(f"{gpu} with torch {version}" for gpu, version in sorted(made_by))
            raise SystemExit(f"error: the {grid} grid's runs pair only with runs in the same "
                             f"arithmetic, {folder}/'s so far ({before}), and this machine has "
                             f"{have} with torch {torch.__version__}: run it there, or move "
                             f"{folder}/ aside to start the grid afresh")
    if grid in GRID_AVX2:
        kernels = "a CUDA GPU" if torch.cuda.is_available() else \
            f"{torch.backends.cpu.get_cpu_capability()} kernels"
        fp32 = "--precision fp32" in " ".join(train_args)
        if kernels != "AVX2 kernels" or not fp32:
            raise SystemExit(f"error: the {grid} grid's runs pair only with fp32 CPU runs in the "
                             f"AVX2 EPYC's arithmetic, and these would run on {kernels}"
                             f"{'' if fp32 else ' without --precision fp32'}: run it on a "
                             f"CPU-only machine as {AVX2_CAPS} lab/tune.py --grid {grid} "
                             f"--jobs 2 --precision fp32")
        threads = threads_per_run(jobs)
        if threads != 1:
            raise SystemExit(f"error: the {grid} grid's runs pair only with 1-thread runs, and "
                             f"--jobs {jobs} gives each run {threads} threads on this "
                             f"{os.cpu_count()}-core machine: pass --jobs {os.cpu_count()}")


def folder_gpus(folder):
    """{(GPU name, torch version)} of the finished runs in `folder`."""
    return {(run["hardware"].get("gpu"), run["hardware"]["torch"])
            for run in map(load_results, sorted(Path(folder).glob("*.json")))}


def grid_plan(grid):
    """[(name, train.py arguments, folder)] of every run of `grid`, in its order."""
    return [(name, run_args, folder) for norm, configs, epochs, seeds, folder in grid
            for name, run_args in plan(configs, seeds, epochs, norm)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter,
                                epilog="Any other flag goes to every run's train.py as it is "
                                       "(--precision fp32: see train.py --help).")
    p.add_argument("--configs", nargs="+", default=None,
                   help="configurations to run (default: all that apply to --norm, in the "
                        "order of --list, a refinement on top of what it refines)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="(default: 0 1)")
    p.add_argument("--epochs", type=int, default=5,
                   help="budget; the schedule is compressed into it (default: 5, the proxy)")
    p.add_argument("--norm", default=DEFAULT, help=f"variant to tune (default: {DEFAULT})")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (default: 1)")
    p.add_argument("--out-dir", default=str(OUT_DIR), help="(default: results/tuning)")
    p.add_argument("--images-dir", default="runs/tuning", help="(default: runs/tuning)")
    p.add_argument("--list", action="store_true", help="print the configurations and stop")
    p.add_argument("--grid", nargs="?", const="per-epoch", default=None, choices=GRIDS,
                   help="run a study's whole grid instead of --configs/--seeds/--epochs/--norm: "
                        "per-epoch (the default; per_epoch_grid), levers (lever_grid), "
                        "levers-cpu (cpu_lever_grid), round2-cpu (round2_cpu_grid) or "
                        "round2-gpu (round2_gpu_grid); with "
                        "--list: each run, done or not")
    args, train_args = p.parse_known_args(argv)  # anything else goes to train.py as it is
    if args.grid:
        runs = grid_plan(GRIDS[args.grid]())
        if args.list:
            try:
                done = [finished(Path(folder, f"{name}.json")) for name, _, folder in runs]
            except ResultsFileError as err:
                sys.exit(f"error: {err}")
            for (name, _, folder), is_done in zip(runs, done):
                print(f"{'done' if is_done else 'todo'}  {Path(folder).name}/{name}")
            print(f"{sum(done)} of {len(runs)} runs done")
            return
        if args.jobs < 1:
            p.error("--jobs must be at least 1")
        try:
            check_grid_device(args.grid, train_args, args.jobs)
        except ResultsFileError as err:
            sys.exit(f"error: {err}")
        run_all(runs, args.out_dir, args.images_dir, train_args, args.jobs,
                log_dir="runs/logs/tuning")
        return
    if args.list:
        width = max(map(len, CONFIGS))
        for name, flags in CONFIGS.items():
            on_top = f"  (on top of {REFINES[name]})" if name in REFINES else ""
            print(f"{name:{width}s} {' '.join(flags) or '(recipe v1)'}{on_top}")
        return
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    configs = args.configs or default_configs(args.norm)
    run_all(plan(configs, args.seeds, args.epochs, args.norm), args.out_dir,
            args.images_dir, train_args, args.jobs, log_dir="runs/logs/tuning")


if __name__ == "__main__":
    main()
