"""A Ray driver for tests/test_cluster.py, run as a subprocess: python cluster_driver.py MODE OUT_JSON [ADDRESS]

MODE:
  wait   private cluster (RayCluster(num_cpus=2)), one actor busy in a loop and one idle; writes
         OUT_JSON, then waits inside the `with` block until it is killed or interrupted.
  clean  the same, but leaves the `with` block normally once the file OUT_JSON with suffix .go exists.
  join   RayCluster(address=ADDRESS or None) on an existing cluster; two actors of num_cpus=1 each;
         writes OUT_JSON (with the node ids the actors ran on) and exits normally.

OUT_JSON is written atomically (the test polls for it): {"driver", "owns_cluster", "actors",
"nodes", "tree": [[pid, start], ...]} where tree is this process's descendant tree from /proc.
"""

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evolve.cluster import RayCluster  # noqa: E402


def descendants(root: int) -> list[list[int]]:
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = open(f"/proc/{name}/stat", "rb").read()
            except OSError:
                continue
            fields = stat[stat.rindex(b")") + 2:].split()
            table[int(name)] = (int(fields[1]), int(fields[19]))
    out, stack = [], [root]
    while stack:
        parent = stack.pop()
        for pid, (ppid, start) in table.items():
            if ppid == parent:
                out.append([pid, start])
                stack.append(pid)
    return out


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    address = sys.argv[3] if len(sys.argv) > 3 else None
    import ray

    @ray.remote(num_cpus=1)
    class Probe:
        def info(self):
            return os.getpid(), ray.get_runtime_context().get_node_id()

        def spin(self):
            x = 0
            while True:  # busy: a long computation that never returns
                x = (x * 31 + 7) % 1000003

    cluster = RayCluster(address=address) if mode == "join" else RayCluster(num_cpus=2, quiet=True)
    with cluster:
        busy, idle = Probe.remote(), Probe.remote()
        infos = ray.get([busy.info.remote(), idle.info.remote()])
        if mode != "join":
            busy.spin.remote()
            time.sleep(0.5)  # let the spin start
        result = {
            "driver": os.getpid(),
            "owns_cluster": cluster.owns_cluster,
            "actors": [pid for pid, _ in infos],
            "nodes": [node for _, node in infos],
            "tree": descendants(os.getpid()),
        }
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        tmp.rename(out)
        if mode == "wait":
            while True:
                time.sleep(1)
        if mode == "clean":  # leave once the test has seen the cluster
            go = out.with_suffix(".go")
            while not go.exists():
                time.sleep(0.1)
    print("driver: left the with block", flush=True)


if __name__ == "__main__":
    main()
