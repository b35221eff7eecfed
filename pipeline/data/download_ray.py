"""`download.executor: ray`: the VGGSound download spread over the nodes of a Ray cluster.

One `Downloader` actor per node (1 CPU; on every node, or on `ray.nodes` distinct ones, which an
autoscaling cluster adds) runs the local executor's workers there: `vggsound.workers` threads, each with its own yt-dlp session, and one `RateGate`, so a
rate limit or bot check pauses that node (that IP) only. The driver hands out the clips in
shards of `ray.shard_clips`, two at a time per node, so a slow node takes fewer and a lost one
holds none for long. Files land on the shared file system exactly as with the local executor
(verified in a worker folder under WORK_DIR, then renamed to `videos/<shard>/<clip_id>.mp4`);
the driver alone writes the manifest, where each clip names the Ray node that settled it.

A node whose actor dies (the process killed, its raylet or the machine lost) takes no more
shards; its unfinished ones go back to the others, after the driver has verified and recorded
the clips it had already renamed into place, so nothing is fetched twice. A node that stops by
itself (rate limited past the longest back-off, or no server answering) hands its unsettled
clips back too. When no node is left, the stage stops with its progress saved.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pipeline.config import DownloadConfig, VGGSoundConfig
from pipeline.data.download import (
    DownloadError,
    FetchReport,
    FetchRun,
    Progress,
    fetch_clip,
    plan_fetch,
)
from pipeline.data.manifest import ClipRecord
from pipeline.data.vggsound import VGGSoundEntry

log = logging.getLogger(__name__)

IN_FLIGHT_PER_NODE = 2  # shards queued on a node: it never waits for the driver between two
READY_TIMEOUT_S = 120.0  # a node whose actor does not start in this time is left out
PLACE_TIMEOUT_S = 10.0  # nodes that are up take a placement group at once
CLOSE_TIMEOUT_S = 30.0


class Downloader:
    """One node's downloader (a Ray actor): the local executor's workers and rate gate there."""

    def __init__(self, vcfg: VGGSoundConfig, clips_dir: str) -> None:
        import ray

        self.node = ray.get_runtime_context().get_node_id()
        self.run = FetchRun(vcfg, Path(clips_dir), {}, work_name=f"node-{self.node[:12]}")
        self.pool = ThreadPoolExecutor(vcfg.workers, thread_name_prefix="download")

    def node_id(self) -> str:
        return self.node

    def fetch(
        self, entries: Sequence[VGGSoundEntry], previous: dict[str, ClipRecord]
    ) -> tuple[list[ClipRecord | None], FetchReport]:
        """Fetch a shard: one record per entry (None: left unsettled because this node
        stopped), and this node's report so far."""
        self.run.previous.update(previous)
        futures = [self.pool.submit(fetch_clip, e, self.run) for e in entries]
        records = [f.result() for f in futures]
        for record in records:
            if record is not None:
                record.node = self.node
        return records, self.run.report()

    def close(self) -> None:
        """Close the yt-dlp sessions and delete this node's private cookie copies."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.run.close()


def alive_cpu_nodes() -> list[str]:
    """Ids of the alive nodes with a CPU, sorted by address."""
    import ray

    nodes = sorted(
        (n["NodeManagerAddress"], n["NodeID"])
        for n in ray.nodes()
        if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) >= 1
    )
    return [node for _, node in nodes]


def start_downloaders(
    cfg: DownloadConfig, clips_dir: Path, wait_s: float
) -> tuple[dict[str, Any], Any]:
    """(node id → its started `Downloader`, the placement group or None).

    `ray.nodes` 0: one on every alive node with a CPU, pinned to it. N: a placement group of N
    one-CPU bundles on N distinct nodes (STRICT_SPREAD), which an autoscaling cluster adds nodes
    for; it must be placed within `wait_s` (at least PLACE_TIMEOUT_S), else `DownloadError`.
    Nodes whose actor does not come up are left out."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import (
        NodeAffinitySchedulingStrategy,
        PlacementGroupSchedulingStrategy,
    )

    actor = ray.remote(num_cpus=1, max_restarts=0)(Downloader)
    args = (cfg.vggsound, str(clips_dir.resolve()))
    group = None
    if cfg.ray.nodes:
        group = placement_group([{"CPU": 1}] * cfg.ray.nodes, strategy="STRICT_SPREAD")
        timeout = max(wait_s, PLACE_TIMEOUT_S)
        log.info("download: asking for %d nodes (waiting up to %.0f s)", cfg.ray.nodes, timeout)
        if not ray.wait([group.ready()], timeout=timeout)[0]:
            remove_placement_group(group)
            raise DownloadError(
                f"download.ray.nodes asks for {cfg.ray.nodes} nodes with a free CPU each, and "
                f"the Ray cluster did not have them within {timeout:.0f} s (it has "
                f"{len(alive_cpu_nodes())}); lower it (0: every node there is) or raise "
                "base.cluster_wait_s on an autoscaling cluster"
            )
        strategies = [PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i)
                      for i in range(cfg.ray.nodes)]  # fmt: skip
    else:
        strategies = [NodeAffinitySchedulingStrategy(node, soft=False)
                      for node in alive_cpu_nodes()]  # fmt: skip
    started = [actor.options(scheduling_strategy=s).remote(*args) for s in strategies]
    ready = {a.node_id.remote(): a for a in started}
    done, late = ray.wait(list(ready), num_returns=len(ready), timeout=READY_TIMEOUT_S)
    up = {}
    for ref in done:
        try:
            up[ray.get(ref)] = ready[ref]
        except ray.exceptions.RayError as err:
            log.warning("a downloader did not start (%s)", err)
    for ref in late:
        log.warning("a downloader did not start within %.0f s", READY_TIMEOUT_S)
        ray.kill(ready[ref])
    if not up:
        if group is not None:
            remove_placement_group(group)
        raise DownloadError(
            "no downloader could start: the Ray cluster has no node with a free CPU"
        )
    return up, group


def fetch_on_nodes(
    cfg: DownloadConfig,
    todo: Sequence[VGGSoundEntry],
    clips_dir: Path,
    previous: dict[str, ClipRecord],
    records: dict[str, ClipRecord],
    wait_s: float = 0.0,
) -> FetchReport:
    """Fetch `todo` on the cluster's nodes (see the module doc and `start_downloaders`, which
    waits up to `wait_s` for an autoscaler to add them), filling `records` and saving the
    manifest as the local executor does. Raises `DownloadError` when every node was lost before
    the end."""
    import ray
    from ray.util.placement_group import remove_placement_group

    from pipeline.ray_runtime import ray_session

    size = cfg.ray.shard_clips
    shards = deque(list(todo[i : i + size]) for i in range(0, len(todo), size))
    if not shards:
        return FetchReport()
    with ray_session():
        actors, group = start_downloaders(cfg, clips_dir, wait_s)
        log.info(
            "vggsound: %d shards of up to %d clips over %d node(s)", len(shards), size, len(actors)
        )
        reports: dict[str, FetchReport] = {}
        stopped: dict[str, str] = {}  # node → why it takes no more shards
        in_flight: dict[Any, tuple[str, list[VGGSoundEntry]]] = {}
        busy: Counter[str] = Counter()
        progress = Progress(len(todo), clips_dir, records)

        def feed() -> None:
            for node, downloader in actors.items():
                while node not in stopped and busy[node] < IN_FLIGHT_PER_NODE and shards:
                    shard = shards.popleft()
                    known = {e.clip_id: previous[e.clip_id] for e in shard if e.clip_id in previous}
                    in_flight[downloader.fetch.remote(shard, known)] = (node, shard)
                    busy[node] += 1

        try:
            feed()
            while in_flight:
                [ref], _ = ray.wait(list(in_flight), num_returns=1)
                node, shard = in_flight.pop(ref)
                busy[node] -= 1
                try:
                    settled, reports[node] = ray.get(ref)
                except ray.exceptions.RayActorError as err:
                    if node not in stopped:
                        log.warning(
                            "node %s: its downloader was lost (%s); its clips go to the other "
                            "nodes",
                            node[:12],
                            type(err).__name__,
                        )
                    stopped[node] = "lost"
                    # Clips it renamed into place before it died are verified, not refetched.
                    kept, rest = plan_fetch(shard, [], clips_dir, retry_failed=True)
                    for record in kept.values():
                        record.node = node
                    settled = [kept.get(e.clip_id) for e in shard]
                else:
                    why = reports[node].gave_up or reports[node].offline
                    if why is not None and node not in stopped:
                        log.warning(
                            "node %s stopped (%s); its clips go to the others", node[:12], why
                        )
                        stopped[node] = why
                    rest = [e for e, r in zip(shard, settled, strict=True) if r is None]
                progress.add(r for r in settled if r is not None)
                if rest:
                    shards.appendleft(rest)
                feed()
        finally:
            progress.close()
            # Closing deletes each node's cookie copies; a node that is gone has nothing to close.
            closing = [a.close.remote() for n, a in actors.items() if stopped.get(n) != "lost"]
            ray.wait(closing, num_returns=len(closing), timeout=CLOSE_TIMEOUT_S)
            for downloader in actors.values():
                ray.kill(downloader)
            if group is not None:
                remove_placement_group(group)
    report = FetchReport(
        pauses=sum(r.pauses for r in reports.values()),
        paused_s=sum(r.paused_s for r in reports.values()),
    )
    if shards:  # every node stopped: say why, as the local executor would
        reasons = [r for r in (x.gave_up for x in reports.values()) if r]
        offline = [r for r in (x.offline for x in reports.values()) if r]
        if reasons:
            report.gave_up = reasons[0]
        elif offline:
            report.offline = offline[0]
        else:
            raise DownloadError(
                f"every downloader node was lost with {sum(map(len, shards))} clips to go; "
                "progress is saved, rerun to fetch the rest"
            )
    return report
