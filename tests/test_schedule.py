"""Scheduling: cluster layout, bounded in-flight streaming, errors and retries, cluster choice."""

from __future__ import annotations

import importlib.util
import socket
import threading
import time
from collections.abc import Iterator

import dask
import pytest
from distributed import Client, LocalCluster

from wsi_pipeline.config import RunConfig
from wsi_pipeline.errors import ConfigError, SlideError
from wsi_pipeline.schedule import Layout, local_layout, open_client, stream_tiles


def test_default_layout_is_one_single_threaded_worker_per_core() -> None:
    assert local_layout(RunConfig(), cpus=2) == Layout(2, 1, 1)
    assert local_layout(RunConfig(), cpus=16) == Layout(16, 1, 1)


def test_layout_splits_the_cores_given_one_of_workers_or_threads() -> None:
    assert local_layout(RunConfig(workers=1), cpus=2) == Layout(1, 2, 1)
    assert local_layout(RunConfig(threads_per_worker=2), cpus=8) == Layout(4, 2, 1)
    assert local_layout(RunConfig(workers=1, threads_per_worker=1), cpus=2) == Layout(1, 1, 2)
    assert local_layout(RunConfig(workers=4, threads_per_worker=2), cpus=2) == Layout(4, 2, 1)
    assert Layout(3, 2).total_threads == 6


# In-process cluster (threads) so the task functions below can share counters with the test.
@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    with (
        LocalCluster(n_workers=1, threads_per_worker=4, processes=False, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        yield client


class Gauge:
    """Counts tasks running at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.peak = 0
        self.failed_once: set[int] = set()

    def work(self, item: int) -> int:
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        time.sleep(0.05)
        with self.lock:
            self.running -= 1
        return item


GAUGES: dict[str, Gauge] = {}


def gauged(item: tuple[str, int]) -> int:
    return GAUGES[item[0]].work(item[1])


def test_results_stream_with_at_most_max_in_flight_running(client: Client) -> None:
    GAUGES["a"] = gauge = Gauge()
    seen: list[int] = []
    stream_tiles(client, [("a", i) for i in range(12)], seen.append, max_in_flight=2, fn=gauged)
    assert sorted(seen) == list(range(12))
    assert gauge.peak == 2  # the cluster has 4 threads: the bound, not the cluster, limits it


def test_results_held_by_the_consumer_count_as_in_flight(client: Client) -> None:
    """A consumer holding results (the stitcher's reorder buffer) throttles submission, but
    one task always stays in flight, so the stream never stalls."""
    GAUGES["b"] = gauge = Gauge()
    seen: list[int] = []
    stream_tiles(client, [("b", i) for i in range(6)], seen.append, max_in_flight=3, held=lambda: 3, fn=gauged)
    assert sorted(seen) == list(range(6))
    assert gauge.peak == 1


def fails_on_three(item: int) -> int:
    if item == 3:
        raise SlideError("/slides/x.svs", "could not be read at level 0", "copy it again")
    time.sleep(0.02)
    return item


def test_a_task_error_propagates_with_its_type(client: Client) -> None:
    seen: list[int] = []
    with pytest.raises(SlideError, match="could not be read"):
        stream_tiles(client, range(8), seen.append, max_in_flight=2, retries=0, fn=fails_on_three)
    assert 3 not in seen


CALLS: dict[int, int] = {}


def always_corrupt(item: int) -> int:
    """A tile whose bytes are damaged: the same user error however often it is tried."""
    with FLAKY.lock:
        CALLS[item] = CALLS.get(item, 0) + 1
    raise SlideError("slide.tif", f"tile {item} could not be read (corrupt JPEG)", "copy the file again")


def test_a_user_error_is_not_retried(client: Client) -> None:
    CALLS.clear()
    with pytest.raises(SlideError, match="tile 0 could not be read") as info:
        stream_tiles(client, range(1), lambda _: None, max_in_flight=1, retries=3, fn=always_corrupt)
    assert CALLS == {0: 1}  # retries are for workers that died or transient faults, not for bad bytes
    assert info.value.fix == "copy the file again"


FLAKY = Gauge()


def fails_first_time(item: int) -> int:
    with FLAKY.lock:
        first = item not in FLAKY.failed_once
        FLAKY.failed_once.add(item)
    if first and item % 2:
        raise OSError(f"transient failure on {item}")
    return item


def test_retries_rerun_a_failed_task(client: Client) -> None:
    seen: list[int] = []
    stream_tiles(client, range(6), seen.append, max_in_flight=3, retries=1, fn=fails_first_time)
    assert sorted(seen) == list(range(6))
    with pytest.raises(ValueError, match="max_in_flight"):
        stream_tiles(client, range(2), seen.append, max_in_flight=0, fn=fails_first_time)


@pytest.mark.skipif(importlib.util.find_spec("dask_jobqueue") is not None, reason="dask-jobqueue is installed")
def test_jobqueue_cluster_without_the_package_says_how_to_install_it() -> None:
    with pytest.raises(ConfigError, match="pip install dask-jobqueue"), open_client(RunConfig(cluster="slurm")):
        pass


def test_unreachable_scheduler_is_a_config_error() -> None:
    with socket.socket() as sock:  # a free port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = RunConfig(scheduler=f"tcp://127.0.0.1:{port}")
    with (
        dask.config.set({"distributed.comm.timeouts.connect": "1s"}),
        pytest.raises(ConfigError, match=f"cannot reach the Dask scheduler at tcp://127.0.0.1:{port}"),
        open_client(config),
    ):
        pass
