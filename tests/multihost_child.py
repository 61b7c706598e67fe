"""One process of the multi-host test: argv = num_processes process_id port local_devices workdir."""

import json
import os
import sys

nproc, pid, port, ndev = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ndev}"
import jax

if nproc > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        f"127.0.0.1:{port}", num_processes=nproc, process_id=pid, initialization_timeout=60
    )
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_train as T

from jaxdiff import sharding as sh
from jaxdiff.data.pipeline import to_global


class HostShard(T.ListIterator):
    def __next__(self):
        b = T.ListIterator.__next__(self)
        n = len(b["x"]) // jax.process_count()
        return {k: v[jax.process_index() * n : (jax.process_index() + 1) * n] for k, v in b.items()}


losses = []
mesh = sh.make_mesh((2, 4, 1))
from jaxdiff.train import loop
from jaxdiff.train.optim import OptimConfig

st = loop.train(
    T.toy_task(),
    OptimConfig(learning_rate=0.05, total_steps=50),
    loop.LoopConfig(steps=5, log_every=100, checkpoint_every=100),
    mesh,
    sh.FSDP_RULES,
    sys.argv[5],
    HostShard(),
    lambda b: to_global(b, mesh, sh.FSDP_RULES),
    fingerprint={"x": 1},
    on_step=lambda s, state, m: losses.append(float(m["loss"])),
)
print("LOSSES", json.dumps(losses))
