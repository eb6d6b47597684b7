"""Which launcher started this process, read from the environment (eurotrain.distributed)."""

from __future__ import annotations

import pytest

from eurotrain.distributed import _rendezvous, detect, first_host, slurm_master_port

LAUNCH_VARS = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "EUROTRAIN_BOOTSTRAP",
    "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_STEP_ID", "SLURM_JOB_ID",
    "SLURM_JOB_NODELIST", "SLURM_STEP_NODELIST", "PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS", "MV2_COMM_WORLD_RANK",
    "MV2_COMM_WORLD_SIZE",
)  # fmt: skip


@pytest.fixture
def clean(monkeypatch):
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_single_process(clean):
    assert detect() == (0, 0, 1, "single")


def test_torchrun_variables(clean):
    clean.setenv("RANK", "3")
    clean.setenv("WORLD_SIZE", "8")
    clean.setenv("LOCAL_RANK", "1")
    assert detect() == (3, 1, 8, "torchrun")


def test_srun_task_variables(clean):
    for k, v in dict(SLURM_STEP_ID="0", SLURM_PROCID="5", SLURM_NTASKS="8", SLURM_LOCALID="1",
                     SLURM_JOB_ID="123456", SLURM_JOB_NODELIST="gpu[07-08]").items():  # fmt: skip
        clean.setenv(k, v)
    assert detect() == (5, 1, 8, "slurm")
    clean.setenv("PATH", "/nonexistent")  # no scontrol: the parser reads the node list
    _rendezvous("slurm", 5)
    import os

    assert os.environ["MASTER_ADDR"] == "gpu07"
    assert os.environ["MASTER_PORT"] == str(slurm_master_port(123456)) == "23456"


def test_batch_shell_is_not_a_rank(clean):
    # The sbatch script itself has SLURM_PROCID/SLURM_NTASKS but is no srun step.
    clean.setenv("SLURM_PROCID", "0")
    clean.setenv("SLURM_NTASKS", "8")
    assert detect() == (0, 0, 1, "single")


def test_srun_pmi2_does_not_need_mpi(clean):
    for k, v in dict(SLURM_STEP_ID="0", SLURM_PROCID="1", SLURM_NTASKS="2", PMI_RANK="1",
                     PMI_SIZE="2").items():  # fmt: skip
        clean.setenv(k, v)
    assert detect()[3] == "slurm"


def test_forced_bootstrap_validated(clean):
    clean.setenv("EUROTRAIN_BOOTSTRAP", "pmix")
    with pytest.raises(ValueError, match="torchrun, mpi, slurm or single"):
        detect()
    clean.setenv("EUROTRAIN_BOOTSTRAP", "slurm")
    with pytest.raises(ValueError, match="SLURM_PROCID"):
        detect()


@pytest.mark.parametrize(
    "nodelist, host",
    [("node[1-2]", "node1"), ("gpu[07-09,12],login1", "gpu07"), ("lrdn0001", "lrdn0001"),
     ("nid[005001-005004]-hsn", "nid005001-hsn"), ("a1,b2", "a1")],
)  # fmt: skip
def test_first_host(nodelist, host):
    assert first_host(nodelist) == host
