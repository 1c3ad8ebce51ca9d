"""train.py with the lab's network and loop: every flag of train.py, plus one per study switch
of lab/levers.py (--identity-init, --skips, --ema, --whiten, ...); the studies' tools run this.

    python -m lab.train --norm layer --weight-std --validation
"""

import train
from train import CHOICES

from lab.levers import (IDENTITY_INITS, SKIP_LAYOUTS, WHITEN_MODES, LabModelConfig, LabNet,
                        LabTrainConfig)

DESCRIPTION = f"{__doc__}\n{train.__doc__}"  # --help: this module's use, then train.py's
LAB_CONFIGS = (LabModelConfig, LabTrainConfig)
LAB_CHOICES = {**CHOICES, "identity_init": lambda: IDENTITY_INITS,
               "skips": lambda: list(SKIP_LAYOUTS), "whiten": lambda: WHITEN_MODES}


def parse_args(argv=None):
    return train.parse_args(argv, LAB_CONFIGS, LAB_CHOICES, DESCRIPTION)


def configs_from(args):
    return train.configs_from(args, LAB_CONFIGS)


def main(argv=None):
    return train.main(argv, net=LabNet, configs=LAB_CONFIGS, choices=LAB_CHOICES,
                      description=DESCRIPTION)


if __name__ == "__main__":
    train.command_line(main)
