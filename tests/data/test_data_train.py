"""End to end: prepare two corpora with the CLI, then train the tiny model on their blend with
a periodic validation loss, through the real command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .corpora import make_documents, write_text_files

REPO = Path(__file__).resolve().parents[2]


def run(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True
    )


def test_prepare_then_train_tiny_model_on_blend(tmp_path):
    for name, seed in (("en", 0), ("de", 1)):
        folder = write_text_files(tmp_path / f"in-{name}", make_documents(150, seed))
        p = run(["eurotrain", "data", "prepare", "--input", str(folder), "--tokenizer", "byte",
                 "--output", str(tmp_path / name), "--workers", "1"])  # fmt: skip
        assert p.returncode == 0, p.stderr
    sources = f"[{{path: {tmp_path / 'en'}, weight: 3}}, {{path: {tmp_path / 'de'}, weight: 1}}]"
    p = run(["eurotrain.train", "configs/tiny.yaml", "--data.sources", sources,
             "--data.validation_fraction", "0.05", "--train.steps", "4",
             "--train.eval_interval", "2", "--train.eval_batches", "2",
             "--train.output_dir", str(tmp_path / "runs"), "--train.run_name", "r",
             "--logging.log_interval", "1"])  # fmt: skip
    assert p.returncode == 0, p.stderr
    records = [
        json.loads(x) for x in (tmp_path / "runs/r/metrics.jsonl").read_text().split("\n") if x
    ]
    losses = [r["loss"] for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert [r["step"] for r in val] == [2, 4] and val[1]["val_loss"] < val[0]["val_loss"]


def test_train_refuses_missing_prepared_data_before_building_a_model(tmp_path):
    p = run(["eurotrain.train", "configs/tiny.yaml", "--data.sources",
             f"[{{path: {tmp_path / 'nope'}}}]"])  # fmt: skip
    assert p.returncode == 2
    assert "holds no manifest.json" in p.stderr and "eurotrain data prepare" in p.stderr
