"""Scheduling: cluster layout (CPU and GPU), bounded in-flight streaming shared by slides,
errors and retries, cluster choice.

No GPU is needed: the GPU layout is checked as far as a CPU machine can see it (one
worker per GPU, each with the Dask resource ``GPU=1`` and ``CUDA_VISIBLE_DEVICES`` set to
its GPU; inference tasks restricted to that resource, post-processing tasks not; results
equal to one-step tiles), on real clusters running the tiles on the CPU. That the workers
then really run on their GPUs is not tested here.
"""

from __future__ import annotations

import importlib.util
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask
import numpy as np
import pytest
from distributed import Client, LocalCluster

from wsi_pipeline.config import RunConfig
from wsi_pipeline.errors import ConfigError, SlideError
from wsi_pipeline.schedule import (
    GPU_RESOURCE,
    GpuLayout,
    Layout,
    Stopped,
    TileBudget,
    gpu_layout,
    gpu_worker_specs,
    local_layout,
    open_client,
    stream_tiles,
    visible_gpus,
)

SAMPLE = Path(__file__).resolve().parents[1] / "sample_slides" / "CMU-1-Small-Region-pyramid.tif"


def test_default_layout_is_one_single_threaded_worker_per_core_with_torch() -> None:
    assert local_layout(RunConfig(runtime="torch"), cpus=2) == Layout(2, 1, 1)
    assert local_layout(RunConfig(runtime="torch"), cpus=16) == Layout(16, 1, 1)


def test_default_layout_with_openvino_is_one_worker_with_a_thread_and_a_stream_per_core() -> None:
    from wsi_pipeline.engine.runtime import openvino_available

    if not openvino_available():  # found, not imported: this process stays free of the library
        pytest.skip("OpenVINO is not installed")
    assert local_layout(RunConfig(), cpus=2) == Layout(1, 2, 2, 2)  # runtime auto: OpenVINO here
    assert local_layout(RunConfig(runtime="openvino"), cpus=16) == Layout(1, 16, 16, 16)
    assert local_layout(RunConfig(runtime="auto", device="cuda"), cpus=2) == Layout(2, 1, 1)  # GPUs: torch
    assert local_layout(RunConfig(workers=2), cpus=2) == Layout(2, 1, 1)  # the user's choice wins


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


def test_two_slides_share_one_bound_and_the_next_starts_at_the_tail(client: Client) -> None:
    """The batch's overlap: slide B's stream starts when slide A has submitted its last
    tile, takes the slots A's tail frees, and both together stay within the one bound."""
    GAUGES["c"] = gauge = Gauge()
    budget = TileBudget(3)
    seen: dict[str, list[int]] = {"a": [], "b": []}
    a_submitted = threading.Event()
    order: list[str] = []

    def slide_b() -> None:
        a_submitted.wait(timeout=30)
        order.append("b starts")
        stream_tiles(client, [("c", 100 + i) for i in range(9)], seen["b"].append, max_in_flight=99, fn=gauged,
                     budget=budget)

    def a_consume(item: int) -> None:
        seen["a"].append(item)
        if len(seen["a"]) == 9:
            order.append("a got its last tile")

    thread = threading.Thread(target=slide_b)
    thread.start()
    stream_tiles(client, [("c", i) for i in range(9)], a_consume, max_in_flight=99, fn=gauged, budget=budget,
                 on_submitted=a_submitted.set)
    thread.join(timeout=60)
    assert sorted(seen["a"]) == list(range(9)) and sorted(seen["b"]) == list(range(100, 109))
    assert order[0] == "b starts"  # before A's tail was done
    assert gauge.peak <= 3  # the cluster has 4 threads: the shared bound limits both slides together


def sleeps(item: int) -> int:
    time.sleep(0.2)
    return item


def test_a_stopped_budget_ends_the_stream_and_cancels_its_tasks(client: Client) -> None:
    budget = TileBudget(2)
    seen: list[int] = []

    def consume(item: int) -> None:
        seen.append(item)
        if len(seen) == 2:
            threading.Timer(0.05, budget.stop, args=(KeyboardInterrupt(),)).start()  # as the CLI's SIGTERM does

    with pytest.raises(Stopped):
        stream_tiles(client, range(50), consume, max_in_flight=2, fn=sleeps, budget=budget)
    assert 2 <= len(seen) < 10
    with pytest.raises(Stopped):  # a stream started after the stop does not start at all
        stream_tiles(client, range(3), seen.append, max_in_flight=2, fn=sleeps, budget=budget)


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


# ----------------------------------------------------------------------------- GPUs
def test_gpu_layout_is_one_worker_per_gpu_with_the_cores_as_threads() -> None:
    assert visible_gpus("cuda", 2, environ={}) == ["0", "1"]
    assert visible_gpus("cuda:1", 2, environ={"CUDA_VISIBLE_DEVICES": "3,5"}) == ["5"]  # as the driver sees them
    assert visible_gpus("cuda", 1, environ={"CUDA_VISIBLE_DEVICES": "2"}) == ["2"]
    with pytest.raises(ConfigError, match=r"asks for GPU 2, but torch sees 2 GPU\(s\).*cuda:0..cuda:1"):
        visible_gpus("cuda:2", 2, environ={})
    assert gpu_layout(RunConfig(device="cuda"), ["0", "1"], cpus=16) == GpuLayout(("0", "1"), 8)
    assert gpu_layout(RunConfig(device="cuda", workers=3), ["0", "1"], cpus=16) == GpuLayout(("0", "1", "0"), 5)
    assert gpu_layout(RunConfig(device="cuda", threads_per_worker=2), ["7"], cpus=16) == GpuLayout(("7",), 2)
    with pytest.raises(ConfigError, match="torch sees no GPU"):
        gpu_layout(RunConfig(device="cuda"), [], cpus=4)
    specs = gpu_worker_specs(GpuLayout(("0", "1"), 4), memory_limit=2**30)
    assert [spec["options"]["resources"] for spec in specs.values()] == [{"GPU": 1}, {"GPU": 1}]
    assert [spec["options"]["env"] for spec in specs.values()] == [{"CUDA_VISIBLE_DEVICES": "0"},
                                                                    {"CUDA_VISIBLE_DEVICES": "1"}]
    assert {spec["options"]["nthreads"] for spec in specs.values()} == {4}


def _visible_gpus_here() -> str:
    import os

    return os.environ.get("CUDA_VISIBLE_DEVICES", "")


def test_cuda_on_a_local_cluster_starts_one_worker_per_gpu_with_a_gpu_resource() -> None:
    """The real LocalCluster path of --device cuda, given two GPU ids (the workers start
    on this CPU machine; nothing runs CUDA)."""
    config = RunConfig(device="cuda", threads_per_worker=1)
    with open_client(config, gpus=["0", "1"]) as cluster:
        workers = cluster.client.scheduler_info(n_workers=-1)["workers"].values()
        assert [(w["resources"], w["nthreads"]) for w in workers] == [({"GPU": 1}, 1), ({"GPU": 1}, 1)]
        assert sorted(cluster.client.run(_visible_gpus_here).values()) == ["0", "1"]
        assert cluster.resources == {GPU_RESOURCE: 1} and cluster.device == "cuda" and cluster.torch_threads == 1
        assert "2 worker(s) on GPU(s) 0, 1" in cluster.description


class Restrictions:
    """A scheduler plugin noting the resources each submitted task needs."""

    name = "restrictions"

    def __init__(self) -> None:
        self.seen: dict[str, dict] = {}

    def update_graph(self, scheduler, *, keys, **kwargs) -> None:
        for key in keys:
            task = scheduler.tasks.get(key)
            if task is not None:
                self.seen[str(key)] = dict(task.resource_restrictions or {})


@pytest.fixture(scope="module")
def gpu_like_client() -> Iterator[Client]:
    """An in-process cluster whose one worker has 3 threads and the resource GPU=1, as a
    GPU worker has (the tiles still run on the CPU)."""
    from distributed.diagnostics.plugin import SchedulerPlugin

    plugin = type("RestrictionsPlugin", (Restrictions, SchedulerPlugin), {})()
    with (
        LocalCluster(n_workers=1, threads_per_worker=3, processes=False, dashboard_address=None,
                     resources={GPU_RESOURCE: 1}) as cluster,
        Client(cluster) as client,
    ):
        client.register_plugin(plugin)
        yield client


def test_cuda_with_a_scheduler_uses_the_gpu_resource_its_workers_advertise(
    gpu_like_client: Client, client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    with open_client(RunConfig(device="cuda", scheduler=gpu_like_client.scheduler.address)) as cluster:
        assert cluster.resources == {GPU_RESOURCE: 1} and cluster.device is None  # the workers chose their GPUs
    with open_client(RunConfig(device="cuda", scheduler=client.scheduler.address)) as cluster:
        assert cluster.resources is None
    assert "advertise no GPU resource" in caplog.text and "--resources GPU=1" in caplog.text
    with open_client(RunConfig(scheduler=gpu_like_client.scheduler.address)) as cluster:
        assert cluster.resources is None  # on the CPU a tile is one task, whatever the workers have


def test_a_gpu_resource_lets_a_worker_run_one_inference_at_a_time(gpu_like_client: Client) -> None:
    GAUGES["gpu"] = gauge = Gauge()
    seen: list[int] = []
    stream_tiles(gpu_like_client, [("gpu", i) for i in range(6)], seen.append, max_in_flight=6, fn=gauged,
                 resources={GPU_RESOURCE: 1})
    assert sorted(seen) == list(range(6)) and gauge.peak == 1  # 3 threads, but one GPU


def test_with_a_gpu_resource_a_tile_is_inference_then_post_processing_off_the_gpu(
    gpu_like_client: Client, tmp_path: Path, torch_one_thread
) -> None:
    from _helpers import plumbing_model

    from wsi_pipeline.engine.infer import InferenceConfig
    from wsi_pipeline.slide import open_slide
    from wsi_pipeline.slide.base import SlideSpec
    from wsi_pipeline.slide.pyramid import write_pyramid
    from wsi_pipeline.tiling import tile_grid
    from wsi_pipeline.worker import TileTask, clear_caches, process_tile

    with open_slide(SAMPLE) as source:
        write_pyramid(source, tmp_path / "s.tif", region=(1000, 1000, 328, 328))
    model = plumbing_model(tmp_path / "tiny.safetensors", tmp_path / "s.tif")
    spec = SlideSpec(str(tmp_path / "s.tif"))
    with spec.open() as slide:
        tiles = tile_grid(slide.width, slide.height, (slide.mpp_x, slide.mpp_y), 0.25, 164, 24)
    infer = InferenceConfig(threads=1)
    tasks = [TileTask(spec, tile, str(model), 0.25, infer) for tile in tiles]
    results: list = []
    stream_tiles(gpu_like_client, tasks, results.append, max_in_flight=4, resources={GPU_RESOURCE: 1})
    try:
        one_step = {task.tile.index: process_tile(task) for task in tasks}
    finally:
        clear_caches()  # this thread's open slide
    assert sorted(r.index for r in results) == sorted(one_step)
    for result in results:
        expected = one_step[result.index]
        np.testing.assert_array_equal(result.core_labels, expected.core_labels)
        assert [n.centroid for n in result.nuclei] == [n.centroid for n in expected.nuclei]
        assert len(result.spill) == len(expected.spill) and result.engine == expected.engine
        assert set(result.seconds) == {"setup", "read", "infer", "postprocess"}
    assert sum(len(r.nuclei) for r in results) > 0
    seen = gpu_like_client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.plugins["restrictions"].seen)
    infer_keys = [k for k in seen if k.startswith("infer-tile-")]
    finish_keys = [k for k in seen if k.startswith("finish-tile-")]
    assert len(infer_keys) == len(finish_keys) == len(tasks)
    assert all(seen[k] == {GPU_RESOURCE: 1} for k in infer_keys)  # inference holds the GPU
    assert all(seen[k] == {} for k in finish_keys)  # post-processing runs on any thread


def _status_page(cluster: Any) -> int:
    """The HTTP status of the dashboard's /status page on the local scheduler's web server
    (the server runs either way, for /health; bokeh's pages only with the dashboard)."""
    import urllib.error
    import urllib.request

    port = cluster.client.cluster.scheduler.http_server.port
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


@pytest.mark.parametrize("wanted", [False, True])
def test_a_local_cluster_serves_the_dashboard_only_when_asked(wanted: bool) -> None:
    """Bokeh's dashboard costs every local run about a second of start-up, so it is opt-in."""
    with open_client(RunConfig(dashboard=wanted, workers=1, threads_per_worker=1)) as cluster:
        assert _status_page(cluster) == (200 if wanted else 404)
        assert (cluster.dashboard is not None) == wanted
