"""tpu_scripts/: shell syntax, shellcheck, usage, and the exact gcloud commands, against a fake gcloud.

No cloud is reachable here, so a stub `gcloud` on PATH records its arguments. The commands that
launch.sh / stop.sh would run on the workers are then run here, on a fake worker checkout with a
stub trainer, so quoting, the background start, the pid file and the SIGTERM stop are exercised
for real. If the Google Cloud CLI is installed, every recorded command line is replayed through it
without credentials: its parser must accept every flag (it then stops at "no active account").
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tpu_scripts"
ALL = sorted(SCRIPTS.glob("*.sh"))
RUNNABLE = [p for p in ALL if p.name != "common.sh"]  # common.sh is only sourced
REAL_GCLOUD = shutil.which("gcloud")

FAKE_GCLOUD = f"""#!{sys.executable}
import json, os, shutil, sys
args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(args) + "\\n")
if args[3:4] == ["scp"] and os.environ.get("FAKE_GCLOUD_SCP_DIR"):
    shutil.copy(args[4], os.environ["FAKE_GCLOUD_SCP_DIR"])
if "describe" in args:
    print(os.environ.get("FAKE_GCLOUD_STATE", "ACTIVE"))
"""

# Stands in for .venv/bin/jaxdiff on a worker: records how it was called, trains until SIGTERM,
# then "saves" and exits 0, as the real trainer does on a preemption.
FAKE_TRAINER = f"""#!{sys.executable}
import json, os, signal, sys, time
rec = {{"argv": sys.argv[1:], "cwd": os.getcwd(), "LIBTPU_INIT_ARGS": os.environ.get("LIBTPU_INIT_ARGS")}}
with open(os.environ["FAKE_TRAIN_RECORD"] + ".tmp", "w") as f:
    json.dump(rec, f)
os.replace(os.environ["FAKE_TRAIN_RECORD"] + ".tmp", os.environ["FAKE_TRAIN_RECORD"])
if "--fail" in sys.argv:
    print("error: unknown config key", flush=True)
    sys.exit(3)
def term(*_):
    print("SIGTERM: saved step 7 and stopped", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, term)
print("step 1", flush=True)
while True:
    time.sleep(0.02)
"""


@pytest.fixture
def cloud(tmp_path):
    """A fake gcloud on PATH and a clean environment; .run(script, *args) runs a script with it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
    (bin_dir / "gcloud").chmod(0o755)
    log = tmp_path / "gcloud.log"
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
        "FAKE_GCLOUD_LOG": str(log),
        "PROJECT": "my-proj",
        "BUCKET": "gs://my-bucket",
    }

    class Cloud:
        def run(self, script, *args, check=True, **extra_env):
            r = subprocess.run(
                [str(SCRIPTS / script), *args],
                env={**env, **extra_env},
                capture_output=True,
                text=True,
                timeout=60,
                cwd=tmp_path,
            )
            if check:
                assert r.returncode == 0, r.stderr
            return r

        def calls(self):
            return (
                [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
            )

    c = Cloud()
    c.env, c.tmp = env, tmp_path
    return c


def remote_command(call):
    """The shell string a `tpu-vm ssh ... --command=...` call would run on the workers."""
    (cmd,) = [a for a in call if a.startswith("--command=")]
    return cmd[len("--command=") :]


@pytest.fixture
def worker(tmp_path):
    """A fake TPU worker: ~/jaxdiff with tpu_scripts/ and a .venv whose jaxdiff is the stub trainer."""
    home = tmp_path / "worker_home"
    repo = home / "jaxdiff"
    shutil.copytree(SCRIPTS, repo / "tpu_scripts")
    venv_bin = repo / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "jaxdiff").write_text(FAKE_TRAINER)
    (venv_bin / "jaxdiff").chmod(0o755)
    (venv_bin / "python").symlink_to(sys.executable)
    record = tmp_path / "trainer.json"
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "FAKE_TRAIN_RECORD": str(record),
        "JAXDIFF_START_WAIT": "0",
    }

    class Worker:
        def ssh(self, command, **extra_env):
            """Runs a recorded --command string the way sshd would: a shell in the home directory."""
            return subprocess.run(
                ["bash", "-c", command],
                env={**env, **extra_env},
                cwd=home,
                capture_output=True,
                text=True,
                timeout=60,
            )

        def record(self):
            deadline = time.monotonic() + 10
            while not record.exists():
                assert time.monotonic() < deadline, "the stub trainer never started"
                time.sleep(0.02)
            return json.loads(record.read_text())

        def log(self):
            return (repo / "logs" / "train.log").read_text()

    w = Worker()
    w.repo = repo
    yield w
    pid_file = repo / "logs" / "train.pid"  # never leave a stub trainer behind
    if pid_file.exists():
        try:
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


# --- the scripts as text -------------------------------------------------------------------------


@pytest.mark.parametrize("script", ALL, ids=lambda p: p.name)
def test_bash_syntax_and_header(script):
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") or script.name == "common.sh"
    assert "set -euo pipefail" in text or script.name == "common.sh"
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_clean():
    # All severities (style included); -x follows the `source`d files.
    r = subprocess.run(
        ["shellcheck", "-x", *map(str, ALL)], capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("script", RUNNABLE, ids=lambda p: p.name)
def test_help(script, tmp_path):
    # -h works anywhere: no gcloud needed, no variable set.
    r = subprocess.run(
        [str(script), "-h"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: ") and len(r.stdout.splitlines()) >= 2, r.stdout


# --- clear errors --------------------------------------------------------------------------------


def test_missing_gcloud_is_a_clear_error(tmp_path):
    bin_dir = tmp_path / "bin"  # the tools the scripts use, but no gcloud
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "sed", "cat"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    r = subprocess.run(
        [str(SCRIPTS / "create.sh")],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": str(bin_dir), "HOME": str(tmp_path), "PROJECT": "p"},
    )
    assert r.returncode == 1
    assert "gcloud not found" in r.stderr and "https://cloud.google.com/sdk" in r.stderr


@pytest.mark.parametrize(
    "script,args",
    [
        ("create.sh", []),
        ("launch.sh", ["--config", "c.py"]),
        ("stop.sh", []),
        ("delete.sh", ["-y"]),
    ],
)
def test_missing_project_is_a_clear_error(cloud, script, args):
    r = cloud.run(script, *args, check=False, PROJECT="")
    assert r.returncode == 1
    assert "PROJECT is not set" in r.stderr
    assert cloud.calls() == []


def test_bad_arguments_are_refused(cloud):
    assert "unknown argument '--spott'" in cloud.run("create.sh", "--spott", check=False).stderr
    assert (
        "--wait only applies with --queued" in cloud.run("create.sh", "--wait", check=False).stderr
    )
    assert "no training arguments" in cloud.run("launch.sh", check=False).stderr
    assert (
        "-e needs NAME=VALUE"
        in cloud.run("launch.sh", "-e", "oops", "--config", "x", check=False).stderr
    )
    assert "need gs://" in cloud.run("stage.sh", "/local", "/dest", check=False).stderr
    r = cloud.run(
        "finetune_sd15_v5e.sh", check=False, BUCKET="", MODEL_GCS="gs://m", DATA_GCS="gs://d"
    )
    assert "set BUCKET" in r.stderr
    assert cloud.calls() == []


# --- the gcloud command lines ----------------------------------------------------------------------

TPU = ["--project=my-proj", "--zone=us-west4-a"]


def test_create(cloud):
    cloud.run("create.sh")
    cloud.run("create.sh", "--spot", "--", "--network=my-net")
    cloud.run("create.sh", ZONE="europe-west4-b", TPU_NAME="t2", ACCELERATOR_TYPE="v5litepod-64")
    assert cloud.calls() == [
        [
            "compute",
            "tpus",
            "tpu-vm",
            "create",
            "jaxdiff-v5e-16",
            *TPU,
            "--accelerator-type=v5litepod-16",
            "--version=v2-alpha-tpuv5-lite",
        ],
        [
            "compute",
            "tpus",
            "tpu-vm",
            "create",
            "jaxdiff-v5e-16",
            *TPU,
            "--accelerator-type=v5litepod-16",
            "--version=v2-alpha-tpuv5-lite",
            "--spot",
            "--network=my-net",
        ],
        [
            "compute",
            "tpus",
            "tpu-vm",
            "create",
            "t2",
            "--project=my-proj",
            "--zone=europe-west4-b",
            "--accelerator-type=v5litepod-64",
            "--version=v2-alpha-tpuv5-lite",
        ],
    ]


def test_create_queued_and_wait(cloud):
    cloud.run("create.sh", "--queued", "--spot", "--wait")
    create, describe = cloud.calls()
    assert create == [
        "compute",
        "tpus",
        "queued-resources",
        "create",
        "jaxdiff-v5e-16-qr",
        "--node-id=jaxdiff-v5e-16",
        *TPU,
        "--accelerator-type=v5litepod-16",
        "--runtime-version=v2-alpha-tpuv5-lite",
        "--spot",
    ]
    assert describe == [
        "compute",
        "tpus",
        "queued-resources",
        "describe",
        "jaxdiff-v5e-16-qr",
        *TPU,
        "--format=value(state.state)",
    ]
    r = cloud.run("create.sh", "--queued", "--wait", check=False, FAKE_GCLOUD_STATE="FAILED")
    assert r.returncode == 1 and "jaxdiff-v5e-16-qr is FAILED" in r.stderr


def test_delete(cloud):
    cloud.run("delete.sh", "-y")
    cloud.run("delete.sh", "--queued")
    assert cloud.calls() == [
        ["compute", "tpus", "tpu-vm", "delete", "jaxdiff-v5e-16", *TPU, "--quiet"],
        ["compute", "tpus", "queued-resources", "delete", "jaxdiff-v5e-16-qr", *TPU, "--force"],
    ]


def test_setup_copies_this_checkout(cloud, tmp_path):
    (tmp_path / "scp").mkdir()
    cloud.run("setup.sh", FAKE_GCLOUD_SCP_DIR=str(tmp_path / "scp"))
    scp, unpack, install, check = cloud.calls()
    assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"]
    assert scp[5:] == ["jaxdiff-v5e-16:jaxdiff-src.tar.gz", *TPU, "--worker=all"]
    assert not Path(scp[4]).exists()  # the local tarball is cleaned up
    (tarball,) = (tmp_path / "scp").iterdir()
    names = set(tarfile.open(tarball).getnames())
    assert {"pyproject.toml", "tpu_scripts/worker.sh", "tests/test_tpu_scripts.py"} <= names
    assert not any(n.startswith(".venv/") or n.startswith(".git/") for n in names)
    for call in (unpack, install, check):
        assert call[:5] == ["compute", "tpus", "tpu-vm", "ssh", "jaxdiff-v5e-16"]
        assert "--worker=all" in call
    assert (
        remote_command(unpack)
        == "mkdir -p jaxdiff && tar -xzf jaxdiff-src.tar.gz -C jaxdiff && rm jaxdiff-src.tar.gz"
    )
    assert remote_command(install) == "cd jaxdiff && bash tpu_scripts/worker.sh setup --python 3.12"
    assert remote_command(check) == "cd jaxdiff && bash tpu_scripts/worker.sh check"


def test_setup_clones_repo_url(cloud):
    cloud.run("setup.sh", "--no-check", REPO_URL="https://example.com/jaxdiff.git", REPO_REF="v1")
    clone, install = cloud.calls()
    assert (
        "git clone --quiet https://example.com/jaxdiff.git jaxdiff && git -C jaxdiff checkout --quiet v1"
        in remote_command(clone)
    )
    assert remote_command(install).endswith("worker.sh setup --python 3.12")


def test_the_worker_side_of_setup_installs_jax_tpu_from_the_libtpu_index():
    text = (SCRIPTS / "worker.sh").read_text()
    assert "pip install --quiet -e ." in text
    assert 'pip install --quiet "jax[tpu]==$version" -f "$LIBTPU_INDEX"' in text
    assert 'LIBTPU_INDEX="https://storage.googleapis.com/jax-releases/libtpu_releases.html"' in text


def test_tail_and_stage(cloud):
    cloud.run("tail.sh")
    cloud.run("tail.sh", "-w", "all", "-n", "5", "--once")
    cloud.run("stage.sh", "gs://b/data", "/var/tmp/jaxdiff/data")
    tail0, tail_all, stage = cloud.calls()
    assert (
        "--worker=0" in tail0
        and remote_command(tail0) == "cd jaxdiff && bash tpu_scripts/worker.sh log -n 50 -f"
    )
    assert "--worker=all" in tail_all and remote_command(tail_all).endswith("worker.sh log -n 5")
    assert "--worker=all" in stage
    assert (
        remote_command(stage)
        == "cd jaxdiff && bash tpu_scripts/worker.sh stage gs://b/data /var/tmp/jaxdiff/data"
    )


# --- launch and stop, on a fake worker -------------------------------------------------------------

TRAIN_ARGS = [
    "--config",
    "configs/sd15_finetune.py",
    "--workdir",
    "gs://my-bucket/runs/a b",
    "--config.mesh.shape=(1,-1,1)",
    "--config.data.source=folder:/data/it's $HOME",
]


def test_launch_then_stop_on_a_worker(cloud, worker):
    cloud.run("launch.sh", "-e", "LIBTPU_INIT_ARGS=--xla_a=1 --xla_b=2", "--", *TRAIN_ARGS)
    (launch,) = cloud.calls()
    assert launch[:5] == ["compute", "tpus", "tpu-vm", "ssh", "jaxdiff-v5e-16"]
    assert (
        "--worker=all" in launch and "--zone=us-west4-a" in launch and "--project=my-proj" in launch
    )
    command = remote_command(launch)
    assert "jaxdiff train --distributed --config configs/sd15_finetune.py" in command

    # What each worker does with that command: the trainer gets exactly our arguments and env.
    r = worker.ssh(command)
    assert r.returncode == 0, r.stderr
    rec = worker.record()
    assert rec["argv"] == ["train", "--distributed", *TRAIN_ARGS]
    assert rec["LIBTPU_INIT_ARGS"] == "--xla_a=1 --xla_b=2"
    assert rec["cwd"] == str(worker.repo)

    again = worker.ssh(command)  # a second launch must not start a second trainer
    assert again.returncode == 1 and "already running" in again.stderr

    cloud.run("stop.sh")
    stop = cloud.calls()[-1]
    assert (
        "--worker=all" in stop
        and remote_command(stop) == "cd jaxdiff && bash tpu_scripts/worker.sh stop -t 300"
    )
    r = worker.ssh(remote_command(stop))
    assert r.returncode == 0, r.stderr
    assert "sent SIGTERM" in r.stdout and "stopped; the log ends:" in r.stdout
    assert r.stdout.rstrip().endswith("] SIGTERM: saved step 7 and stopped")
    log = worker.log()
    assert (
        "jaxdiff train --distributed --config configs/sd15_finetune.py" in log.splitlines()[0]
    )  # the === header
    assert "step 1" in log
    status = worker.ssh("cd jaxdiff && bash tpu_scripts/worker.sh status")
    assert "not running" in status.stdout
    assert "no trainer running" in worker.ssh(remote_command(stop)).stdout


def test_a_trainer_that_fails_at_start_fails_the_launch(worker):
    # the watch ends as soon as the trainer exits; a long limit only keeps a loaded machine from losing the race
    r = worker.ssh(
        "cd jaxdiff && bash tpu_scripts/worker.sh start jaxdiff train --fail",
        JAXDIFF_START_WAIT="60",
    )
    assert r.returncode == 1
    assert "exited within 60s" in r.stderr and "unknown config key" in r.stderr


def test_launch_warns_on_a_local_workdir(cloud):
    r = cloud.run("launch.sh", "--config", "configs/shapes_sd/unet.py", "--workdir", "runs/x")
    assert "not a gs:// path" in r.stderr


def test_finetune_sd15_v5e(cloud, worker):
    cloud.run(
        "finetune_sd15_v5e.sh",
        "--",
        "--config.loop.steps=10",
        MODEL_GCS="gs://my-bucket/models/sd15",
        DATA_GCS="gs://my-bucket/laion-tars",
    )
    stage_model, stage_data, launch = cloud.calls()
    assert remote_command(stage_model).endswith(
        "worker.sh stage gs://my-bucket/models/sd15 /var/tmp/jaxdiff/sd15"
    )
    assert remote_command(stage_data).endswith(
        "worker.sh stage gs://my-bucket/laion-tars /var/tmp/jaxdiff/data"
    )
    assert "--worker=all" in launch
    r = worker.ssh(remote_command(launch))
    assert r.returncode == 0, r.stderr
    assert worker.record()["argv"] == [
        "train",
        "--distributed",
        "--config",
        "configs/sd15_finetune.py",
        "--workdir",
        "gs://my-bucket/jaxdiff/runs/sd15-v5e16",
        "--config.model.model_dir=/var/tmp/jaxdiff/sd15",
        "--config.data.source=folder:/var/tmp/jaxdiff/data",
        "--config.data.global_batch=128",
        "--config.mesh.shape=(1,-1,1)",
        "--config.loop.steps=10",
    ]
    assert worker.ssh("cd jaxdiff && bash tpu_scripts/worker.sh stop -t 10").returncode == 0


# --- the real gcloud's parser --------------------------------------------------------------------


@pytest.mark.skipif(REAL_GCLOUD is None, reason="the Google Cloud CLI is not installed")
def test_real_gcloud_accepts_every_command_line(cloud, tmp_path):
    cloud.run("create.sh", "--spot")
    cloud.run("create.sh", "--queued", "--spot")
    cloud.run("delete.sh", "--queued", "-y")
    cloud.run("setup.sh", "--no-check")  # scp, then ssh --worker=all --command=...
    cloud.run("launch.sh", "-e", "A=1", "--", *TRAIN_ARGS)
    # One replay per gcloud command (each costs 0.5 s of CPU): the ssh calls differ only in values.
    calls = {tuple(c[:4]): c for c in cloud.calls()}
    assert len(calls) == 5
    # No credentials, no metadata server, and the TPU API pointed at a closed local port: whatever
    # happens, nothing reaches Google Cloud. A command line gcloud can parse stops at "no account".
    (tmp_path / "gcloud-config").mkdir()
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
        "CLOUDSDK_CONFIG": str(tmp_path / "gcloud-config"),
        "CLOUDSDK_CORE_CHECK_GCE_METADATA": "false",
        "CLOUDSDK_API_ENDPOINT_OVERRIDES_TPU": "http://127.0.0.1:9/",
        "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
        "CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK": "true",
    }

    def replay(args):
        return args, subprocess.run(
            [REAL_GCLOUD, *args], env=env, capture_output=True, text=True, timeout=60
        )

    with ThreadPoolExecutor(4) as pool:
        for args, r in pool.map(replay, calls.values()):
            assert r.returncode == 1 and "do not currently have an active account" in r.stderr, (
                args,
                r.stderr,
            )
