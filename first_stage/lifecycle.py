"""The life of an entry point's process: one error policy, exit codes, stop signals, the run lock
and ``<run>/status.json``.

- :func:`run_main` runs every entry point's ``main()``: a user-facing error (a bad config, a missing
  or corrupt file, unusable data, a run folder in use) is one ``error: …`` line and exit code 1; any
  other exception is a bug and keeps its traceback.
- A training run: :func:`claim_run` (the run folder's lock, and a "failed" status on an error),
  :func:`catch_stop_signals` and :func:`stop_reason` (SIGTERM/SIGINT stop at the next step with a
  checkpoint), :func:`finish_run` (status, barrier, ``end_training``, and :func:`leave_now` on
  several processes).

Exit codes: 0 done; 1 error; 2 stopped after too many consecutive non-finite losses; 143 / 130
stopped by SIGTERM / SIGINT. ``accelerate launch`` turns them all into 1: ``status.json`` keeps them.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import errno
import fcntl
import json
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from .alignment import AlignmentModelError
from .checkpoint import CheckpointError, write_status
from .config import ConfigError
from .data import DataError
from .perceptual import LPIPSWeightsError, LPIPSWeightsNotFound

EXIT_ERROR = 1
EXIT_NONFINITE = 2
EXIT_VANISHED = 3  # the watchdog: the VAE's or the e2e transformer's gradients vanished (train.max_vanishing_steps)
STOP_SIGNALS = {signal.SIGTERM: 143, signal.SIGINT: 130}  # the shell's 128 + signal number
# status.json's state, by exit code
RUN_STATES = {0: "finished", EXIT_NONFINITE: "nonfinite", EXIT_VANISHED: "vanished", 143: "stopped", 130: "stopped"}
LOCK_FILE = ".lock"  # <run>/.lock: held by the run's trainer for its whole life
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class RunLockedError(RuntimeError):
    """The run folder belongs to a trainer that is still alive."""


# Errors whose message names the file, key or data at fault: the user can act on them without a
# traceback. The package raises FileNotFoundError/FileExistsError with a message (errno None), and
# LPIPSWeightsNotFound and AlignmentModelError are FileNotFoundErrors of that kind.
USER_ERRORS = (ConfigError, CheckpointError, DataError, LPIPSWeightsError, LPIPSWeightsNotFound, AlignmentModelError,
               RunLockedError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
               PermissionError)
# Other OSErrors that are about the file system, not the code (a full disk, a read-only mount).
FILE_SYSTEM_ERRORS = {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM}


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is the user's to fix (reported in one line) rather than a bug (a traceback)."""
    if isinstance(err, USER_ERRORS):
        return True
    return isinstance(err, OSError) and err.errno in FILE_SYSTEM_ERRORS


def run_main(main: Callable[[], int | None]) -> None:
    """Run an entry point's ``main()`` and exit with its code (None: 0); a user-facing error exits 1
    with one ``error: …`` line on stderr, anything else is raised with its traceback."""
    try:
        code = main()
    except Exception as err:
        if not is_user_error(err):
            raise
        print(f"error: {err}", file=sys.stderr, flush=True)
        code = EXIT_ERROR
    sys.exit(code or 0)


def _lock_holder(fd: int) -> dict:
    """What the holder of lock file ``fd`` wrote into it (empty when nothing or unreadable)."""
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        return json.loads(os.read(fd, 4096).decode() or "{}")
    except (ValueError, UnicodeDecodeError):
        return {}


def _describe_holder(holder: dict) -> str:
    """A lock record in words, for the messages that name a holder."""
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, since {holder.get('since', '?')}"


def lock_run(run_dir: Path) -> int:
    """Take ``<run_dir>/.lock`` (creating the folder) and write this process's pid, host and start
    time into it; return its file descriptor. Raises :class:`RunLockedError` naming the live holder.

    ``flock`` is released by the kernel when the holder dies however it dies (SIGKILL, a crash,
    ``os._exit``), so a stale lock never blocks a requeued run; a holder that did not release it
    cleanly left its record behind, and taking it over says so. The file is never removed: a removed
    lock file would let two trainers lock two different files of the same name.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _lock_holder(fd)
        os.close(fd)
        raise RunLockedError(f"{run_dir} is in use by a live trainer ({_describe_holder(holder)}): two trainers "
                             "would write and rotate the same checkpoints. Wait for it to end or stop it "
                             "(kill its pid), or give this run another train.run_name") from None
    except OSError as err:  # a file system without flock (some network mounts): run unguarded
        print(f"warning: cannot lock {run_dir / LOCK_FILE} ({err.strerror}); nothing stops a second trainer "
              "of this run", file=sys.stderr)
        return fd
    stale = _lock_holder(fd)
    if stale:
        print(f"warning: taking over the lock of {run_dir} left by a trainer that ended without releasing it "
              f"({_describe_holder(stale)}; killed or crashed)", file=sys.stderr)
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    return fd


def unlock_run(fd: int) -> None:
    """Release a lock of :func:`lock_run`, leaving the file empty (an empty file: released cleanly)."""
    os.ftruncate(fd, 0)
    with contextlib.suppress(OSError):  # a file system without flock: there was no lock to release
        fcntl.flock(fd, fcntl.LOCK_UN)  # for forked data workers sharing the file too
    os.close(fd)


@contextlib.contextmanager
def claim_run(accelerator, run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir`` for the run: the main process takes its lock before anything is written
    there, and every process raises when it refuses (no process trains alone, none waits for a main
    process that left). An error inside marks the run "failed" in ``status.json``, then propagates."""
    refusal, fd = None, None
    if accelerator.is_main_process:
        try:
            fd = lock_run(run_dir)
        except RunLockedError as err:
            refusal = err
        except OSError as err:
            refusal = ConfigError(f"train.output_dir: cannot write the run folder {run_dir} ({err.strerror or err}); "
                                  "set train.output_dir to a writable folder")
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        refusal = broadcast_object_list([refusal])[0]  # the main process's verdict, on every process
    if refusal is not None:
        raise refusal
    try:
        yield
    except BaseException as err:  # the status names the failure; the error itself propagates
        if accelerator.is_main_process:
            try:
                write_status(run_dir, "failed", None, EXIT_ERROR, f"{type(err).__name__}: {err}")
            except OSError as status_err:  # a read-only or full run folder
                print(f"could not write {run_dir / 'status.json'}: {status_err}", file=sys.stderr)
        raise
    finally:
        if fd is not None:
            unlock_run(fd)


def stop_with_launcher() -> None:
    """Have the kernel send this process SIGTERM when its ``accelerate launch`` goes (Linux).

    A single-process ``accelerate launch`` neither forwards SIGTERM to the trainer nor takes it along
    when it dies: a pre-empted run would train on, orphaned, with no stop checkpoint. With the
    parent-death signal it stops at the next step with a checkpoint, as on a direct SIGTERM. Only
    under the launcher: a trainer started by a shell (``nohup python train/train.py &``) outlives it.
    """
    parent = os.getppid()
    try:
        argv = Path(f"/proc/{parent}/cmdline").read_bytes().split(b"\0")[:3]
    except OSError:  # not Linux
        return
    if not any(Path(arg.decode(errors="replace")).name.startswith("accelerate") for arg in argv):
        return
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        print(f"warning: prctl(PR_SET_PDEATHSIG) failed (errno {ctypes.get_errno()}): the run will not stop "
              "by itself if its launcher is killed", file=sys.stderr)
    if os.getppid() != parent:  # the launcher went before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def catch_stop_signals() -> list[int]:
    """From now on SIGTERM and SIGINT (and the launcher's death) are appended to the returned list
    instead of killing the process: the loop stops at the next step, with a checkpoint."""
    received: list[int] = []
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, frame: received.append(signum))
    stop_with_launcher()
    return received


def stop_reason(received: list[int]) -> tuple[int, str]:
    """The exit code and status reason of a run stopped by a signal (SIGTERM when the signal came
    to another process)."""
    sig = received[0] if received else signal.SIGTERM
    return STOP_SIGNALS[sig], f"{signal.Signals(sig).name} (resume with --resume latest)"


def finish_run(accelerator, run_dir: Path, exit_code: int, step: int, reason: str) -> None:
    """Write the run's ``status.json`` (main process) and end the run on every process together.
    A process of a multi-process run leaves here (:func:`leave_now`): call it where the DDP model
    and the process group are still referenced, since freeing them is what can hang."""
    if accelerator.is_main_process:
        write_status(run_dir, RUN_STATES[exit_code], step, exit_code, reason)
    # The other processes wait for the main one's export and status: a process that leaves early
    # tears down the process group under it (gloo aborts with "terminate called without an active
    # exception"), so nothing but leaving comes after this barrier.
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if accelerator.num_processes > 1:
        if accelerator.is_main_process:  # os._exit skips claim_run's release; the kernel drops the flock
            (run_dir / LOCK_FILE).write_text("")  # an empty record: released cleanly, nothing to take over
        leave_now(exit_code)


def leave_now(exit_code: int) -> None:
    """End a process of a multi-process run here, without tearing down its DDP reducer and gloo
    process group: their destructors join gloo's worker threads while holding the GIL, and a worker
    still freeing its last work item needs the GIL — a deadlock at exit (torch issue #56297; it hung
    one two-process test run here after the run had finished and written its status). Everything
    the run writes is closed by now (checkpoints, export, status, trackers)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
