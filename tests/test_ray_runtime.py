"""pipeline/ray_runtime.py: what a stage does when the cluster lacks what it asks for.

Ray's two calls the module makes, `ray.cluster_resources` and the autoscaler's
`request_resources`, are replaced by a stand-in cluster whose GPUs arrive after a number of polls
(an autoscaler adding nodes); nothing here starts Ray. The test files of the stages that call it
(test_tokenize, test_cluster) run it against a real Ray.
"""

from __future__ import annotations

import logging

import pytest
import ray
import ray.autoscaler.sdk

from pipeline import ray_runtime
from pipeline.ray_runtime import ClusterError, require_resources, totals


class FakeCluster:
    """`cluster_resources` gives `before` until `arrive_after` polls, then `after`;
    `request_resources` records what the stage asked for."""

    def __init__(self, before: dict, after: dict, arrive_after: int | None) -> None:
        self.before, self.after, self.arrive_after = before, after, arrive_after
        self.polls = 0
        self.requests: list[list[dict]] = []

    def cluster_resources(self) -> dict:
        self.polls += 1
        arrived = self.arrive_after is not None and self.polls > self.arrive_after
        return dict(self.after if arrived else self.before)

    def request_resources(self, num_cpus=None, bundles=None) -> None:
        self.requests.append(bundles)


@pytest.fixture
def fake(monkeypatch):
    def make(before: dict, after: dict, arrive_after: int | None) -> FakeCluster:
        cluster = FakeCluster(before, after, arrive_after)
        monkeypatch.setattr(ray, "cluster_resources", cluster.cluster_resources)
        monkeypatch.setattr(ray.autoscaler.sdk, "request_resources", cluster.request_resources)
        monkeypatch.setattr(ray_runtime, "POLL_S", 0.01)
        monkeypatch.setattr(ray_runtime, "SAY_EVERY_S", 0.0)
        monkeypatch.setattr(ray_runtime, "_started_locally", False)
        monkeypatch.setattr(ray_runtime, "_requested", False)
        return cluster

    return make


GPU_BUNDLES = [{"GPU": 1.0}] * 4
WHAT = "tokenize asks for 4 actor(s) x 1 GPU"
HINT = "set tokenize.num_gpus_per_actor to 0 to tokenize on CPU"


def test_totals_sum_the_bundles_and_drop_zeros():
    assert totals([{"GPU": 1, "CPU": 2}, {"GPU": 1, "CPU": 0}]) == {"GPU": 2, "CPU": 2}
    assert totals([{"GPU": 0}] * 3) == {}


def test_enough_resources_pass_without_asking_the_autoscaler(fake):
    cluster = fake({"GPU": 4.0, "CPU": 8.0}, {}, None)
    assert require_resources(GPU_BUNDLES, WHAT, HINT, wait_s=60)["GPU"] == 4.0
    assert require_resources([{"GPU": 0}] * 8, WHAT, HINT)["CPU"] == 8.0  # asks for nothing
    assert cluster.requests == []


def test_without_a_wait_a_short_cluster_fails_at_once_in_one_sentence(fake):
    cluster = fake({"GPU": 1.0}, {"GPU": 4.0}, 1)
    with pytest.raises(ClusterError) as info:
        require_resources(GPU_BUNDLES, WHAT, HINT, wait_s=0)
    message = str(info.value)
    assert message.startswith(f"{WHAT} = 4 GPU(s) but the Ray cluster has 1; {HINT}")
    assert "base.cluster_wait_s" in message and "\n" not in message
    assert cluster.requests == [] and cluster.polls == 1


def test_a_local_instance_never_waits(fake, monkeypatch):
    cluster = fake({}, {"GPU": 4.0}, 1)
    monkeypatch.setattr(ray_runtime, "_started_locally", True)
    with pytest.raises(ClusterError, match="4 GPU"):
        require_resources(GPU_BUNDLES, WHAT, HINT, wait_s=600)
    assert cluster.requests == []


def test_an_autoscaling_cluster_is_asked_and_waited_for(fake, caplog):
    cluster = fake({"CPU": 32.0}, {"CPU": 32.0, "GPU": 8.0}, 3)
    with caplog.at_level(logging.WARNING, logger="pipeline.ray_runtime"):
        have = require_resources(GPU_BUNDLES, WHAT, HINT, wait_s=30)
    assert have["GPU"] == 8.0
    # One bundle per actor, so that the autoscaler may spread them over nodes.
    assert cluster.requests == [[{"GPU": 1.0}] * 4] and ray_runtime._requested
    assert cluster.polls == 4
    said = caplog.text
    assert f"{WHAT} = 4 GPU(s) but the Ray cluster has 0: waiting up to" in said
    assert "the cluster has what it needs after" in said


def test_the_wait_ends_in_one_sentence_when_nothing_comes(fake):
    cluster = fake({"GPU": 0.0}, {}, None)
    with pytest.raises(ClusterError) as info:
        require_resources(GPU_BUNDLES, WHAT, HINT, wait_s=0.2)
    message = str(info.value)
    assert "after waiting 0.2 s for the autoscaler" in message and HINT in message
    assert "raise base.cluster_wait_s" in message and "\n" not in message
    assert cluster.requests == [[{"GPU": 1.0}] * 4] and cluster.polls > 2
