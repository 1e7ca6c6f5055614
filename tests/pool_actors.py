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


class MemoryFaultWorker:
    """Meets a scripted fault on each attempt at a payload, counted across worker processes by the
    files `attempt-<name>-<pid>` in the control folder: `payload["script"][i]` is what attempt i+1
    meets (attempts past the script complete):
      "MemoryError"  raises MemoryError
      "torch"        asks torch for a tensor no machine has (a real allocator failure)
      "die"          SIGKILLs its own process
      "hog"          allocates (and touches) 256 MiB after 256 MiB until something kills it, at most
                     `payload["hog_cap_mib"]`: Ray's memory monitor, in a cluster started with a
                     low `RAY_memory_usage_threshold`
    With `payload["raise"]` the error is raised out of evaluate() (a Ray task error); otherwise it
    is returned the way CandidateWorker returns it (evaluators.worker.is_out_of_memory)."""

    def __init__(self, control: str):
        self.control = Path(control)
        self.held: list = []

    def ready(self) -> dict:
        return {"pid": os.getpid()}

    def evaluate(self, payload: dict) -> dict:
        name = payload["name"]
        (self.control / f"attempt-{name}-{os.getpid()}").touch()
        attempt = len(list(self.control.glob(f"attempt-{name}-*")))
        script = payload.get("script", [])
        what = script[attempt - 1] if attempt <= len(script) else None
        try:
            if what == "MemoryError":
                raise MemoryError("scripted")
            if what == "torch":
                import torch

                torch.empty(2**62, dtype=torch.uint8)
            if what == "die":
                os.kill(os.getpid(), signal.SIGKILL)
            if what == "hog":
                import numpy as np

                for _ in range(payload["hog_cap_mib"] // 256):
                    self.held.append(np.ones(2**25))  # 256 MiB of float64, every page written
                return {"status": "complete", "metrics": {}, "pid": os.getpid(), "survived": True}
            if what == "RuntimeError":
                raise RuntimeError("an ordinary failure of this payload")
        except Exception as err:
            if payload.get("raise"):
                raise
            from evaluators.worker import is_out_of_memory

            return {"status": "failed", "error": f"{type(err).__name__}: {err}", "pid": os.getpid(),
                    "fault": "memory" if is_out_of_memory(err) else None}
        return {"status": "complete", "metrics": {"value": float(attempt)}, "pid": os.getpid()}


def allocating_scorer(model, tokenizer, control: str, mib: int) -> dict:
    """A `python` evaluator for CandidateWorker: notes its process in the control folder
    (`scoring-<pid>`), then asks for a `mib` MiB tensor (address space; a few pages written)."""
    import torch

    Path(control, f"scoring-{os.getpid()}").touch()
    big = torch.empty(mib * 2**20, dtype=torch.uint8)
    big[:4096].fill_(1)
    return {"value": float(big[:4096].sum()) / 4096 + float(model.get_input_embeddings().weight[0, 0])}
