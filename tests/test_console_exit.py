"""Console scripts leave through merge_engine.cli.exit_now: the exit code of SystemExit, output
flushed, atexit callbacks run, and no interpreter teardown (which takes 0.4-1.4 s after torch and
transformers are imported) unless a thread Python would wait for is still running."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow  # subprocesses


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("code, status, err", [(None, 0, ""), (0, 0, ""), (3, 3, ""), ("a message", 1, "a message\n")])
def test_exit_code_output_and_atexit(code, status, err):
    proc = run(f"""
        import atexit, sys
        from merge_engine.cli import exit_now
        atexit.register(lambda: print("atexit ran", flush=False))
        sys.stdout.write("buffered, not flushed; ")
        exit_now({code!r})
        print("never printed")
    """)
    assert proc.returncode == status
    assert proc.stdout == "buffered, not flushed; atexit ran\n"
    assert proc.stderr == err


def test_teardown_is_skipped_but_not_for_a_running_thread():
    # a finalizer of a module-level object runs at interpreter teardown only
    proc = run("""
        import threading, time
        from merge_engine.cli import exit_now
        class Noisy:
            def __del__(self):
                print("teardown ran", flush=True)
        keep = Noisy()
        exit_now(0)
    """)
    assert (proc.returncode, proc.stdout) == (0, "")
    proc = run("""
        import threading, time
        from merge_engine.cli import exit_now
        threading.Thread(target=lambda: (time.sleep(0.5), print("thread finished", flush=True))).start()
        exit_now(4)
    """)
    assert (proc.returncode, proc.stdout) == (4, "thread finished\n")


def test_a_console_entry_turns_click_exits_into_exit_now(tmp_path):
    script = tmp_path / "tool.py"
    script.write_text(textwrap.dedent("""
        import atexit, click
        from merge_engine.cli import console
        atexit.register(lambda: print("atexit ran"))
        @click.command()
        @click.argument("n", type=int)
        def main(n):
            print("n =", n)
        console(main)()
    """))
    ok = subprocess.run([sys.executable, str(script), "5"], capture_output=True, text=True, timeout=60)
    assert (ok.returncode, ok.stdout) == (0, "n = 5\natexit ran\n")
    usage = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "Missing argument" in usage.stderr  # click's usage error keeps its code
    assert usage.stdout == "atexit ran\n"
