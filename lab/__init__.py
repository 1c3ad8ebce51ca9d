"""The lab: everything that serves the studies, beside the course.

The course (the top-level modules and the notebooks) never imports this package; the lab
imports the course and extends it. Every tool runs from the repository's root as a module:

    python -m lab.sweep --norms batch layer group --seeds 0 1 2 --out-dir results
    python -m lab.tune --grid round2-cpu --jobs 2 --precision fp32
    python -m lab.report [--check]
    python -m lab.bench
    python -m lab.first_epoch --device cuda
    python -m lab.repeat results/batch_seed0.json
    python -m lab.gpu_check --data cifar10-jpeg.tar.gz
    bash lab/gpu_grid.sh round2-gpu                       # a grid on a lent GPU, one call
    python -m lab.make_notebooks
"""
