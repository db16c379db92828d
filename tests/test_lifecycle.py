"""The process life-cycle shared by the entry points: the error policy, the run lock, the failed
status and the stop signals. In-process and fast; the subprocess runs are in test_train.py."""

import errno
import json
import os
import signal
import subprocess
import sys
import types

import pytest

from first_stage.alignment import AlignmentModelError
from first_stage.checkpoint import STATUS_FILE, CheckpointError
from first_stage.config import ConfigError
from first_stage.data import DataError
from first_stage.lifecycle import (LOCK_FILE, RunLockedError, claim_run, is_user_error, lock_run, run_main,
                                   stop_reason, unlock_run)
from first_stage.perceptual import LPIPSWeightsError, LPIPSWeightsNotFound


def raising(err: BaseException):
    def main():
        raise err
    return main


@pytest.mark.parametrize("err", [
    ConfigError("model.preset: unknown preset 'x'"), CheckpointError("ckpt/ema.pt: refused"), DataError("no image"),
    LPIPSWeightsError("vgg16.pth: corrupt"),
    # FileNotFoundErrors without an errno, the kind the old filter re-raised with a traceback:
    LPIPSWeightsNotFound("vgg16-397923af.pth: not found in /th/hub/checkpoints"),
    AlignmentModelError("alignment.model: no DINOv2 at /models/dinov2"),
    RunLockedError("outputs/run is in use"), OSError(errno.ENOSPC, "No space left on device", "ckpt"),
    FileNotFoundError(errno.ENOENT, "No such file or directory", "configs/x.yaml"),
])
def test_user_errors_are_one_line_and_exit_1(err, capsys):
    with pytest.raises(SystemExit) as ended:
        run_main(raising(err))
    assert ended.value.code == 1
    assert capsys.readouterr().err == f"error: {err}\n"


@pytest.mark.parametrize("err", [RuntimeError("a bug"), KeyError("vae.x"), ValueError("shape mismatch"),
                                 OSError(errno.ECONNRESET, "Connection reset by peer")])
def test_bugs_keep_their_traceback(err):
    assert not is_user_error(err)
    with pytest.raises(type(err)):
        run_main(raising(err))


def test_exit_codes_pass_through():
    for code, expected in ((None, 0), (0, 0), (2, 2), (143, 143)):
        with pytest.raises(SystemExit) as ended:
            run_main(lambda: code)
        assert ended.value.code == expected


def test_lock_names_its_live_holder_and_a_dead_one_is_taken_over(tmp_path, capsys):
    run = tmp_path / "outputs" / "run"
    fd = lock_run(run)  # creates the run folder
    holder = json.loads((run / LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] and holder["since"]
    with pytest.raises(RunLockedError, match=rf"in use by a live trainer \(pid {os.getpid()} on host "):
        lock_run(run)  # flock: two open files of one lock conflict even within one process
    unlock_run(fd)
    assert (run / LOCK_FILE).read_text() == ""  # released cleanly: nothing to take over
    fd = lock_run(run)
    assert "taking over" not in capsys.readouterr().err
    os.close(fd)  # as a killed trainer's lock goes: released by the kernel, its record left behind
    fd = lock_run(run)
    assert f"taking over the lock of {run} left by a trainer that ended without releasing it (pid {os.getpid()}" \
        in capsys.readouterr().err
    unlock_run(fd)


def test_the_lock_of_a_killed_process_is_free(tmp_path):
    """flock is released by the kernel when its holder dies, SIGKILL included."""
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom first_stage.lifecycle import lock_run\n"
                               f"lock_run(__import__('pathlib').Path({str(run)!r}))\nprint('locked', flush=True)\n"
                               "time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=f"pid {holder.pid} "):
            lock_run(run)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=1800)
    unlock_run(lock_run(run))


def single_process(main: bool = True):
    """The parts of an Accelerator that claim_run uses, for one process."""
    return types.SimpleNamespace(is_main_process=main, num_processes=1)


def test_claim_run_marks_an_error_failed_and_a_refusal_touches_nothing(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(DataError):
        with claim_run(single_process(), run):
            raise DataError("no image decodes")
    record = json.loads((run / STATUS_FILE).read_text())
    assert record["state"] == "failed" and record["reason"] == "DataError: no image decodes"
    assert (run / LOCK_FILE).read_text() == ""  # released on the way out
    (run / STATUS_FILE).unlink()
    fd = lock_run(run)  # a live trainer of the same run
    with pytest.raises(RunLockedError):
        with claim_run(single_process(), run):
            raise AssertionError("must not run")
    assert not (run / STATUS_FILE).exists()
    unlock_run(fd)


def test_unwritable_output_folder_is_a_config_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="train.output_dir: cannot write the run folder"):
        with claim_run(single_process(), tmp_path / "file" / "run"):
            pass


def test_stop_reason_names_the_signal():
    assert stop_reason([signal.SIGINT]) == (130, "SIGINT (resume with --resume latest)")
    assert stop_reason([]) == (143, "SIGTERM (resume with --resume latest)")  # another process's signal


def test_importing_the_library_leaves_the_plotting_backend_alone():
    """reports.py draws without pyplot: a notebook importing the trainer or the export keeps its backend."""
    code = ("import sys, first_stage.trainer, first_stage.export, first_stage.reports\n"
            "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'\n"
            "import matplotlib\nprint(matplotlib.get_backend())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "MPLBACKEND": "svg"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "svg"
