"""Starting and joining Ray: the one place the stages that use a cluster (tokenize, train,
sweep, evaluate) get their Ray session and check its resources.

`ray` is imported inside the functions, so importing this module costs nothing where Ray is
not needed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

from pipeline.errors import PipelineError

# A local Ray instance's shared-memory object store; Ray Data streams within it.
LOCAL_OBJECT_STORE_BYTES = 2 * 1024**3


class ClusterError(PipelineError):
    """The Ray cluster cannot give a stage what its params ask for."""


@contextlib.contextmanager
def ray_session() -> Iterator[float]:
    """Use the running Ray, or start one: the cluster at `RAY_ADDRESS` when set, else a local
    instance (no dashboard, warnings only, a bounded object store). Shuts down only what it
    started. Yields the seconds start-up took (0.0 when Ray was already running)."""
    import ray

    if ray.is_initialized():
        yield 0.0
        return
    start = time.monotonic()
    address = os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING}
    if address is None:  # these may only be given when starting a new local instance
        kwargs |= {"include_dashboard": False, "object_store_memory": LOCAL_OBJECT_STORE_BYTES}
    ray.init(address=address, **kwargs)
    try:
        yield time.monotonic() - start
    finally:
        ray.shutdown()


def require_gpus(need: float, what: str, cpu_hint: str) -> float:
    """The cluster's GPU count; fails in one sentence, instead of waiting forever, when it has
    fewer than `need`. `what` says who asks ("tokenize asks for 2 actor(s) x 1 GPU"),
    `cpu_hint` how to run without ("set tokenize.num_gpus_per_actor to 0")."""
    import ray

    have = float(ray.cluster_resources().get("GPU", 0))
    if need > 0 and have < need:
        raise ClusterError(
            f"{what} = {need:g} GPU(s) but the Ray cluster has {have:g}; {cpu_hint}, or point "
            "RAY_ADDRESS at a cluster with GPUs"
        )
    return have
