"""Run train.py for every (normalization, seed) pair, skipping runs whose results file exists.

    python tools/sweep.py --norms batch layer group --seeds 0 1 2 --out-dir results

Each run is its own process and writes its results file when it finishes, and each resumes from
its checkpoint, so an interrupted sweep picks up where it stopped when started again.
"""

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model import canonical_norm  # noqa: E402
from train import run_name  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--norms", nargs="+", default=["batch", "layer", "group"],
                   help="variants to run (default: batch layer group)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                   help="seeds to run (default: 0 1 2)")
    p.add_argument("--out-dir", default="runs", help="results folder (default: runs)")
    p.add_argument("--images-dir", default="runs",
                   help="figure folder (default: runs; images/ keeps the notebooks' seed-0 runs)")
    args, train_args = p.parse_known_args()  # anything else goes to train.py as it is

    for seed in args.seeds:
        for norm in args.norms:
            out = Path(args.out_dir) / f"{run_name(canonical_norm(norm), seed)}.json"
            if out.exists():
                print(f"skip {out}: already done", flush=True)
                continue
            cmd = [sys.executable, str(ROOT / "train.py"), "--norm", norm, "--seed", str(seed),
                   "--out-dir", args.out_dir, "--images-dir", args.images_dir, "--resume",
                   "--no-progress", *train_args]
            print("+", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
