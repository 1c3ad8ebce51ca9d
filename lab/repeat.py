"""Does this machine repeat a finished run's arithmetic? Re-trains the first epochs of a results
file's run (its configuration, seed, data split and precision) and compares every logged loss
and accuracy with the file's history, to the last digit.

    CIFAR10_DATA=../shared/data/cifar10-jpeg.tar.gz .venv/bin/python -m lab.repeat \\
        results/tuning/batch_muon+sep_e20_seed3.json --epochs 2

Two runs of one seed pair cleanly only where they share arithmetic (docs/learning-per-epoch.md, "Same seeds, other
arithmetic"); this is the check before a study continues on another machine. On an AVX512 CPU,
ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_CBWR=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 in
the environment cap torch's kernels to AVX2 (the results file records them). With --out the
verdict is also written as JSON (never over an existing file).
"""

import argparse
import re
import sys
from pathlib import Path

import torch

from dataset import DatasetError, load_cifar10
from precision import PRECISIONS, get_device, hardware_info
from results import ResultsFileError, load_results, provenance, save_json_atomic
from checkpoints import with_defaults
from utils import fit

from lab.levers import LabModelConfig, LabTrainConfig, build_lab_model

ROOT = Path(__file__).resolve().parents[1]

# What an epoch logs that rounding moves: losses first (the most digits), then accuracies
COMPARED = ("train_loss", "train_acc", "test_loss", "test_acc")
SPLIT = re.compile(r"validation split \((\d+)/class, seed (\d+)\)")


class RepeatError(ValueError):
    """A results file this tool cannot repeat; the message says why."""


class _Enough(Exception):
    """Raised after the last compared epoch: the rest of the run is not needed."""


def reference_data(reference, source=None):
    """The data the reference trained and evaluated on, rebuilt from its record."""
    record = reference["data"]
    data = load_cifar10(source, verbose=False)
    split = SPLIT.search(record["source"])
    if split:
        data = data.validation_split(int(split[1]), seed=int(split[2]))
    rebuilt = {"sha256": data.sha256, "train_images": len(data.train_y),
               "test_images": len(data.test_y)}
    differ = [k for k, v in rebuilt.items() if record.get(k) != v]
    if differ:
        raise RepeatError(f"this data differs from the run's in {', '.join(differ)} (it used "
                          f"{record['source']}); point --data at that copy (subset runs are "
                          f"not repeated)")
    return data


def check_reference(reference, epochs):
    """What repeating `reference` needs, before the data loads: its logged history, enough
    epochs of it, one precision throughout, a configuration and a data record."""
    history = reference.get("history")
    missing = [k for k in ("epoch", *COMPARED) if not isinstance(history, dict) or k not in history]
    missing += [k for k in ("model_config", "train_config", "data") if k not in reference]
    if missing:
        raise RepeatError(f"the results file lacks {', '.join(missing)}: it is not the file of a "
                          f"finished train.py run; pick one that is")
    if epochs > len(history["epoch"]):
        raise RepeatError(f"the run logged {len(history['epoch'])} epochs; "
                          f"pass --epochs at most that")
    precision = reference.get("precision")
    if precision not in PRECISIONS or precision == "auto":  # "auto" is resolved before a run
        raise RepeatError(f"the run's precision is {precision!r}, not one precision throughout; "
                          f"pick a run that never changed machines")


def repeat(reference, data, epochs, device="cpu"):
    """Re-train the reference's first `epochs` epochs on `data`, on a CPU with the reference's
    thread count; return the comparison:
    {"identical": bool, "first_difference": (epoch, field) or None, "epochs": [...]}."""
    check_reference(reference, epochs)
    precision = reference["precision"]
    threads = reference.get("hardware", {}).get("cpu_threads")
    if device == "cpu" and threads:  # reductions split by thread: the count is arithmetic
        torch.set_num_threads(threads)  # kept after the call, so that hardware_info records it
    model_config, train_config = with_defaults(reference["model_config"],
                                               reference["train_config"], LabModelConfig,
                                               LabTrainConfig)
    config = LabTrainConfig(**{**train_config, "precision": precision})
    model = build_lab_model(seed=config.seed, **model_config)
    logged = {}

    def stop_after(epoch, history):
        if epoch >= epochs:
            logged.update(history)
            raise _Enough

    try:
        fit(model, data, config, device, progress=False, on_epoch_end=stop_after,
            eval_name="val" if reference.get("eval_set") == "validation" else "test")
    except _Enough:
        pass
    rows, first = [], None
    for i in range(epochs):
        row = {"epoch": i + 1}
        for key in COMPARED:
            ours, theirs = logged[key][i], reference["history"][key][i]
            row[key] = {"reference": theirs, "repeat": ours}
            if ours != theirs and first is None:
                first = (i + 1, key)
        rows.append(row)
    return {"identical": first is None, "first_difference": first, "epochs": rows,
            "precision": precision, "model": model, "config": config}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("reference", help="a finished run's results JSON")
    p.add_argument("--epochs", type=int, default=2,
                   help="epochs to repeat and compare (default: 2; each costs a full epoch)")
    p.add_argument("--data", default=None,
                   help="the CIFAR-10 copy the run used (default: $CIFAR10_DATA)")
    p.add_argument("--device", default="cpu", help="(default: cpu)")
    p.add_argument("--out", default=None,
                   help="also write the verdict here as JSON; refused if the file exists")
    args = p.parse_args(argv)
    out = Path(args.out) if args.out else None
    if out is not None and out.exists():
        raise SystemExit(f"{out} exists; pick another --out (a check never replaces another)")
    if args.epochs < 1:
        raise SystemExit("--epochs must be at least 1")
    try:
        get_device(args.device)  # before the data loads: a missing GPU is said in one line
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    try:
        reference = load_results(args.reference)
        check_reference(reference, args.epochs)
        data = reference_data(reference, args.data)
        result = repeat(reference, data, args.epochs, args.device)
    except (DatasetError, RepeatError, ResultsFileError, OSError) as err:
        raise SystemExit(f"error: {err}") from None
    model, config = result.pop("model"), result.pop("config")
    hardware = hardware_info(args.device)
    verdict = ("identical: every loss and accuracy of the first "
               f"{args.epochs} epoch(s) equals the run's, to the last digit"
               if result["identical"] else
               "differs from epoch {} on ({})".format(*result["first_difference"]))
    print(f"{Path(args.reference).name}, {result['precision']}, on {hardware['cpu']} "
          f"({hardware.get('cpu_capability', hardware['device'])}"
          f"{', caps ' + str(hardware['isa_caps']) if hardware.get('isa_caps') else ''}): "
          f"{verdict}")
    for row in result["epochs"]:
        print(f"  epoch {row['epoch']}: " + ", ".join(
            f"{k} {row[k]['repeat']!r} vs {row[k]['reference']!r}" for k in COMPARED))
    if out is not None:
        save_json_atomic(out, {"reference": Path(args.reference).as_posix(),
                               "reference_hardware": reference["hardware"],
                               **result, **provenance(model, data, config, args.device)})
    return 0 if result["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
