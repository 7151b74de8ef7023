"""testbed.wait.wait_http, the one start-up wait of the bench's servers, against real processes:
Python's own http.server for a server that comes up (or answers something other than 200), and a
process that dies on start."""

from __future__ import annotations

import subprocess
import sys

import pytest

from testbed.llmock import free_port
from testbed.wait import NotReady, wait_http


class Started:
    """A child process with its output in a log file, stopped by stop() (the callers' shape)."""

    def __init__(self, tmp_path, argv: list[str], cwd=None) -> None:
        self.log_path = tmp_path / "server.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(argv, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT)
        self.stops = 0

    def stop(self) -> None:
        self.stops += 1
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self._log.close()


@pytest.fixture
def http_server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    (root / "health").write_text("ok")
    port = free_port()
    server = Started(tmp_path, [sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
                                str(port)], cwd=root)
    server.url = f"http://127.0.0.1:{port}"
    yield server
    server.stop()


def test_returns_once_the_url_answers_200(http_server):
    waited = wait_http(f"{http_server.url}/health", http_server.proc, timeout=30, what="server",
                       log=http_server.log_path, on_fail=http_server.stop)
    assert 0 <= waited < 30
    assert http_server.stops == 0 and http_server.proc.poll() is None


def test_a_url_that_never_answers_200_times_out_with_the_callers_error_and_is_stopped(http_server):
    class ServerError(RuntimeError):
        pass

    wait_http(f"{http_server.url}/health", http_server.proc, timeout=30, what="server")
    with pytest.raises(ServerError, match=r"server not ready within 1 s \(GET .*/missing\)"):
        wait_http(f"{http_server.url}/missing", http_server.proc, timeout=1, what="server",
                  log=http_server.log_path, error=ServerError, on_fail=http_server.stop)
    assert http_server.stops == 1 and http_server.proc.poll() is not None


def test_a_process_that_dies_fails_at_once_with_its_exit_code_and_log_tail(tmp_path):
    dying = Started(tmp_path, [sys.executable, "-c",
                               "import sys; print('x' * 5000 + 'the reason it died', flush=True);"
                               " sys.exit(3)"])
    with pytest.raises(NotReady) as caught:
        wait_http(f"http://127.0.0.1:{free_port()}/health", dying.proc, timeout=60,
                  what="dying server", log=dying.log_path, on_fail=dying.stop)
    message = str(caught.value)
    assert message.startswith("dying server exited 3:\n")
    assert message.rstrip().endswith("the reason it died")
    assert len(message) < 4100  # the tail, not the whole log
    assert dying.stops == 1
