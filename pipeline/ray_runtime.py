"""Starting and joining Ray: the one place the stages that use a cluster (download and extract
with `executor: ray`, tokenize, train, sweep, evaluate) get their Ray session, check its
resources and ask an autoscaling cluster for more.

`ray` is imported inside the functions, so importing this module costs nothing where Ray is
not needed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

# A local Ray instance's shared-memory object store; Ray Data streams within it.
LOCAL_OBJECT_STORE_BYTES = 2 * 1024**3
# How often a stage waiting for the autoscaler checks the cluster, and says what it waits for.
POLL_S = 5.0
SAY_EVERY_S = 60.0

# Whether the running session is a local instance `ray_session` started (it can never grow), and
# whether this process asked the autoscaler for resources (withdrawn when the session ends).
_started_locally = False
_requested = False


class ClusterError(PipelineError):
    """The Ray cluster cannot give a stage what its params ask for."""


@contextlib.contextmanager
def ray_session() -> Iterator[float]:
    """Use the running Ray, or start one: the cluster at `RAY_ADDRESS` when set, else a local
    instance (no dashboard, warnings only, a bounded object store). Shuts down only what it
    started, withdrawing first what `require_resources` asked the autoscaler for, so that idle
    nodes may go. Yields the seconds start-up took (0.0 when Ray was already running)."""
    import ray

    global _started_locally, _requested
    if ray.is_initialized():
        yield 0.0
        return
    start = time.monotonic()
    address = os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING}
    if address is None:  # these may only be given when starting a new local instance
        kwargs |= {"include_dashboard": False, "object_store_memory": LOCAL_OBJECT_STORE_BYTES}
    ray.init(address=address, **kwargs)
    _started_locally = address is None
    try:
        yield time.monotonic() - start
    finally:
        if _requested:
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=[])
        _started_locally = _requested = False
        ray.shutdown()


def totals(bundles: Sequence[dict[str, float]]) -> dict[str, float]:
    """The summed resources of `bundles`, without the zero ones."""
    out: Counter[str] = Counter()
    for bundle in bundles:
        out.update({k: v for k, v in bundle.items() if v > 0})
    return dict(out)


def _missing(need: dict[str, float], have: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in need.items() if float(have.get(k, 0)) < v}


def _describe(resources: dict[str, float], have: dict[str, float]) -> str:
    """E.g. "4 GPU(s) but the Ray cluster has 0"."""
    return "; ".join(f"{v:g} {k}(s) but the Ray cluster has {float(have.get(k, 0)):g}"
                     for k, v in sorted(resources.items()))  # fmt: skip


def require_resources(
    bundles: Sequence[dict[str, float]], what: str, hint: str, wait_s: float = 0.0
) -> dict[str, float]:
    """The cluster's resources once they hold `bundles` (summed: e.g. 32 x {"GPU": 1}).

    When they do not: with `wait_s` > 0 on a cluster (not a local instance, which cannot grow)
    it asks the autoscaler for the bundles (`ray.autoscaler.sdk.request_resources`, in force
    until `ray_session` ends) and waits up to `wait_s`, saying what it waits for; else,
    and after the wait, it fails with one sentence (`ClusterError`) instead of letting Ray wait
    forever. `what` says who asks ("tokenize asks for 2 actor(s) x 1 GPU"), `hint` how to run
    without ("set tokenize.num_gpus_per_actor to 0")."""
    import ray

    global _requested
    need = totals(bundles)
    have = ray.cluster_resources()
    missing = _missing(need, have)
    if not missing:
        return have
    if wait_s <= 0 or _started_locally:
        raise ClusterError(
            f"{what} = {_describe(missing, have)}; {hint}, or point RAY_ADDRESS at a cluster "
            "that has them (an autoscaling one: set base.cluster_wait_s)"
        )
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[dict(b) for b in bundles])
    _requested = True
    start = time.monotonic()
    said = -SAY_EVERY_S
    while missing:
        waited = time.monotonic() - start
        if waited >= wait_s:
            raise ClusterError(
                f"{what} = {_describe(missing, have)} after waiting {wait_s:g} s for the "
                f"autoscaler; {hint}, or raise base.cluster_wait_s"
            )
        if waited - said >= SAY_EVERY_S:
            log.warning(
                "%s = %s: waiting up to %.0f s more for the autoscaler",
                what,
                _describe(missing, have),
                wait_s - waited,
            )
            said = waited
        time.sleep(min(POLL_S, wait_s - waited))
        have = ray.cluster_resources()
        missing = _missing(need, have)
    log.warning("%s: the cluster has what it needs after %.0f s", what, time.monotonic() - start)
    return have
