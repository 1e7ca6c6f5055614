"""Connecting a search to Ray: join an existing cluster, or start a private one that dies with us.

`RayCluster` is a context manager with two modes:

- **Join** (an address is given, or `RAY_ADDRESS` is set, as `ray job submit` does): connect with
  `ray.init(address=...)` and pass no resources (Ray refuses `num_cpus`/`num_gpus` when connecting to
  a running cluster). On exit only `ray.shutdown()` is called: the cluster is not ours and keeps
  running.
- **Private** (otherwise): start a local cluster with `ray.init(address="local", ...)`. `"local"` is
  explicit so that a `ray start` cluster elsewhere on the machine is never joined by accident. The
  guarantee: whether the driver leaves the `with` block normally, by an exception or a
  KeyboardInterrupt, or is killed outright (SIGKILL, the OOM killer), no process of the cluster
  outlives it by more than a few seconds.

Why Ray alone does not give that guarantee (measured with Ray 2.60 on Linux; a driver that called
`ray.init(num_cpus=2)` with one actor busy in a Python loop and one idle, then got SIGKILL):
gcs_server, raylet, the autoscaler monitor, the dashboard head and the log monitor die at once (Ray
starts them with PR_SET_PDEATHSIG); the actor workers notice that their raylet is gone and exit
within ~3 s. But `ray::DashboardAgent` and `ray::RuntimeEnvAgent`, which the raylet starts, were
still alive 60 s later, orphaned, holding memory and ports. A clean `ray.shutdown()` does remove
everything, but a killed driver never gets to call it.

How the guarantee is kept (Linux):

1. *Marking.* Just around `ray.init`, a random token is put in the driver's environment
   (`EVOMERGE_RAY_CLUSTER=<token>`), then removed. Every process `ray.init` starts inherits it, and
   so does everything those start (the raylet passes its environment to workers and agents). The
   kernel keeps a process's initial environment readable in /proc/PID/environ, whoever its parent
   becomes after its parent dies, and (checked with Ray 2.60) after Ray's workers and agents rename
   themselves `ray::IDLE`, `ray::Class.method`, `ray::DashboardAgent`: their command lines no longer
   name the session, so command-line matching would miss them. The cluster is: the processes
   carrying the token, and their descendants. Processes are identified by (pid, start time), so a
   reused pid is never mistaken for one of ours, and signals go through a pidfd where the kernel
   has them (no race with pid reuse at all).
2. *Watchdog.* Before `ray.init`, the driver starts a watchdog: this file run as a script (standard
   library only, so it starts in milliseconds and never imports Ray or torch), in its own session
   (a Ctrl-C at the terminal does not reach it), with its stdin a pipe whose only write end is held
   by the driver. The watchdog blocks in `select()` on that pipe: when the driver dies, for any
   reason, the kernel closes the write end and the watchdog wakes up at once with EOF; no polling of
   the driver. While it waits (1 s `select` timeout, cheap) it records the cluster's members, so
   that an unmarked descendant (a subprocess an evaluator started with a fresh environment) is still
   known after its parent has died; and it checks that its parent is still the driver, which covers
   the one way the pipe could outlive the driver (a child forked by the driver without exec, which
   inherits the write end). Once woken, it sends SIGTERM to every member, SIGKILL to any still
   alive 1.5 s later, repeats until no member is left (a raylet being killed may still start a
   worker), says on stderr what it stopped, and exits.
3. *Normal exit.* `__exit__` records the members, calls `ray.shutdown()`, waits briefly for the
   members to exit by themselves, terminates any left as above, then tells the watchdog "stop" and
   waits for it. When `__exit__` returns, no process of the cluster is alive. If the driver is
   interrupted half-way, the watchdog sees the pipe close and finishes the job.

This is why a watchdog process and not an in-process handler: SIGKILL cannot be caught, and
atexit/`finally` code does not run when the process is killed. And why not the process group or
session: Ray's workers put themselves in process groups of their own, and a driver run from a shell
shares its session with the shell.

Elsewhere than Linux (no /proc), `RayCluster` degrades to plain
`ray.init`/`ray.shutdown`: the private cluster is cleaned up on a normal exit, not after a kill.

Note: `RAY_DEDUP_LOGS=0` is put in the environment (unless set) before `ray.init`; Ray reads it when
it is first imported, so in the driver it takes effect only if Ray was not imported before.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import sys
import time
from typing import Optional

log = logging.getLogger(__name__)

MARKER_VAR = "EVOMERGE_RAY_CLUSTER"

_LINUX = sys.platform.startswith("linux") and os.path.isdir("/proc")
_TERM_GRACE = 1.5  # seconds between SIGTERM and SIGKILL
_KILL_DEADLINE = 20.0  # give up terminating after this long (only reached if processes are unkillable)
_POLL = 0.1  # seconds between checks while waiting for processes to go away


# ---------------------------------------------------------------------------------------------------
# /proc helpers (standard library only: this file also runs as the watchdog script)


def _stat(pid: int) -> Optional[tuple[int, int, str]]:
    """(ppid, start time in clock ticks since boot, state letter) of a process, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (2nd field) is in parentheses and may contain spaces or parentheses.
    fields = stat[stat.rindex(b")") + 2:].split()
    return int(fields[1]), int(fields[19]), fields[0].decode()


def _proc_table() -> dict[int, tuple[int, int, str]]:
    """{pid: _stat(pid)} for every process."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            info = _stat(int(name))
            if info is not None:
                table[int(name)] = info
    return table


def _has_marker(pid: int, marker: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return marker in f.read().split(b"\0")
    except OSError:  # gone, a zombie, or not ours
        return False


def _signal(pid: int, start: int, sig: int) -> None:
    """Send `sig` to the process (pid, start), and to no other process that got the same pid."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # no pidfd (old kernel or Python), or already gone
        fd = None
    try:
        info = _stat(pid)
        if info is None or info[1] != start:
            return  # gone, or the pid is someone else's now
        if fd is not None:
            signal.pidfd_send_signal(fd, sig)
        else:
            os.kill(pid, sig)
    except OSError:
        pass
    finally:
        if fd is not None:
            os.close(fd)


class _Tracker:
    """The processes of one private cluster: those whose environment carries the token, their
    descendants, and every such process seen before (by (pid, start time)) that is still alive."""

    def __init__(self, token: str, exclude: set[int]):
        self.marker = f"{MARKER_VAR}={token}".encode()
        self.exclude = exclude
        self.members: set[tuple[int, int]] = set()
        self._marked: dict[tuple[int, int], bool] = {}  # environments already read

    def scan(self) -> set[tuple[int, int]]:
        """Record the current members; return all members alive now."""
        table = _proc_table()
        children: dict[int, list[int]] = {}
        found = []
        marked = {}
        for pid, (ppid, start, state) in table.items():
            children.setdefault(ppid, []).append(pid)
            if pid in self.exclude or state in "ZX":
                continue
            key = (pid, start)
            hit = self._marked.get(key)
            if hit is None:
                hit = _has_marker(pid, self.marker)
            marked[key] = hit
            if hit:
                found.append(pid)
        self._marked = marked  # forget processes that are gone
        seen = set()
        while found:  # the marked processes and all their descendants
            pid = found.pop()
            if pid in seen:
                continue
            seen.add(pid)
            self.members.add((pid, table[pid][1]))
            found.extend(c for c in children.get(pid, ()) if c not in self.exclude)
        alive = {(pid, start) for pid, start in self.members
                 if pid in table and table[pid][1] == start and table[pid][2] not in "ZX"}
        self.members = alive
        return alive


def _wait_gone(tracker: _Tracker, timeout: float) -> set[tuple[int, int]]:
    deadline = time.monotonic() + timeout
    alive = tracker.scan()
    while alive and time.monotonic() < deadline:
        time.sleep(_POLL)
        alive = tracker.scan()
    return alive


def _terminate(tracker: _Tracker, wait_first: float = 0.0) -> int:
    """Make every member go away: optionally wait for them to exit by themselves, then SIGTERM,
    then SIGKILL, again until none is left. Returns how many had to be signalled."""
    alive = _wait_gone(tracker, wait_first) if wait_first > 0 else tracker.scan()
    signalled = set()
    deadline = time.monotonic() + _KILL_DEADLINE
    while alive and time.monotonic() < deadline:
        for pid, start in alive:
            _signal(pid, start, signal.SIGTERM)
        signalled |= alive
        alive = _wait_gone(tracker, _TERM_GRACE)
        for pid, start in alive:
            _signal(pid, start, signal.SIGKILL)
        alive = _wait_gone(tracker, 1.0)
    if alive:
        log.error("could not stop Ray processes %s", sorted(pid for pid, _ in alive))
    return len(signalled)


# ---------------------------------------------------------------------------------------------------
# The watchdog (runs as `python cluster.py --watch TOKEN DRIVER_PID`, stdin a pipe from the driver)


def _watch(token: str, driver_pid: int) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    tracker = _Tracker(token, exclude={os.getpid(), driver_pid})
    stdin = sys.stdin.fileno()
    told_to_stop = False
    while os.getppid() == driver_pid:  # else the driver is dead and we were re-parented
        tracker.scan()
        readable, _, _ = select.select([stdin], [], [], 1.0)
        if readable:
            told_to_stop = os.read(stdin, 64).startswith(b"stop")  # b"" (EOF): the driver died
            break
    killed = _terminate(tracker)
    if killed and not told_to_stop:
        try:
            print(f"evolve.cluster watchdog: driver {driver_pid} is gone; stopped {killed} processes "
                  "of its private Ray cluster", file=sys.stderr, flush=True)
        except (OSError, ValueError):
            pass
    return 0


# ---------------------------------------------------------------------------------------------------


# Ray starts one idle Python worker per CPU with a new cluster, in case tasks come: a search runs a
# few actors, each of which gets a process of its own anyway, so on a 16-core machine that was 16
# processes of about 90 MB and half a CPU-second each for nothing. Started on demand instead (an
# actor then takes about 0.5 s longer to come up).
NO_PRESTART = {"enable_worker_prestart": False, "prestart_worker_first_driver": False}


class RayCluster:
    """Context manager: connect to Ray for a search.

    - `address` given (e.g. "auto" or "HOST:PORT"), or the RAY_ADDRESS environment variable set (as
      `ray job submit` does): join that existing cluster with `ray.init(address=...)`, passing no
      `num_cpus`/`num_gpus` (Ray refuses resources when connecting to an existing cluster; they are
      ignored here). On exit: `ray.shutdown()` only; the cluster keeps running.
    - otherwise (or `address="local"`): start a private local cluster (`num_cpus`/`num_gpus` as given,
      no dashboard) that is guaranteed to die with the driver: a few seconds after the driver
      process is killed, even with SIGKILL, no process of that cluster is alive (Linux; see the
      module docstring for how). `__exit__` shuts it down and makes sure every process is gone.

    `owns_cluster` is True when we started the cluster. `quiet` stops the workers' output from
    being printed by the driver.
    """

    def __init__(self, address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
                 quiet: bool = False):
        self.address = address
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.quiet = quiet
        self.owns_cluster = False
        self._watchdog = None  # subprocess.Popen of the watchdog, private cluster on Linux only
        self._tracker: Optional[_Tracker] = None

    def __enter__(self) -> "RayCluster":
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        import ray

        if ray.is_initialized():  # checked first: on failure below we shut Ray down, and it is not ours
            raise RuntimeError("Ray is already initialized in this process: RayCluster must make the "
                               "ray.init() call itself")
        common = dict(log_to_driver=not self.quiet, logging_level=logging.WARNING)
        address = self.address or os.environ.get("RAY_ADDRESS") or None
        if address and address != "local":
            if self.num_cpus is not None or self.num_gpus is not None:
                log.info("joining the Ray cluster at %s: num_cpus/num_gpus are ignored (the cluster's "
                         "nodes declare their own resources)", address)
            self.owns_cluster = False
            ray.init(address=address, **common)
            return self

        self.owns_cluster = True
        token = None
        if _LINUX:
            try:
                token = self._start_watchdog()
            except OSError as e:
                log.warning("cannot start the Ray watchdog (%s): the private cluster will not be "
                            "stopped if this process is killed", e)
        previous = os.environ.get(MARKER_VAR)
        try:
            if token is not None:
                os.environ[MARKER_VAR] = token  # inherited by every process ray.init starts
            try:
                ray.init(address="local", num_cpus=self.num_cpus, num_gpus=self.num_gpus,
                         include_dashboard=False, _system_config=NO_PRESTART, **common)
            finally:
                if previous is None:
                    os.environ.pop(MARKER_VAR, None)
                else:
                    os.environ[MARKER_VAR] = previous
        except BaseException:  # __exit__ is not called when __enter__ raises
            self._shutdown_owned()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.owns_cluster:
            self._shutdown_owned()
        else:
            import ray

            ray.shutdown()

    # -- private cluster ----------------------------------------------------------------------------

    def _start_watchdog(self) -> str:
        import secrets
        import subprocess

        token = secrets.token_hex(16)
        # -I -S: no site-packages, no PYTHON* variables; the watchdog needs the standard library only.
        self._watchdog = subprocess.Popen(
            [sys.executable, "-I", "-S", os.path.abspath(__file__), "--watch", token, str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True,
        )
        self._tracker = _Tracker(token, exclude={os.getpid(), self._watchdog.pid})
        return token

    def _shutdown_owned(self) -> None:
        import ray

        try:
            if self._tracker is not None:
                self._tracker.scan()  # know every member before the tree falls apart
            ray.shutdown()
            if self._tracker is not None:
                _terminate(self._tracker, wait_first=2.0)
        finally:
            self._stop_watchdog()

    def _stop_watchdog(self) -> None:
        import subprocess

        watchdog, self._watchdog = self._watchdog, None
        if watchdog is None:
            return
        for tell in (lambda: watchdog.stdin.write(b"stop\n"), watchdog.stdin.close):
            try:
                tell()
            except OSError:  # it died: nothing to tell
                pass
        try:
            watchdog.wait(timeout=_KILL_DEADLINE + 5)
        except subprocess.TimeoutExpired:
            watchdog.kill()
            watchdog.wait()


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--watch":
        sys.exit(_watch(sys.argv[2], int(sys.argv[3])))
    print(f"usage: {sys.argv[0]} --watch TOKEN DRIVER_PID  (started by RayCluster, not by hand)", file=sys.stderr)
    sys.exit(2)
