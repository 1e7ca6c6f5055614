"""A light Ray actor for the pool tests: it follows instructions in its payload and in files of a
control folder, so a test can hold it mid-evaluation, kill it, or make it fail to start."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


class ScriptedWorker:
    def __init__(self, control: str, start_failures: int = 0):
        self.control = Path(control)
        # the first `start_failures` constructions (counted across processes) raise
        with open(self.control / "starts", "a") as f:
            f.write(f"{os.getpid()}\n")
        if len((self.control / "starts").read_text().split()) <= start_failures:
            raise RuntimeError("cannot load the inputs (scripted)")

    def ready(self) -> dict:
        return {"pid": os.getpid(), "directions": {"value": "maximize"}}

    def evaluate(self, payload: dict) -> dict:
        (self.control / f"running-{payload['name']}-{os.getpid()}").touch()
        if payload.get("die"):
            os.kill(os.getpid(), signal.SIGKILL)
        if payload.get("hold"):
            deadline = time.monotonic() + 120
            while not (self.control / "release").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        return {"status": "complete", "metrics": {"value": payload["value"]}, "pid": os.getpid()}
