import os
import shutil
import tempfile
import uuid

# 8 fake CPU devices for the sharding tests; must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# The suite's programs are tiny and compiled once each, so LLVM's optimisation passes (half of a CPU compile)
# cost more than they save; numerics do not depend on them (XLA's CPU backend does not use fast-math).
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

# One persistent XLA compilation cache for this test run (shared by pytest-xdist workers and the processes
# tests start): many tests build the same smoke models, and compiling them again is most of their time on a
# CPU. Every run starts cold (a fresh folder, removed at the end), so a run never reuses an older one's programs.
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID") or os.environ.setdefault(
    "JAXDIFF_TEST_RUN", uuid.uuid4().hex
)
CACHE = os.path.join(tempfile.gettempdir(), f"jaxdiff-test-xla-cache-{_RUN}")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_sessionfinish(session, exitstatus):
    if not hasattr(
        session.config, "workerinput"
    ):  # the controller (or a plain run), not an xdist worker
        shutil.rmtree(CACHE, ignore_errors=True)
