"""The MLflow dashboard's names, tags and asynchronous sending (tracking/), without a server."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from megatron_lomdm.config.schema import Config, DiffusionConfig, ParallelConfig
from megatron_lomdm.tracking.dashboard import METRICS, DashboardRouter, Send, markdown_table, mlflow_name
from megatron_lomdm.tracking.run_info import default_run_name, git_state, run_tags
from megatron_lomdm.tracking.sender import BackgroundSender

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ("train/", "order/", "valid/", "perf/", "data/")


def test_every_name_is_in_a_section() -> None:
    for key, entry in METRICS.items():
        assert entry.name.startswith(SECTIONS), key
    assert mlflow_name("exponent_std") == "order/exponent_std"
    assert mlflow_name("tokens_per_s") == "perf/tokens_per_s"
    assert mlflow_name("data/token_share/web") == "data/token_share/web"
    assert mlflow_name("a_new_key") == "train/a_new_key"  # a new flat key never lands in "Model metrics"


def test_router_sends_counters_only_when_they_change() -> None:
    router = DashboardRouter()
    first = router.route({"loss": 1.0, "surrogate": 1.0, "data/skipped_shards": 0.0, "mfu": 0.0,
                          "num_tokens": 256.0, "exponent_std": 0.0})
    assert first == {"train/loss": 1.0, "perf/num_tokens": 256.0}  # zeros and the duplicate stay out
    second = router.route({"loss": 0.9, "data/skipped_shards": 1.0, "num_tokens": 256.0, "exponent_std": 0.1})
    assert second == {"train/loss": 0.9, "data/skipped_shards": 1.0, "order/exponent_std": 0.1}
    third = router.route({"loss": 0.8, "data/skipped_shards": 1.0, "exponent_std": 0.0})
    assert third == {"train/loss": 0.8, "order/exponent_std": 0.0}  # back to zero is a change


def test_readme_documents_the_table() -> None:
    readme = (ROOT / "README.md").read_text()
    assert markdown_table() in readme, "README.md's MLflow table differs from tracking.dashboard.markdown_table()"


def _cfg(name: str, **parallel: object) -> Config:
    return Config(diffusion=DiffusionConfig(name=name), parallel=ParallelConfig(**parallel))


def test_default_run_name_says_what_the_run_is() -> None:
    assert default_run_name(_cfg("lomdm"), tp=1, pp=1, dp=2, num_corruptions=2) == "lomdm-c1=0.7-c2=0.65-K2-tp1pp1dp2"
    assert default_run_name(_cfg("mdlm"), tp=2, pp=1, dp=1, num_corruptions=1) == "mdlm-tp2pp1dp1"
    assert default_run_name(_cfg("poly", backend="deepspeed", zero=2), tp=1, pp=1, dp=4,
                            num_corruptions=1) == "poly-c1=0.7-tp1pp1dp4-zero2-deepspeed"
    # sequence parallelism and interleaved (virtual) pipeline stages are part of the layout
    assert default_run_name(_cfg("mdlm", tp=2, sequence_parallel=True), tp=2, pp=1, dp=1,
                            num_corruptions=1) == "mdlm-tp2pp1dp1-sp"
    assert default_run_name(_cfg("mdlm", pp=2, virtual_stages=2), tp=1, pp=2, dp=1,
                            num_corruptions=1) == "mdlm-tp1pp2dp1-vp2"


def test_run_tags_hold_what_a_comparison_filters_on() -> None:
    tags = run_tags(_cfg("lomdm", backend="deepspeed", zero=1), tp=1, pp=2, dp=1, num_corruptions=2,
                    data_fingerprint="ab" * 32)
    assert {k: tags[k] for k in ("family", "c1", "c2", "K", "layout", "zero", "backend", "precision")} == {
        "family": "lomdm", "c1": "0.7", "c2": "0.65", "K": "2", "layout": "tp1_pp2_dp1", "zero": "1",
        "backend": "deepspeed", "precision": "bf16"}
    assert tags["data_manifest"] == "ab" * 32 and tags["data"] == "ab" * 8
    assert (tags["sequence_parallel"], tags["virtual_stages"]) == ("false", "1")
    sp_vp = run_tags(_cfg("lomdm", tp=2, pp=2, sequence_parallel=True, virtual_stages=2), tp=2, pp=2, dp=1,
                     num_corruptions=2, data_fingerprint="ab" * 32)
    assert (sp_vp["sequence_parallel"], sp_vp["virtual_stages"], sp_vp["layout"]) == ("true", "2", "tp2_pp2_dp1")
    assert all(isinstance(v, str) for v in tags.values())
    sha, dirty = git_state()
    assert tags["git_sha"] == sha and tags["git_dirty"] in ("true", "false", "unknown")
    assert git_state(Path("/")) == ("unknown", None)


def test_sender_batches_in_order_and_never_blocks_the_caller() -> None:
    sent: list[list[int]] = []
    gate = threading.Event()

    def send(items: list[int]) -> None:
        gate.wait(10)
        sent.append(items)

    sender = BackgroundSender(send, on_error=pytest.fail, batch=4)
    t0 = time.perf_counter()
    for i in range(10):
        sender.put([i])
    assert time.perf_counter() - t0 < 0.5  # the server is "stuck" and the caller did not wait
    gate.set()
    assert sender.close(timeout=10)
    assert [i for batch in sent for i in batch] == list(range(10)) and max(map(len, sent)) <= 4


def test_sender_reports_the_first_failure_once_and_stops() -> None:
    errors: list[Exception] = []
    calls = []

    def send(items: list[int]) -> None:
        calls.append(items)
        raise ConnectionError("server gone")

    sender = BackgroundSender(send, on_error=errors.append)
    sender.put([1])
    deadline = time.time() + 10
    while not sender.failed and time.time() < deadline:
        time.sleep(0.01)
    for i in range(100):
        sender.put([i])
    assert not sender.close(timeout=10)
    assert len(errors) == 1 and len(calls) == 1


def test_sender_close_waits_at_most_its_timeout() -> None:
    sender = BackgroundSender(lambda items: time.sleep(5), on_error=pytest.fail, capacity=10)
    sender.put(list(range(20)))
    assert sender.dropped > 0
    t0 = time.perf_counter()
    assert not sender.close(timeout=0.3)
    assert time.perf_counter() - t0 < 2


def test_mlflow_tracker_renames_and_counts_restarts(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from megatron_lomdm.tracking.mlflow_tracker import MLflowTracker, default_uri

    uri = default_uri(tmp_path)

    def open_run(asynchronous: bool) -> MLflowTracker:
        return MLflowTracker(uri=uri, experiment="unit", run_dir=tmp_path, run_name="r", tags={"family": "lomdm"},
                             asynchronous=asynchronous)

    tracker = open_run(asynchronous=True)
    for step in (1, 2, 3):
        tracker.log_metrics({"loss": 1.0 / step, "surrogate": 1.0 / step, "data/fetched_shards": float(step > 2),
                             "exponent_std": 0.1 * step}, step)
    tracker.log_metrics({"valid/nelbo": 2.0, "valid/num_tokens": 64}, 3)
    tracker.close()
    again = open_run(asynchronous=False)  # a requeued job reopens the same MLflow run; here sending in-line
    again.log_metrics({"loss": 0.2, "data/fetched_shards": 1.0}, 4)
    again.close()
    assert again.run_id == tracker.run_id
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(tracker.run_id)
    assert set(run.data.metrics) == {"train/loss", "order/exponent_std", "data/fetched_shards", "valid/nelbo",
                                     "valid/num_tokens"}
    assert [m.step for m in client.get_metric_history(tracker.run_id, "train/loss")] == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(tracker.run_id, "data/fetched_shards")] == [3, 4]
    assert run.data.tags["restarts"] == "1" and run.data.tags["family"] == "lomdm"
