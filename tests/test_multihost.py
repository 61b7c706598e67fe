"""2 processes x 4 CPU devices (jax.distributed over gloo on 127.0.0.1) train exactly like 1 x 8."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

CHILD = os.path.join(os.path.dirname(__file__), "multihost_child.py")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(out: str):
    line = [ln for ln in out.splitlines() if ln.startswith("LOSSES ")]
    assert line, out[-3000:]
    return json.loads(line[-1][len("LOSSES ") :])


def test_two_processes_match_one(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, CHILD, "2", str(i), port, "4", str(tmp_path / "two")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = []
    try:
        for p in procs:  # bounded: a hung peer fails the test instead of hanging it
            outs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outs)
    one = subprocess.run(
        [sys.executable, CHILD, "1", "0", "0", "8", str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-2000:]
    a, b, ref = _losses(outs[0]), _losses(outs[1]), _losses(one.stdout)
    assert a == b and len(ref) == 5
    np.testing.assert_allclose(a, ref, rtol=1e-5)
