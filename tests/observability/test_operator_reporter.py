"""The trainer's OperatorReporter: delivers the newest progress, and never holds up or breaks training."""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from kubetune_trainer.operator_reporter import OperatorReporter
from kubetune_trainer.progress_model import ProgressUpdate


def progress(step: int, **metrics: float) -> ProgressUpdate:
    return ProgressUpdate.model_validate(
        {
            "epoch": 1 + step // 100,
            "totalEpochs": 3,
            "step": step,
            "totalSteps": 300,
            "percent": step / 3,
            "metrics": metrics,
        }
    )


class Operator:
    """A stand-in progress endpoint on 127.0.0.1 that records what arrives and answers from a script."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.tokens: list[str] = []
        self.answers: list[tuple[int, dict[str, str]]] = []  # consumed first; then 200
        self.hold = threading.Event()  # set: requests wait until released
        self.release = threading.Event()
        self.arrived = threading.Event()
        self.done = threading.Condition()
        operator = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                operator.arrived.set()
                if operator.hold.is_set():
                    operator.release.wait(30)
                code, headers = operator.answers.pop(0) if operator.answers else (200, {})
                if code == 200:
                    operator.received.append(json.loads(body))
                    operator.tokens.append(self.headers["Authorization"].removeprefix("Bearer "))
                self.send_response(code)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")
                with operator.done:
                    operator.done.notify_all()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1/progress/vision/cats"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, count: int, timeout: float = 30) -> None:
        with self.done:
            assert self.done.wait_for(lambda: len(self.received) >= count, timeout), self.received

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def operator() -> Iterator[Operator]:
    op = Operator()
    yield op
    op.stop()


@pytest.fixture
def token(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text("token-one\n")
    return path


def reporter(url: str, token: Path, **kwargs: Any) -> OperatorReporter:
    kwargs.setdefault("min_interval_s", 0.05)
    kwargs.setdefault("max_backoff_s", 0.2)
    kwargs.setdefault("close_timeout_s", 5.0)
    return OperatorReporter(url, token, **kwargs)


def test_updates_arrive_with_the_token_read_fresh_each_time(operator: Operator, token: Path) -> None:
    """Projected tokens rotate: each send reads the file the kubelet keeps current."""
    rep = reporter(operator.url, token)
    rep.report(progress(10, trainLoss=1.0))
    operator.wait_for(1)
    token.write_text("token-two\n")
    rep.report(progress(20, trainLoss=0.9))
    rep.close()

    assert [body["step"] for body in operator.received] == [10, 20]
    assert operator.tokens == ["token-one", "token-two"]
    assert operator.received[1]["metrics"] == {"trainLoss": 0.9}


def test_report_returns_while_the_operator_has_not_answered(operator: Operator, token: Path) -> None:
    """Training goes on while a request hangs: every report() returns, and only the newest is sent next."""
    operator.hold.set()
    rep = reporter(operator.url, token)
    rep.report(progress(1, trainLoss=2.0))
    assert operator.arrived.wait(10)

    for step in range(2, 200):
        rep.report(progress(step, trainLoss=2.0 - step / 100))
    rep.report(progress(200, valAccuracy=0.5))  # an evaluation
    rep.report(progress(201, trainLoss=0.1))  # and a step right after it

    assert not operator.release.is_set()  # we got here while the first request still hung
    operator.hold.clear()
    operator.release.set()
    rep.close()

    steps = [body["step"] for body in operator.received]
    assert steps == [1, 201]
    # The overtaken updates were merged, so the evaluation's accuracy still arrived.
    assert operator.received[1]["metrics"] == {"trainLoss": 0.1, "valAccuracy": 0.5}


def test_an_operator_that_is_down_only_delays_progress(token: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1/progress/vision/cats"
    rep = reporter(url, token, close_timeout_s=0.5)
    for step in range(50):
        rep.report(progress(step))  # connection refused, again and again: no exception reaches training
    rep.close()
    assert rep.sent == 0 and rep.dropped == 1


def test_errors_are_retried_until_the_operator_answers(operator: Operator, token: Path) -> None:
    operator.answers = [(503, {"Retry-After": "0"}), (500, {}), (401, {}), (404, {})]
    rep = reporter(operator.url, token)
    rep.report(progress(5, trainLoss=1.2))
    operator.wait_for(1)
    rep.close()
    assert operator.received[0]["step"] == 5
    assert rep.sent == 1 and rep.dropped == 0


def test_throttling_waits_for_retry_after_then_sends_the_newest(operator: Operator, token: Path) -> None:
    operator.answers = [(429, {"Retry-After": "1"})]
    rep = reporter(operator.url, token)
    rep.report(progress(1))
    rep.report(progress(2))
    operator.wait_for(1)
    rep.close()
    assert [body["step"] for body in operator.received][-1] == 2


def test_an_update_the_operator_refuses_as_malformed_is_dropped_not_retried(operator: Operator, token: Path) -> None:
    operator.answers = [(400, {})]
    rep = reporter(operator.url, token)
    rep.report(progress(1))
    with operator.done:
        operator.done.wait_for(lambda: not operator.answers, 10)
    rep.report(progress(2))
    rep.close()
    assert [body["step"] for body in operator.received] == [2]
    assert rep.dropped == 1


def test_non_finite_metrics_are_left_out_rather_than_breaking_the_update(operator: Operator, token: Path) -> None:
    """A diverged loss (NaN) cannot go into JSON or the status; the rest of the update still arrives."""
    rep = reporter(operator.url, token)
    rep.report(progress(7, trainLoss=float("nan"), imagesPerSecond=100.0))
    rep.close()
    assert [body["step"] for body in operator.received] == [7]
    assert operator.received[0]["metrics"] == {"imagesPerSecond": 100.0}


def test_a_missing_token_file_is_retried_until_it_appears(operator: Operator, tmp_path: Path) -> None:
    """The kubelet writes the projected token shortly after the container starts."""
    path = tmp_path / "late-token"
    rep = reporter(operator.url, path)
    rep.report(progress(3))
    path.write_text("token-late")
    operator.wait_for(1)
    rep.close()
    assert operator.tokens == ["token-late"]


def reporter_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "kubetune_trainer.operator_reporter" and r.levelno >= logging.WARNING
    ]


def test_a_token_that_never_appears_is_one_warning_naming_where_it_looked(
    operator: Operator, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue #13: the demo's trainer looked for its token at a relative path and nobody could tell why
    progress never arrived. The warning says what is missing, where (absolute), and what it means."""
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.DEBUG, logger="kubetune_trainer.operator_reporter")
    rep = reporter(operator.url, Path("volumes") / "kubetune-token" / "token", close_timeout_s=1.0)
    for step in range(1, 30):
        rep.report(progress(step))
    rep.close()

    assert rep.sent == 0 and operator.received == []
    retries = [r for r in caplog.records if "failed" in r.getMessage() and r.levelno < logging.WARNING]
    assert retries, "it kept trying (below warning level)"
    (warning,) = reporter_warnings(caplog)
    assert f"{tmp_path / 'volumes' / 'kubetune-token' / 'token'} cannot be read (No such file or directory)" in warning
    assert "status.progress" in warning and "stay empty" in warning and "mounts it" in warning


def test_an_operator_that_is_down_is_one_warning_naming_its_url(token: Path, caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1/progress/vision/cats"
    caplog.set_level(logging.DEBUG, logger="kubetune_trainer.operator_reporter")
    rep = reporter(url, token, close_timeout_s=1.0)
    for step in range(1, 30):
        rep.report(progress(step))
    rep.close()

    (warning,) = reporter_warnings(caplog)
    assert f"cannot reach the operator's progress endpoint at {url}" in warning
    assert "Connection refused" in warning and "KUBETUNE_PROGRESS_URL" in warning and "status.progress" in warning


def test_throttling_is_no_warning(operator: Operator, token: Path, caplog: pytest.LogCaptureFixture) -> None:
    operator.answers = [(429, {"Retry-After": "0"})] * 3
    rep = reporter(operator.url, token)
    rep.report(progress(1))
    operator.wait_for(1)
    rep.close()
    assert reporter_warnings(caplog) == []
