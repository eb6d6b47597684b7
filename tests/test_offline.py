"""Offline readiness: every profile without known internet runs offline; `eurotrain doctor`
names what is not local or not offline; and a run, and the doctor, succeed with the network
blocked for the process (name lookups and connections beyond this host refused and recorded,
proxy variables pointing at an unroutable address) without a single attempt to go online."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from eurotrain import offline
from eurotrain.clusters import known_clusters, load_profile
from eurotrain.config import load_config

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


def test_profiles_without_known_internet_export_the_offline_variables():
    for name in known_clusters():
        profile = load_profile(name)
        if profile.internet_on_compute or profile.accelerator.vendor == "cpu":
            continue
        env = {**profile.env, **profile.comm.env}
        missing = {k: v for k, v in offline.OFFLINE_ENV.items() if env.get(k) != v}
        assert not missing, f"{name}: {missing}"


@pytest.fixture
def clean_env(monkeypatch):
    for name in offline.OFFLINE_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_env_check(clean_env):
    mn5, lumi = load_profile("mn5-acc"), load_profile("lumi-g")
    status, message, fix = offline.check_env(mn5, in_job=True)
    assert status == "FAIL" and "HF_HUB_OFFLINE" in message and "no internet" in message
    assert "export HF_HUB_OFFLINE=1" in fix and "export WANDB_MODE=offline" in fix
    assert offline.check_env(mn5, in_job=False).status == "WARN"  # a login node
    assert offline.check_env(None, in_job=True).status == "WARN"  # unknown machine
    assert offline.check_env(lumi, in_job=True).status == "PASS"  # LUMI reaches the internet
    for name, value in offline.OFFLINE_ENV.items():
        clean_env.setenv(name, value.upper())
    assert offline.check_env(mn5, in_job=True).status == "PASS"


def test_paths_check(tmp_path):
    def check(*overrides: str) -> offline.Finding:
        return offline.check_paths(load_config(TINY, list(overrides)), load_profile("mn5-acc"))

    assert check().status == "PASS"
    hub = check("--data.tokenizer", "meta-llama/Llama-3.1-8B")
    assert hub.status == "FAIL" and "Hugging Face Hub name" in hub.message
    assert "huggingface-cli download" in hub.fix
    url = check("--data.corpus", "https://example.org/c.txt")
    assert url.status == "FAIL" and "is a URL" in url.message
    nothing = check("--data.corpus", str(tmp_path / "*.jsonl"))
    assert nothing.status == "FAIL" and "matches no files" in nothing.message
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    assert check("--data.corpus", str(tmp_path / "*.jsonl")).status == "PASS"
    online = check("--logging.wandb", "true", "--logging.wandb_mode", "online")
    assert online.status == "FAIL" and "wandb_mode: online" in online.message


def test_blocked_network_refuses_and_records_but_keeps_this_host():
    tried: list[str] = []
    with offline.network_blocked(tried):
        with pytest.raises(offline.NetworkBlocked, match=r"name lookup of pypi\.org"):
            socket.getaddrinfo("pypi.org", 443)
        with socket.socket() as s, pytest.raises(offline.NetworkBlocked):
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: never routed
        with socket.socket() as server, socket.socket() as client:  # loopback stays
            server.bind(("127.0.0.1", 0))
            server.listen(1)
            client.connect(server.getsockname())
    assert tried == ["name lookup of pypi.org", "connection to ('192.0.2.1', 9)"]
    assert socket.getaddrinfo("localhost", 80)  # undone


# ---- a run and the doctor, with the network blocked ----------------------------------------
GUARD = """
import os, pathlib
from eurotrain.offline import block_network
record = pathlib.Path(os.environ["EUROTRAIN_TEST_NET_RECORD"])
block_network(lambda what: record.open("a").write(what + "\\n"))
"""


@pytest.fixture
def blocked_env(tmp_path) -> tuple[dict[str, str], Path]:
    """A subprocess environment in which every Python process blocks the network from its
    first line (sitecustomize) and proxies point nowhere; HF/W&B variables deliberately not
    set, so the code itself must not go online."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(GUARD)
    record = tmp_path / "network-attempts.txt"
    env = {k: v for k, v in os.environ.items() if k not in offline.OFFLINE_ENV}
    nowhere = "http://192.0.2.1:9"  # TEST-NET-1
    env.update({
        "PYTHONPATH": f"{site}{os.pathsep}{REPO}", "EUROTRAIN_TEST_NET_RECORD": str(record),
        "HTTP_PROXY": nowhere, "HTTPS_PROXY": nowhere, "ALL_PROXY": nowhere,
        "http_proxy": nowhere, "https_proxy": nowhere, "NO_PROXY": "", "no_proxy": "",
        "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "WANDB_SILENT": "true",
    })  # fmt: skip
    return env, record


def test_training_and_doctor_need_no_network(tmp_path, blocked_env):
    from data.corpora import make_documents, train_bpe

    env, record = blocked_env
    tok = train_bpe(tmp_path / "tok", make_documents(200, seed=1))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(make_documents(200, seed=2)))
    config = tmp_path / "run.yaml"
    config.write_text(
        f"base: {TINY}\n"
        f"data: {{tokenizer: {tok}, corpus: {corpus}, seq_len: 32}}\n"
        f"model: {{vocab_size: 448, max_seq_len: 64}}\n"
        f"train: {{steps: 2, output_dir: {tmp_path / 'runs'}}}\n"
        f"logging: {{wandb: true, wandb_mode: offline, progress: lines}}\n"
    )
    run = subprocess.run(
        [sys.executable, "-m", "eurotrain", "train", str(config)],
        cwd=tmp_path, env={**env, "WANDB_MODE": "offline"}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "step 2/2" in run.stdout
    assert list((tmp_path / "runs").rglob("offline-run-*")), "wandb wrote no offline run"
    doctor = subprocess.run(
        [sys.executable, "-m", "eurotrain", "doctor", "--cluster", "mn5-acc", "--config",
         str(config), "--checkpoint-dir", str(tmp_path / "ck"), "--wandb-dir", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    out = doctor.stdout
    assert "[PASS] offline paths" in out, out + doctor.stderr
    assert "[PASS] offline load: tokenizer" in out and "loads with the network blocked" in out
    assert "[WARN] offline env" in out and "export HF_HUB_OFFLINE=1" in out  # not set here
    attempts = record.read_text() if record.exists() else ""
    assert attempts == "", f"code tried the network:\n{attempts}"


def test_doctor_fails_on_a_hub_tokenizer_without_trying_the_hub(tmp_path, blocked_env):
    env, record = blocked_env
    config = tmp_path / "hub.yaml"
    config.write_text(f"base: {TINY}\ndata: {{tokenizer: meta-llama/Llama-3.1-8B}}\n")
    doctor = subprocess.run(
        [sys.executable, "-m", "eurotrain", "doctor", "--cluster", "mn5-acc", "--config",
         str(config), "--checkpoint-dir", str(tmp_path / "ck"), "--wandb-dir", str(tmp_path)],
        cwd=tmp_path, env={**env, **offline.OFFLINE_ENV}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    out = doctor.stdout
    assert doctor.returncode == 1 and "[PASS] offline env" in out, out + doctor.stderr
    assert "[FAIL] offline paths: data.tokenizer: meta-llama/Llama-3.1-8B does not exist" in out
    assert "huggingface-cli download" in out
    assert not record.exists(), record.read_text()
