"""A `python -m meshllm serve` subprocess for tests: waits for it to listen and to be ready, reads its log."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path


class Serve:
    """A `python -m meshllm serve` process; stderr kept in a file to read its (and its devices') logs."""

    def __init__(self, model: Path, tmp: Path, *args: str) -> None:
        self.log_path = tmp / f"serve-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")
        cmd = [sys.executable, "-m", "meshllm", "serve", "--model", str(model), "--port", "0", "--threads", "1",
               *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.url = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_listening(self, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(r"listening on (http://\S+)", self.log())
            if m:
                return m.group(1)
            assert self.proc.poll() is None, f"serve exited: {self.log()[-2000:]}"
            time.sleep(0.02)
        raise AssertionError(f"serve did not listen in {timeout} s: {self.log()[-2000:]}")

    def wait_ready(self, timeout: float = 120) -> str:
        result: list[str] = []
        t = threading.Thread(target=lambda: result.append(self.proc.stdout.readline().decode()), daemon=True)
        t.start()
        t.join(timeout)
        assert result and result[0].startswith("meshllm-serve ready "), \
            f"serve not ready in {timeout} s: {result} {self.log()[-3000:]}"
        self.url = result[0].split()[-1]
        return self.url

    def get_json(self, path: str, timeout: float = 30) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post_json(self, path: str, body: dict, timeout: float = 60, key: str | None = None) -> dict:
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), headers=headers)
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
