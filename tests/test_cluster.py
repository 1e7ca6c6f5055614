"""evolve.cluster.RayCluster against real Ray (no fakes), Linux.

- a private cluster leaves no process behind when its driver is SIGKILLed, exits normally, or is
  interrupted (KeyboardInterrupt);
- joining an existing two-node cluster (started here with `ray start`) passes no resources, uses
  both nodes, and leaves the cluster running.

The drivers run as subprocesses (tests/cluster_driver.py). Processes are followed by (pid, start
time) read from /proc, so a pid reused by an unrelated process is never taken for a survivor. This
file finds the processes itself, independently of evolve.cluster's own bookkeeping.
"""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from test_search import ENV as SEARCH_ENV, EVOLVE, search_yaml, trials as search_trials

DRIVER = Path(__file__).with_name("cluster_driver.py")
RAY = Path(sys.executable).parent / "ray"

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


# --- /proc ------------------------------------------------------------------------------------------


def proc_table() -> dict[int, tuple[int, int, str]]:
    """{pid: (ppid, start time, state)}"""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2:].split()
        table[int(name)] = (int(fields[1]), int(fields[19]), fields[0].decode())
    return table


def descendants(roots, table) -> set[tuple[int, int]]:
    children = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, stack = set(), list(roots)
    while stack:
        for child in children.get(stack.pop(), ()):
            if (child, table[child][1]) not in out:
                out.add((child, table[child][1]))
                stack.append(child)
    return out


def alive(procs) -> list[tuple[int, int]]:
    """The processes of `procs` that still run (a zombie has exited: it is not alive)."""
    table = proc_table()
    return sorted((pid, start) for pid, start in procs
                  if pid in table and table[pid][1] == start and table[pid][2] not in "ZX")


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def describe(procs) -> str:
    return "\n".join(f"  {pid}: {cmdline(pid)[:160]}" for pid, _ in procs)


def wait_all_gone(procs, timeout: float) -> list[tuple[int, int]]:
    deadline = time.monotonic() + timeout
    left = alive(procs)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = alive(procs)
    return left


def kill_all(procs) -> None:
    for pid, start in alive(procs):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


# --- drivers ----------------------------------------------------------------------------------------


def driver_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "CLUSTER_TEST_MARK")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", RAY_AUTH_MODE="disabled")
    env.update(extra)
    return env


def start_driver(mode: str, out: Path, *args: str, env=None) -> subprocess.Popen:
    with open(out.with_suffix(".log"), "wb") as log:  # the driver (and its watchdog) write here
        return subprocess.Popen([sys.executable, str(DRIVER), mode, str(out), *args], stdout=log,
                                stderr=subprocess.STDOUT, env=env or driver_env(), start_new_session=True)


def driver_log(out: Path) -> str:
    return out.with_suffix(".log").read_text(errors="replace")[-4000:]


def wait_for_json(out: Path, driver: subprocess.Popen, timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while not out.exists():
        if driver.poll() is not None:
            pytest.fail(f"driver exited with {driver.returncode} before reporting:\n{driver_log(out)}")
        if time.monotonic() > deadline:
            pytest.fail(f"driver did not report within {timeout} s:\n{driver_log(out)}")
        time.sleep(0.2)
    return json.loads(out.read_text())


def snapshot(driver_pid: int, reported) -> set[tuple[int, int]]:
    """The driver's descendants as seen from here, plus those the driver reported itself."""
    return descendants([driver_pid], proc_table()) | {tuple(p) for p in reported}


def check_private_cluster(info: dict, procs) -> None:
    assert info["owns_cluster"] is True
    watchdogs = [p for p in procs if "--watch" in cmdline(p[0])]
    cluster = [p for p in procs if p not in watchdogs]
    assert len(watchdogs) == 1, describe(procs)
    assert len(cluster) >= 3, f"too few cluster processes to test anything:\n{describe(procs)}"
    pids = {pid for pid, _ in procs}
    assert set(info["actors"]) <= pids, (info["actors"], describe(procs))


# --- tests ------------------------------------------------------------------------------------------


def test_import_is_cheap():
    code = "import sys, evolve.cluster; assert 'ray' not in sys.modules and 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1], env=driver_env())


@pytest.mark.ray
@pytest.mark.e2e
@pytest.mark.slow
def test_killed_driver_leaves_nothing(tmp_path):
    out = tmp_path / "driver.json"
    driver = start_driver("wait", out)
    procs = set()
    try:
        info = wait_for_json(out, driver)
        procs = snapshot(driver.pid, info["tree"])
        check_private_cluster(info, procs)
        procs |= snapshot(driver.pid, [])  # anything started meanwhile
        os.kill(driver.pid, signal.SIGKILL)  # the driver alone, not its process group
        driver.wait()
        t0 = time.monotonic()
        survivors = wait_all_gone(procs, timeout=30)
        assert not survivors, f"alive 30 s after the driver was killed:\n{describe(survivors)}"
        print(f"{len(procs)} processes gone {time.monotonic() - t0:.1f} s after SIGKILL of the driver")
    finally:
        driver.kill()
        driver.wait()
        kill_all(procs)


@pytest.mark.ray
@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["clean", "interrupt"])
def test_driver_exit_leaves_nothing(tmp_path, mode):
    out = tmp_path / "driver.json"
    driver = start_driver(mode if mode == "clean" else "wait", out)
    procs = set()
    try:
        info = wait_for_json(out, driver)
        procs = snapshot(driver.pid, info["tree"])
        check_private_cluster(info, procs)
        procs |= snapshot(driver.pid, [])
        if mode == "clean":
            out.with_suffix(".go").touch()  # the driver leaves the with block normally
        else:
            os.kill(driver.pid, signal.SIGINT)  # KeyboardInterrupt inside the with block
        rc = driver.wait(timeout=60)
        if mode == "clean":
            assert rc == 0 and "left the with block" in driver_log(out), driver_log(out)
        else:
            assert rc != 0 and "KeyboardInterrupt" in driver_log(out), driver_log(out)
        # RayCluster.__exit__ returns only once every process of the cluster is gone
        survivors = alive(procs)
        assert not survivors, f"alive after the driver exited:\n{describe(survivors)}"
    finally:
        driver.kill()
        driver.wait()
        kill_all(procs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def marked(token: str) -> set[tuple[int, int]]:
    """The processes of the `ray start` cluster of this test: those whose environment carries its
    token (every process of a node inherits it from `ray start`), and their descendants."""
    table = proc_table()
    roots = []
    for pid in table:
        try:
            if f"CLUSTER_TEST_MARK={token}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                roots.append(pid)
        except OSError:
            pass
    return {(pid, table[pid][1]) for pid in roots if table[pid][2] not in "ZX"} | descendants(roots, table)


def stop_cluster(token: str, known) -> list[tuple[int, int]]:
    """Stop the `ray start` cluster of this test, and only it (`ray stop` would kill every Ray
    process of this user on the machine, other tests' and other people's included)."""
    procs = set(known)
    for sig in (signal.SIGTERM, signal.SIGKILL, signal.SIGKILL):
        procs |= marked(token)
        for pid, _ in alive(procs):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        left = wait_all_gone(procs, timeout=5)
        if not left and not alive(marked(token)):
            return []
    return alive(procs | marked(token))


@pytest.mark.ray
@pytest.mark.e2e
@pytest.mark.slow
def test_join_existing_two_node_cluster(tmp_path, quickstart_models):
    port = free_port()
    address = f"127.0.0.1:{port}"
    temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's unix socket paths are limited
    token = secrets.token_hex(8)
    env = driver_env(CLUSTER_TEST_MARK=token)
    common = ["--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--temp-dir", temp_dir, "--disable-usage-stats"]
    procs = set()
    try:
        subprocess.run([str(RAY), "start", "--head", "--port", str(port), "--include-dashboard", "false", *common],
                       env=env, check=True, capture_output=True, timeout=120)
        subprocess.run([str(RAY), "start", "--address", address, *common],
                       env=env, check=True, capture_output=True, timeout=120)
        procs = marked(token)
        core = [p for p in procs if cmdline(p[0]).split(" ")[0].endswith(("/gcs_server", "/raylet"))]
        assert len(core) == 3, describe(procs)  # one GCS, two raylets

        for variant in ("RAY_ADDRESS", "address"):
            out = tmp_path / f"join-{variant}.json"
            if variant == "RAY_ADDRESS":
                driver = start_driver("join", out, env=driver_env(RAY_ADDRESS=address))
            else:
                driver = start_driver("join", out, address)
            try:
                rc = driver.wait(timeout=120)
            finally:
                driver.kill()
            assert rc == 0, driver_log(out)
            info = json.loads(out.read_text())
            assert info["owns_cluster"] is False
            assert len(set(info["nodes"])) == 2, info  # one actor of num_cpus=1 on each node
            left = alive({tuple(p) for p in info["tree"]} - procs)
            assert not left, f"the driver left processes of its own:\n{describe(left)}"
            # the cluster is not ours: it keeps running after the driver is gone
            assert alive(core) == sorted(core), f"cluster processes died with the driver:\n{describe(core)}"
            procs |= marked(token)

        # the search itself on the joined cluster: two workers of one CPU each, one per node
        qs = quickstart_models
        cfg = search_yaml(qs, tmp_path / "search.yml", budget=6, popsize=4)
        storage = tmp_path / "search"
        search = subprocess.run(
            [EVOLVE, str(cfg), "--storage-path", str(storage), "--task-search-path", str(qs["tasks"]),
             "--num-workers", "2", "--no-save-final-model", "--quiet"],
            env={**SEARCH_ENV, "RAY_ADDRESS": address, "CLUSTER_TEST_MARK": token}, capture_output=True, text=True, timeout=600,
        )
        assert search.returncode == 0, search.stderr[-3000:]
        rows = search_trials(storage)
        assert len(rows) == 6 and all(r["state"] == "COMPLETE" for r in rows)
        assert len({r["worker"].rsplit("@", 1)[1] for r in rows}) == 2  # candidates ran on both nodes
        assert alive(core) == sorted(core)  # the cluster is still up after the search
        procs |= marked(token)
    finally:
        left = stop_cluster(token, procs)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not left, f"cluster processes left after stopping it:\n{describe(left)}"
