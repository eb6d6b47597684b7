"""``eurotrain launch``: render a cluster profile and a training config into an sbatch script.

Everything that can be wrong is checked before anything is submitted (``request``), the script
is rendered from the checked plan (``script``), and the command line submits it (``cli``).

Two ways to start the ranks, both inside one sbatch allocation:
  srun      one task per GPU, CPU binding from the profile; ranks read SLURM_PROCID etc.
  torchrun  one task per node running torchrun with a c10d rendezvous on the first node.
"""

from eurotrain.launch.cli import main, parser, submit
from eurotrain.launch.request import JobFailedError, LaunchError, LaunchRequest, Plan, plan
from eurotrain.launch.script import render

__all__ = [
    "JobFailedError",
    "LaunchError",
    "LaunchRequest",
    "Plan",
    "main",
    "parser",
    "plan",
    "render",
    "submit",
]
