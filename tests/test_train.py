"""The trainer end to end on CPU: learning, multi-rank parity, accumulation, outputs, errors."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from multiproc import REPO, read_metrics, run_torchrun

from eurotrain import ConfigError, Trainer, load_config
from eurotrain.data.corpus import demo_documents
from eurotrain.optim import ScheduleConfig, lr_factor

TINY = REPO / "configs/tiny.yaml"


def tiny(tmp_path: Path, *overrides: str):
    return load_config(
        TINY, ["--train.output_dir", str(tmp_path), "--train.run_name", "run", *overrides]
    )


def test_loss_falls_clearly_within_100_steps(tmp_path: Path) -> None:
    # Short rows and one micro-batch of 8: the same lesson in a quarter of the time.
    short = [
        "--data.seq_len",
        "64",
        "--train.global_batch_size",
        "8",
        "--train.micro_batch_size",
        "8",
    ]
    result = Trainer(
        tiny(tmp_path, "--train.steps", "100", "--logging.log_interval", "20", *short)
    ).train()
    first, last = result.losses[0], sum(result.losses[-10:]) / 10
    assert first > 5.0  # ~ln(320): an untrained model
    assert last < 0.55 * first, (first, last)
    assert last < 3.0, result.losses[-10:]


def test_two_ranks_match_one_rank(tmp_path: Path) -> None:
    args = ["--train.steps", "5", "--train.output_dir", str(tmp_path)]
    ref = Trainer(tiny(tmp_path / "one", "--train.steps", "5")).train().losses
    proc = run_torchrun(2, [str(TINY), *args, "--train.run_name", "two"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = [m["loss"] for m in read_metrics(tmp_path / "two")]
    assert len(two) == 5
    for a, b in zip(ref, two):
        assert abs(a - b) <= 1e-5 * abs(a), (ref, two)
    assert "x cpu [dp_shard=2]" in proc.stdout


def test_gradient_accumulation_matches_one_big_micro_batch(tmp_path: Path) -> None:
    big = Trainer(tiny(tmp_path / "a", "--train.steps", "3")).train()
    small = Trainer(
        tiny(tmp_path / "b", "--train.steps", "3", "--train.micro_batch_size", "2")
    ).train()
    for a, b in zip(big.losses + big.grad_norms, small.losses + small.grad_norms):
        assert abs(a - b) <= 1e-5 * abs(a)


def test_run_directory_holds_resolved_config_and_metrics(tmp_path: Path) -> None:
    cfg = tiny(tmp_path, "--train.steps", "2", "--optim.lr", "1e-3")
    result = Trainer(cfg).train()
    assert result.run_dir == tmp_path / "run"
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert saved["optim"]["lr"] == 1e-3 and saved["model"]["num_kv_heads"] == 2
    assert load_config(result.run_dir / "config.yaml") == cfg
    rows = read_metrics(result.run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "tflops_per_device"):
        assert math.isfinite(rows[-1][key]), key
    assert rows[0]["tokens_seen"] == 16 * 128


def test_cli_and_module_entry_points_run_the_same_trainer(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "eurotrain"
    front = [str(script)] if script.exists() else [sys.executable, "-m", "eurotrain"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["--train.steps", "2", "--train.output_dir", str(tmp_path)]
    a = subprocess.run([*front, "train", str(TINY), *common, "--train.run_name", "a"],
                       capture_output=True, text=True, env=env, cwd=REPO)  # fmt: skip
    b = subprocess.run([sys.executable, "-m", "eurotrain.train", str(TINY), *common,
                        "--train.run_name", "b"], capture_output=True, text=True, env=env, cwd=REPO)  # fmt: skip
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert "step 2/2" in a.stdout and "step 2/2" in b.stdout  # plain lines: stdout is no TTY
    la = [r["loss"] for r in read_metrics(tmp_path / "a")]
    lb = [r["loss"] for r in read_metrics(tmp_path / "b")]
    assert la == lb


def test_cli_reports_config_errors_without_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "eurotrain", "train", str(TINY), "--optim.lrr", "1"],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "did you mean 'optim.lr'" in proc.stderr and "Traceback" not in proc.stderr


def test_progress_bar_mode(tmp_path: Path, capsys) -> None:
    Trainer(tiny(tmp_path, "--train.steps", "2", "--logging.progress", "bar")).train()
    out = capsys.readouterr().out
    assert "\r[" in out and "2/2" in out and "eta" in out


def test_wandb_offline_run_is_written(tmp_path: Path) -> None:
    result = Trainer(tiny(tmp_path, "--train.steps", "2", "--logging.wandb", "true")).train()
    runs = list((result.run_dir / "wandb").glob("offline-run-*"))
    assert runs, list(result.run_dir.rglob("*"))


def test_hf_tokenizer_from_local_files(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    corpus = tmp_path / "text.txt"
    corpus.write_text("".join(demo_documents(100_000)))
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train(
        [str(corpus)],
        trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|endoftext|>"]),
    )
    tok.save(str(tmp_path / "tokenizer.json"))
    cfg = tiny(tmp_path, "--train.steps", "2", "--data.tokenizer", str(tmp_path / "tokenizer.json"),
               "--data.corpus", str(corpus), "--data.seq_len", "32")  # fmt: skip
    trainer = Trainer(cfg)
    assert trainer.tokenizer.eos_id == 1 and trainer.tokenizer.vocab_size <= 300
    assert len(trainer.train().losses) == 2


def test_bad_data_inputs_fail_before_the_model(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data.corpus: '/nonexistent/x' is not a file"):
        Trainer(tiny(tmp_path, "--data.corpus", "/nonexistent/x"))
    with pytest.raises(ConfigError, match=r"data.tokenizer: '/nonexistent/tok' does not exist"):
        Trainer(tiny(tmp_path, "--data.tokenizer", "/nonexistent/tok"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    with pytest.raises(ConfigError, match=r"holds no text"):
        Trainer(tiny(tmp_path, "--data.corpus", str(empty)))
    with pytest.raises(ConfigError, match=r"has 257 tokens but model.vocab_size is 200"):
        Trainer(tiny(tmp_path, "--model.vocab_size", "200"))
    small = tmp_path / "small.txt"
    small.write_text("x" * 500)
    with pytest.raises(ConfigError, match=r"fewer than one global batch"):
        Trainer(tiny(tmp_path, "--data.corpus", str(small)))


def test_schedules() -> None:
    cos = ScheduleConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(cos, 0, 100) == pytest.approx(1 / 11)
    assert lr_factor(cos, 10, 100) == pytest.approx(1.0)
    assert lr_factor(cos, 55, 100) == pytest.approx(0.55)
    assert lr_factor(cos, 100, 100) == pytest.approx(0.1)
    wsd = ScheduleConfig(name="wsd", warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_factor(wsd, 50, 100) == 1.0 and lr_factor(wsd, 79, 100) == 1.0
    assert lr_factor(wsd, 90, 100) == pytest.approx(0.5)
    sqrt = ScheduleConfig(
        name="wsd", warmup_steps=0, decay_fraction=0.5, decay_shape="sqrt", min_lr_ratio=0.0
    )
    assert lr_factor(sqrt, 75, 100) == pytest.approx(1 - math.sqrt(0.5))
    assert lr_factor(ScheduleConfig(name="constant", warmup_steps=0), 99, 100) == 1.0


def test_run_log_says_which_kernels_run(tmp_path: Path) -> None:
    """Asked for Triton on a CPU without the interpreter: the log says the references run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "eurotrain.train", str(TINY), "--model.kernels", "triton",
         "--train.steps", "1", "--train.output_dir", str(tmp_path)],
        capture_output=True, text=True, env=env, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "'triton' kernels requested but" in proc.stdout
    assert "using the PyTorch references" in proc.stdout


def test_resumed_run_logs_each_step_once_with_the_resumed_values(tmp_path: Path) -> None:
    """Saved at step 3, crashed after step 5, resumed: steps 4 and 5 ran twice, metrics.jsonl
    keeps each step once, with the values of the run that went on."""
    from checkpoint.ckpt_common import Interrupt, StopAfter

    args = ("--train.steps", "7", "--checkpoint.interval", "3", "--checkpoint.async_save", "false")
    crashed = Trainer(tiny(tmp_path, *args))
    crashed.callbacks.append(StopAfter(5))
    with pytest.raises(Interrupt):
        crashed.train()
    with (tmp_path / "run" / "metrics.jsonl").open("a") as f:
        f.write('{"note": "a record without a step is kept"}\n')
    resumed = Trainer(tiny(tmp_path, *args))
    resumed.resume()
    assert resumed.state.step == 3
    losses = resumed.train().losses
    rows = read_metrics(tmp_path / "run")
    assert [r.get("step") for r in rows] == [1, 2, 3, None, 4, 5, 6, 7]
    assert [r["loss"] for r in rows if r.get("step", 0) > 3] == losses


def test_run_directory_is_never_group_or_world_writable_even_with_umask_0(tmp_path: Path) -> None:
    """umask 000 (a careless login shell): the run directory, config.yaml, metrics.jsonl, the
    checkpoints and wandb's offline files are still writable by their owner only."""
    code = (
        "import os, sys; os.umask(0); from eurotrain.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    proc = subprocess.run(
        [sys.executable, "-c", code, "train", str(TINY), "--train.steps", "2",
         "--train.output_dir", str(tmp_path / "runs"), "--train.run_name", "run",
         "--checkpoint.interval", "1", "--logging.wandb", "true"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    paths = [tmp_path / "runs", *(tmp_path / "runs").rglob("*")]
    assert any(p.name == "metrics.jsonl" for p in paths) and any("wandb" in p.parts for p in paths)
    loose = {str(p): oct(p.stat().st_mode & 0o777) for p in paths if p.stat().st_mode & 0o022}
    assert not loose, loose


def test_deterministic_sets_the_cublas_workspace_before_anything_else(
    tmp_path: Path, monkeypatch
) -> None:
    """Without CUBLAS_WORKSPACE_CONFIG deterministic mode raises at the first CUDA matmul."""
    # setenv then delenv: the variable is absent during the test and removed again after it.
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    bad_corpus = ["--data.corpus", str(tmp_path / "missing.txt")]  # stops before the model
    try:
        with pytest.raises(ConfigError, match=r"data\.corpus"):
            Trainer(tiny(tmp_path, "--train.deterministic", "true", *bad_corpus))
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert torch.are_deterministic_algorithms_enabled()
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # a user's choice is kept
        with pytest.raises(ConfigError, match=r"data\.corpus"):
            Trainer(tiny(tmp_path, "--train.deterministic", "true", *bad_corpus))
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    finally:
        torch.use_deterministic_algorithms(False)
