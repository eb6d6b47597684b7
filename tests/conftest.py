from __future__ import annotations

import os
import sys
from pathlib import Path

# Tests run single-threaded per process: several ranks share 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Triton kernels run through the CPU interpreter (read when kernels are decorated).
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
sys.path.insert(0, str(Path(__file__).parent))
