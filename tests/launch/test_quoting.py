"""User text in a rendered job is data, never shell: every option, config path and override is
run through the real script (bash, with stub srun/scontrol/module/apptainer on PATH that record
their argv) and must reach the ranks' command byte for byte, with no command substituted, no
variable expanded and no line added; what sbatch or bash would misread is refused by name."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from eurotrain.cli import main as cli_main
from eurotrain.distributed import slurm_master_port
from eurotrain.errors import EurotrainError

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
JOB_ID = 1234

# Each payload would run `touch MARKER-...` (or expand $HOME) if it reached the shell unquoted or
# inside double quotes; none contains '/', so each can also be a file name.
PAYLOADS = {
    "subst": "$(touch MARKER-subst)",
    "backtick": "`touch MARKER-tick`",
    "semicolon": "x;touch MARKER-semi",
    "quote": "it's",
    "dquote": 'say "hi" "$(touch MARKER-dq)"',
    "space": "two words",
    "home": "$HOME",
    "backslash": "back\\slash\\$(touch MARKER-bs)",
    "mix": "'\"$(touch MARKER-mix)`touch MARKER-mix2`;$HOME\\ ${HOME}x",
    # No space, quote, backslash or '#': sbatch takes it as one word, bash must never run it.
    "nospace": "$(touch${IFS}MARKER-ifs);touch${IFS}MARKER-ifs2`touch${IFS}MARKER-ifs3`&&$HOME",
}
CONTROL = {"newline": "a\nb", "cr": "a\rb", "nul": "a\x00b", "tab": "a\tb", "escape": "a\x1bb"}


def _stub(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)
    return path


def _recorder(path: Path, record: Path) -> Path:
    """A program that writes its argv, NUL-separated, to `record`."""
    return _stub(path, f"printf '%s\\0' \"$@\" > {shlex.quote(str(record))}\n")


@pytest.fixture
def sandbox(tmp_path):
    """bin/ with stub SLURM and container commands, work/ to submit from, home/ for $HOME."""
    bin_dir, work, home, rec = (tmp_path / d for d in ("bin", "work", "home", "rec"))
    for d in (bin_dir, work, home, rec):
        d.mkdir()
    # srun records its own argv, drops its --options and runs the rest (one "task").
    _stub(
        bin_dir / "srun",
        f"printf '%s\\0' \"$@\" > {shlex.quote(str(rec / 'srun'))}\n"
        'while [ $# -gt 0 ] && [ "${1#--}" != "$1" ]; do shift; done\nexec "$@"\n',
    )
    _stub(
        bin_dir / "scontrol",
        'case "$2" in hostnames) echo node1; echo node2;;\n'
        '  node) echo "NodeName=$3 Arch=x86_64 NodeAddr=127.0.0.1 NodeHostName=$3";; esac\n',
    )
    _stub(bin_dir / "module", "exit 0\n")
    for runtime in ("apptainer", "singularity"):
        _recorder(bin_dir / runtime, rec / "container")
    return tmp_path


def _config(sandbox: Path, name: str, values: dict[str, str] | None = None) -> str:
    """A config for 2 nodes x 2 (or more) ranks, at work/NAME; returns its path relative to work."""
    values = values or {}
    text = (
        f"base: {TINY}\n"
        f"model: {{name: {_yaml(values.get('model.name', 'tiny'))}}}\n"
        f"data: {{corpus: {_yaml(values.get('data.corpus', 'demo'))}}}\n"
        f"train: {{run_name: {_yaml(values.get('train.run_name', ''))}, global_batch_size: 64, "
        f"micro_batch_size: 1}}\n"
    )
    (sandbox / "work" / name).write_text(text)
    return name


def _yaml(value: str) -> str:
    return json.dumps(value)  # a YAML double-quoted scalar: escapes keep control characters


def _launch(
    monkeypatch, capsys, sandbox: Path, *args: str, clusters: Path | None = None
) -> tuple[int, str, str]:
    monkeypatch.chdir(sandbox / "work")
    if clusters is None:
        monkeypatch.delenv("EUROTRAIN_CLUSTERS", raising=False)
    else:
        monkeypatch.setenv("EUROTRAIN_CLUSTERS", str(clusters))
    rc = cli_main(["launch", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _run_script(sandbox: Path, script: str) -> subprocess.CompletedProcess:
    path = sandbox / "job.sbatch"
    path.write_text(script)
    env = {
        "PATH": f"{sandbox / 'bin'}:/usr/bin:/bin",
        "HOME": str(sandbox / "home"),
        "USER": "tester",
        "SLURM_JOB_ID": str(JOB_ID),
        "SLURM_JOB_NODELIST": "node[1-2]",
        "SLURM_JOB_NUM_NODES": "2",
    }
    return subprocess.run(
        ["bash", str(path)], cwd=sandbox / "work", env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip


def _argv(path: Path) -> list[str]:
    return path.read_bytes().decode().split("\0")[:-1]


def _markers(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("MARKER*"))


def _header(script: str) -> list[str]:
    """The #SBATCH lines, checking that they form one comment block after the #! line (sbatch
    reads options only up to the first command)."""
    lines = script.splitlines()
    block = lines[1 : lines.index("")]
    assert all(line.startswith("#") for line in block), block
    return [line for line in block if line.startswith("#SBATCH")]


def _sbatch_words(line: str) -> list[str]:
    """How sbatch splits a #SBATCH line into arguments: whitespace separates, quotes group and
    are removed, a backslash escapes, an unescaped '#' starts a comment."""
    words: list[str] = []
    word: list[str] = []
    started = escaped = False
    quote = ""
    for ch in line.removeprefix("#SBATCH"):
        if escaped:
            word.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = started = True
        elif quote:
            if ch == quote:
                quote = ""
            else:
                word.append(ch)
        elif ch in "'\"":
            quote, started = ch, True
        elif ch == "#":
            break
        elif ch.isspace():
            if started:
                words.append("".join(word))
            word, started = [], False
        else:
            word.append(ch)
            started = True
    if started:
        words.append("".join(word))
    return words


# ---- payloads reach the ranks as literal text -------------------------------------------
@pytest.mark.parametrize("payload", list(PAYLOADS.values()), ids=list(PAYLOADS))
def test_srun_rank_gets_payloads_literally(payload, sandbox, monkeypatch, capsys):
    rank_record = sandbox / "rec" / "rank"
    python = _recorder(sandbox / "bin" / f"py-{payload}", rank_record)
    config = _config(sandbox, f"cfg-{payload}.yaml")
    overrides = ["--train.run_name", payload, "--data.corpus", payload, "--model.name", payload]
    rc, script, err = _launch(
        monkeypatch, capsys, sandbox, "--cluster", "local", "--nodes", "2", "--time", "00:10:00",
        "--python", str(python), "--dry-run", config, *overrides,
    )  # fmt: skip
    assert rc == 0, err
    done = _run_script(sandbox, script)
    assert done.returncode == 0, done.stderr
    assert _markers(sandbox) == []
    expected = ["-m", "eurotrain.train", config, "--train.device", "cpu", *overrides]
    assert _argv(rank_record) == expected
    assert _argv(sandbox / "rec" / "srun")[-len(expected) - 1 :] == [str(python), *expected]


@pytest.mark.parametrize("payload", list(PAYLOADS.values()), ids=list(PAYLOADS))
def test_cpu_bind_reaches_srun_literally(payload, sandbox, monkeypatch, capsys):
    python = _recorder(sandbox / "bin" / "py", sandbox / "rec" / "rank")
    rc, script, err = _launch(
        monkeypatch, capsys, sandbox, "--cluster", "local", "--nodes", "2", "--time", "00:10:00",
        "--python", str(python), "--cpu-bind", payload, "--dry-run", _config(sandbox, "c.yaml"),
    )  # fmt: skip
    assert rc == 0, err
    done = _run_script(sandbox, script)
    assert done.returncode == 0, done.stderr
    assert _markers(sandbox) == []
    assert f"--cpu-bind={payload}" in _argv(sandbox / "rec" / "srun")


@pytest.mark.parametrize("payload", list(PAYLOADS.values()), ids=list(PAYLOADS))
@pytest.mark.parametrize("cluster", ["local", "mn5-acc", "lumi-g"])
def test_torchrun_in_container_gets_payloads_literally(
    cluster, payload, sandbox, monkeypatch, capsys
):
    config = _config(sandbox, f"cfg-{payload}.yaml")
    overrides = ["--train.run_name", payload, f"--data.corpus={payload}"]
    rc, script, err = _launch(
        monkeypatch, capsys, sandbox, "--cluster", cluster, "--nodes", "2", "--time", "00:10:00",
        "--account", "acct", "--launcher", "torchrun", "--container", payload,
        "--python", payload, "--dry-run", config, *overrides,
    )  # fmt: skip
    assert rc == 0, err
    done = _run_script(sandbox, script)
    assert done.returncode == 0, done.stderr
    assert _markers(sandbox) == []
    argv = _argv(sandbox / "rec" / "container")
    # The container runtime gets: exec, the profile's flags and binds, the image, the rest.
    image_at = argv.index(payload)
    assert argv[0] == "exec" and argv[image_at + 1] == payload  # the image, then python
    rest = argv[image_at + 2 :]
    head = "127.0.0.1" if cluster == "local" else "node1"
    assert rest[:16] == [
        "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", rest[5],
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{head}:{slurm_master_port(JOB_ID)}",
        "--rdzv-id", str(JOB_ID), "--max-restarts", "0", "-m", "eurotrain.train",
    ]  # fmt: skip
    assert rest[16] == config and rest[-len(overrides) :] == overrides


@pytest.mark.parametrize("payload", list(PAYLOADS.values()), ids=list(PAYLOADS))
def test_config_values_never_reach_the_shell(payload, sandbox, monkeypatch, capsys):
    """model.name is the default job name; the others travel inside the config file only."""
    values = {"model.name": payload, "data.corpus": payload, "train.run_name": payload}
    config = _config(sandbox, "cfg.yaml", values)
    python = _recorder(sandbox / "bin" / "py", sandbox / "rec" / "rank")
    rc, script, err = _launch(
        monkeypatch, capsys, sandbox, "--cluster", "local", "--nodes", "2", "--time", "00:10:00",
        "--python", str(python), "--dry-run", config,
    )  # fmt: skip
    assert rc == 0, err
    (job_name,) = (line for line in _header(script) if line.startswith("#SBATCH --job-name="))
    name = job_name.removeprefix("#SBATCH --job-name=")
    assert name.startswith("eurotrain-") and _sbatch_words(job_name) == [f"--job-name={name}"]
    assert all(c.isalnum() or c in "._-" for c in name), name
    done = _run_script(sandbox, script)
    assert done.returncode == 0, done.stderr
    assert _markers(sandbox) == []
    assert _argv(sandbox / "rec" / "rank") == ["-m", "eurotrain.train", config, "--train.device",
                                               "cpu"]  # fmt: skip


# ---- #SBATCH values: one argument each, or refused by name --------------------------------
SBATCH_SPECIAL = " '\"\\#"  # what sbatch's own #SBATCH parser splits at, unquotes or stops at


@pytest.mark.parametrize("payload", list(PAYLOADS.values()), ids=list(PAYLOADS))
@pytest.mark.parametrize(
    "option, rendered",
    [("--account", "--account={}"), ("--job-name", "--job-name={}"),
     ("--log-dir", "--output={}/%x-%j.out")],
)  # fmt: skip
def test_sbatch_values_are_one_word_or_refused(
    option, rendered, payload, sandbox, monkeypatch, capsys
):
    config = _config(sandbox, "cfg.yaml")
    python = _recorder(sandbox / "bin" / "py", sandbox / "rec" / "rank")
    rc, script, err = _launch(
        monkeypatch, capsys, sandbox, "--cluster", "local", "--nodes", "2", "--time", "00:10:00",
        "--python", str(python), option, payload, "--dry-run", config,
    )  # fmt: skip
    bad = [c for c in payload if c in SBATCH_SPECIAL] + (
        ["/"] if option == "--job-name" and "/" in payload else []
    )
    if bad:
        assert rc == 2 and script == "", script
        assert err.startswith(f"eurotrain launch: error: {option} {payload!r}: contains "), err
        assert err.count("\n") == 1
        return
    assert rc == 0, err
    expected = rendered.format(payload.replace("%", "%%") if option == "--log-dir" else payload)
    key = expected.split("=")[0] + "="
    lines = [line for line in _header(script) if _sbatch_words(line)[0].startswith(key)]
    assert [_sbatch_words(line) for line in lines] == [[expected]]
    done = _run_script(sandbox, script)
    assert done.returncode == 0, done.stderr
    assert _markers(sandbox) == []


def test_percent_in_the_log_dir_is_literal(sandbox, monkeypatch, capsys):
    config = _config(sandbox, "cfg.yaml")
    rc, script, err = _launch(
        monkeypatch, capsys, sandbox, "--cluster", "local", "--nodes", "2", "--time", "00:10:00",
        "--log-dir", "logs/100%j", "--dry-run", config,
    )  # fmt: skip
    assert rc == 0, err
    assert "#SBATCH --output=logs/100%%j/%x-%j.out" in script.splitlines()


@pytest.mark.parametrize("value", [*CONTROL.values(), "", "has space", "a'b", 'a"b', "a\\b",
                                   "a#b"], ids=[*CONTROL, "empty", "space", "quote", "dquote",
                                                "backslash", "hash"])  # fmt: skip
@pytest.mark.parametrize("option", ["--account", "--job-name", "--log-dir", "--partition"])
def test_bad_sbatch_values_are_refused_by_name(option, value, sandbox, monkeypatch, capsys):
    config = _config(sandbox, "cfg.yaml")
    rc, out, err = _launch(
        monkeypatch, capsys, sandbox, "--cluster", "mn5-acc", "--nodes", "2", "--time", "00:10:00",
        "--account", "acct", option, value, "--dry-run", config,
    )  # fmt: skip
    assert rc == 2 and out == ""
    assert err.startswith(f"eurotrain launch: error: {option} {value!r}: "), err
    assert err.count("\n") == 1  # one line, whatever the value held
    if value == "a\nb":
        assert "contains a newline; #SBATCH values must be one line" in err


def test_slash_in_the_job_name_is_refused(sandbox, monkeypatch, capsys):
    config = _config(sandbox, "cfg.yaml")
    rc, out, err = _launch(
        monkeypatch, capsys, sandbox, "--cluster", "local", "--nodes", "2", "--time", "00:10:00",
        "--job-name", "a/b", "--dry-run", config,
    )  # fmt: skip
    assert rc == 2 and out == "" and "--job-name 'a/b': contains '/'" in err and "%x" in err


# ---- control characters in the rank command ----------------------------------------------
@pytest.mark.parametrize("value", list(CONTROL.values()), ids=list(CONTROL))
@pytest.mark.parametrize(
    "where", ["--python", "--container", "--cpu-bind", "config", "override", "model.name"]
)
def test_control_characters_are_refused_by_name(where, value, sandbox, monkeypatch, capsys):
    config = _config(sandbox, "cfg.yaml", {"model.name": value} if where == "model.name" else {})
    args = ["--cluster", "local", "--nodes", "2", "--time", "00:10:00", "--dry-run"]
    name = {"--python": "--python", "--container": "--container", "--cpu-bind": "--cpu-bind",
            "config": "config", "override": "config override",
            "model.name": "model.name"}[where]  # fmt: skip
    if where in ("--python", "--container", "--cpu-bind"):
        args += [where, value, config]
    elif where == "config":
        args += [config + value]
    elif where == "override":
        args += [config, "--train.run_name", value]
    else:
        args += [config]
    rc, out, err = _launch(monkeypatch, capsys, sandbox, *args)
    assert rc == 2 and out == "", err
    shown = config + value if where == "config" else value
    assert f"{name} {shown!r}: contains " in err, err
    assert err.count("\n") == 1


def test_launch_errors_are_eurotrain_errors():
    from eurotrain.launch import LaunchError

    assert issubclass(LaunchError, EurotrainError) and issubclass(LaunchError, ValueError)
    assert LaunchError.exit_code == 2


def test_profile_env_may_only_reference_variables(tmp_path, monkeypatch):
    """Profile values are expanded by the shell on purpose ($USER, $SCRATCH), but a command
    substitution in a profile is refused rather than run."""
    from eurotrain.launch import LaunchRequest, plan, render

    text = (REPO / "launch" / "clusters" / "local.yaml").read_text()
    (tmp_path / "local.yaml").write_text(text.replace("env: {}", "env: {CACHE: '$(id)/x'}"))
    monkeypatch.setenv("EUROTRAIN_CLUSTERS", str(tmp_path))
    req = LaunchRequest(cluster="local", nodes=1, time="00:10:00", config=str(TINY),
                        python="python3")  # fmt: skip
    with pytest.raises(EurotrainError, match=r"env\.CACHE '\$\(id\)/x'"):
        render(plan(req))


@pytest.mark.parametrize(
    "old, new, says",
    [
        ("env: {}", "env: {CACHE: '`id`'}", "env.CACHE '`id`': contains a backquote"),
        ("env: {}", "env: {A-B: x}", "env 'A-B': not a shell variable name"),
        ("GLOO_SOCKET_IFNAME: lo", "GLOO_SOCKET_IFNAME: '${X:-$(id)}'", "comm.env.GLOO_SOCKET_IFNAME"),
        ("env: {}", "env: {}\nsbatch_extra: ['--mem 4G']", "sbatch_extra[0] '--mem 4G': contains a space"),
        ("env: {}", "env: {}\ncontainer: {binds: ['$(id)']}", "container.binds[0] '$(id)'"),
        ("partition: debug", "partition: 'debug#x'", "queues.debug.partition 'debug#x': contains '#'"),
        ("description: localhost test SLURM (launch/testing/slurm_local.sh), CPU + gloo",
         'description: "a\\nb"', "description 'a\\nb': contains a newline"),
    ],
)  # fmt: skip
def test_profile_text_that_would_break_the_script_is_refused(old, new, says, tmp_path, monkeypatch):
    from eurotrain.clusters import load_profile

    text = (REPO / "launch" / "clusters" / "local.yaml").read_text()
    assert old in text
    (tmp_path / "local.yaml").write_text(text.replace(old, new, 1))
    monkeypatch.setenv("EUROTRAIN_CLUSTERS", str(tmp_path))
    with pytest.raises(EurotrainError, match=re.escape(says)):
        load_profile("local")


def test_profile_binds_may_reference_variables(sandbox, monkeypatch, capsys):
    text = (REPO / "launch" / "clusters" / "local.yaml").read_text()
    profiles = sandbox / "profiles"
    profiles.mkdir()
    binds = "env: {}\ncontainer: {binds: [/scratch, '${HOME}/data']}"
    (profiles / "local.yaml").write_text(text.replace("env: {}", binds))
    rc, script, err = _launch(
        monkeypatch, capsys, sandbox, "--cluster", "local", "--nodes", "2", "--time", "00:10:00",
        "--container", "img.sif", "--dry-run", _config(sandbox, "cfg.yaml"),
        clusters=profiles,
    )  # fmt: skip
    assert rc == 0, err
    assert _run_script(sandbox, script).returncode == 0
    argv = _argv(sandbox / "rec" / "container")
    assert argv[:3] == ["exec", "--bind", f"/scratch,{sandbox / 'home'}/data"]
    # then the run's own directories (the config's here), then the image
    assert argv[3:8] == ["--bind", str(sandbox / "work"), "--bind", str(TINY.parent), "img.sif"]


def test_a_long_node_list_does_not_kill_the_job(sandbox, monkeypatch, capsys):
    """The first host is read without closing the pipe early: `| head -n 1` made scontrol die
    of SIGPIPE on a long list, and set -o pipefail then failed the job before any rank ran."""
    _stub(
        sandbox / "bin" / "scontrol",
        'case "$2" in hostnames) seq -f "node%g" 1 200000;;\n'
        '  node) echo "NodeName=$3 NodeAddr=127.0.0.1";; esac\n',
    )
    python = _recorder(sandbox / "bin" / "py", sandbox / "rec" / "rank")
    rc, script, err = _launch(
        monkeypatch, capsys, sandbox, "--cluster", "local", "--nodes", "2", "--time", "00:10:00",
        "--python", str(python), "--dry-run", _config(sandbox, "cfg.yaml"),
    )  # fmt: skip
    assert rc == 0, err
    done = _run_script(sandbox, script)
    assert done.returncode == 0, done.stderr
    assert "rendezvous 127.0.0.1:" in done.stdout


@pytest.mark.parametrize(
    "option", ["--python", "--container", "--job-name", "--account", "--cpu-bind"]
)
def test_an_empty_value_is_refused_not_ignored(option, sandbox, monkeypatch, capsys):
    rc, out, err = _launch(
        monkeypatch, capsys, sandbox, "--cluster", "local", "--nodes", "2", "--time", "00:10:00",
        option, "", "--dry-run", _config(sandbox, "cfg.yaml"),
    )  # fmt: skip
    assert rc == 2 and out == "" and f"{option} '': " in err and "empty" in err, err


# ---- the directories a containerised run binds -------------------------------------------
def _binds(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, word in enumerate(argv[:-1]) if word == "--bind"]


@pytest.mark.parametrize("payload", list(PAYLOADS.values()), ids=list(PAYLOADS))
def test_container_binds_get_payload_paths_literally(payload, sandbox, monkeypatch, capsys):
    """Run, data and checkpoint directories from the config are bound into the container (and
    the writable ones made first), each as exactly the path the config holds."""
    runs, data, ckpt = (sandbox / d / payload for d in ("runs", "data", "ckpt"))
    data.mkdir(parents=True)
    overrides = ["--train.output_dir", str(runs), "--data.corpus", str(data / "*.txt"),
                 "--checkpoint.dir", str(ckpt)]  # fmt: skip
    rc, script, err = _launch(
        monkeypatch, capsys, sandbox, "--cluster", "local", "--nodes", "2", "--time", "00:10:00",
        "--container", "img.sif", "--python", "python3", "--dry-run",
        _config(sandbox, "cfg.yaml"), *overrides,
    )  # fmt: skip
    assert rc == 0, err
    done = _run_script(sandbox, script)
    assert done.returncode == 0, done.stderr
    assert _markers(sandbox) == []
    argv = _argv(sandbox / "rec" / "container")
    # The config's directory (the working directory here) and its base's, then the run
    # directory, the checkpoints, the data.
    assert _binds(argv) == [
        str(sandbox / "work"),
        str(TINY.parent),
        str(runs),
        str(ckpt),
        str(data),
    ]
    assert argv[argv.index("img.sif") + 1 :][:3] == ["python3", "-m", "eurotrain.train"]
    assert runs.is_dir() and ckpt.is_dir()  # made before the container starts


def test_container_binds_skip_what_is_already_bound(sandbox, monkeypatch, capsys):
    """Paths inside another bound path, or inside a profile bind, are not bound twice; a
    relative path is bound under the job's working directory."""
    text = (REPO / "launch" / "clusters" / "local.yaml").read_text()
    profiles = sandbox / "profiles"
    profiles.mkdir()
    (profiles / "local.yaml").write_text(
        text.replace("env: {}", f"env: {{}}\ncontainer: {{binds: [{sandbox / 'shared'}]}}")
    )
    sub = sandbox / "work" / "sub"
    sub.mkdir()
    (sub / "cfg.yaml").write_text(f"base: {TINY}\n")
    overrides = ["--train.output_dir", "out/runs", "--data.corpus", str(sandbox / "shared/t"),
                 "--checkpoint.dir", "out/runs/ckpt"]  # fmt: skip
    rc, script, err = _launch(
        monkeypatch, capsys, sandbox, "--cluster", "local", "--nodes", "1", "--time", "00:10:00",
        "--container", "img.sif", "--dry-run", "sub/cfg.yaml", *overrides, clusters=profiles,
    )  # fmt: skip
    assert rc == 0, err
    assert _run_script(sandbox, script).returncode == 0
    binds = _binds(_argv(sandbox / "rec" / "container"))
    expected = ["work/sub", str(TINY.parent), "work/out/runs", "work/logs"]  # logs: job state
    assert binds == [str(sandbox / "shared"), *(str(sandbox / p) for p in expected)]
    assert '--bind "$PWD"/sub' in script.replace("'", "")  # relative: anchored in the job


@pytest.mark.parametrize(
    "key, value, says",
    [
        ("train.output_dir", "/x/a:b", "contains ':'"),
        ("data.corpus", "/x/a,b/*.txt", "contains ','"),
        ("data.tokenizer", "/x/tok:2", "contains ':'"),
    ],
)
def test_container_paths_apptainer_would_split_are_refused(
    key, value, says, sandbox, monkeypatch, capsys
):
    config = _config(sandbox, "cfg.yaml")
    base = ["--cluster", "local", "--nodes", "2", "--time", "00:10:00", "--dry-run"]
    rc, out, err = _launch(
        monkeypatch, capsys, sandbox, *base, "--container", "img.sif", config, f"--{key}", value
    )
    assert rc == 2 and out == "" and err.count("\n") == 1, err
    assert f"{key} {value!r}: {says}" in err and "--container" in err
    rc, out, err = _launch(monkeypatch, capsys, sandbox, *base, config, f"--{key}", value)
    assert rc == 0, err  # without a container the path never reaches the script


def test_container_refuses_a_control_character_in_a_config_path(sandbox, monkeypatch, capsys):
    (sandbox / "work" / "cfg.yaml").write_text(
        f'base: {TINY}\ntrain: {{output_dir: "runs\\nrm -rf x", global_batch_size: 64, '
        f"micro_batch_size: 1}}\n"
    )
    rc, out, err = _launch(
        monkeypatch, capsys, sandbox, "--cluster", "local", "--nodes", "2", "--time", "00:10:00",
        "--container", "img.sif", "--dry-run", "cfg.yaml",
    )  # fmt: skip
    assert rc == 2 and out == "" and "train.output_dir 'runs\\nrm -rf x': contains a newline" in err
