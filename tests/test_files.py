"""files.atomic_write beyond atomicity: file modes, dead writers' temp files, vanished directories, full disks,
and the writer thread's lifetime (SPEC §8 "Preemption", "No silent wrong results", "Clear messages")."""
from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import threading
import time

import pytest
import torch

from conftest import PYTHON, make_loader, make_model, python_env, quiet_params
from super_trainer import Callback, Trainer
from super_trainer.checkpoint import WRITER_THREAD_NAME, CheckpointWriter, read_checkpoint, save_checkpoint
from super_trainer import files
from super_trainer.files import _HOST, STALE_FOREIGN_SECONDS, atomic_write, atomic_write_text, remove_stale_temp_files


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def temp_files(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


# ---- modes ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_new_files_get_the_mode_a_plain_open_gives(tmp_path, umask):
    old = os.umask(umask)
    try:
        with open(tmp_path / "plain.txt", "w") as file:
            file.write("x")
        save_checkpoint({"v": torch.ones(2)}, tmp_path / "sync.pth")
        with CheckpointWriter() as writer:
            writer.save({"v": torch.ones(2)}, tmp_path / "bg.pth", tmp_path / "copy.pth")
        atomic_write_text(tmp_path / "params.yaml", "a: 1\n")
    finally:
        os.umask(old)
    expected = mode(tmp_path / "plain.txt")
    assert expected == 0o666 & ~umask
    for name in ("sync.pth", "bg.pth", "copy.pth", "params.yaml"):
        assert mode(tmp_path / name) == expected, name


def test_a_rewritten_file_keeps_its_mode(tmp_path):
    path = tmp_path / "ckpt_latest.pth"
    save_checkpoint({"v": torch.ones(2)}, path)
    os.chmod(path, 0o640)  # chosen by the user: kept, as open(path, "w") keeps it
    save_checkpoint({"v": torch.zeros(2)}, path)
    assert mode(path) == 0o640


# ---- temp files of dead writers ------------------------------------------------------------------------

# files.py imports nothing of the package: loaded alone, the writer process starts without importing torch.
WRITER_SCRIPT = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("files", sys.argv[2])
files = importlib.util.module_from_spec(spec)
spec.loader.exec_module(files)
def write(file):
    file.write(b"x" * 3_000_000)
    file.flush()
    print("writing", flush=True)
    time.sleep(120)
files.atomic_write(sys.argv[1], write)
"""


def start_blocked_writer(path):
    """A process stopped in the middle of a 3 MB write to ``path`` (its temp file is on disk)."""
    proc = subprocess.Popen([PYTHON, "-c", WRITER_SCRIPT, str(path), files.__file__], env=python_env(),
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    return proc


def test_sigkilled_writers_temp_file_is_removed_at_the_next_write(tmp_path):
    dead = start_blocked_writer(tmp_path / "ckpt_latest.pth")
    dead.kill()  # SIGKILL: no handler, no cleanup
    dead.wait(30)
    left = temp_files(tmp_path)
    assert len(left) == 1 and f".w{dead.pid}@" in left[0] and os.path.getsize(tmp_path / left[0]) == 3_000_000
    live = start_blocked_writer(tmp_path / "ckpt_best.pth")  # the next write (another process) removes it
    try:
        (live_file,) = temp_files(tmp_path)
        assert f".w{live.pid}@" in live_file
        save_checkpoint({"v": torch.ones(2)}, tmp_path / "ckpt_latest.pth")  # and ours keeps a live writer's file
        assert temp_files(tmp_path) == [live_file]
    finally:
        live.kill()
        live.wait(30)
    assert read_checkpoint(tmp_path / "ckpt_latest.pth", required_keys=())["v"].sum() == 2


def test_which_temp_files_count_as_stale(tmp_path):
    sleeper = subprocess.Popen([PYTHON, "-c", "import time; time.sleep(120)"])
    try:
        time.sleep(0.2)
        now = time.time()

        def make(name, age=0.0):
            path = tmp_path / name
            path.write_bytes(b"partial")
            os.utime(path, (now - age, now - age))
            return name

        kept = {
            make(f".ckpt_latest.pth.w{sleeper.pid}@{_HOST}.abc12345.tmp"),  # a live process, written since it started
            make(f".ckpt_latest.pth.w{os.getpid() + 10**7}@other-host.abc12345.tmp"),  # another host, recent
            make(".ckpt_latest.pth.abcd1234.tmp"),  # not named by this version: owner unknown, never touched
            make("notes.tmp"),
        }
        removed = {
            make(f".ckpt_best.pth.w{sleeper.pid}@{_HOST}.def12345.tmp", age=3600),  # pid reused since it was written
            make(f".ckpt_best.pth.w{os.getpid()}@{_HOST}.ghi12345.tmp"),  # this process's pid, but no write of ours
            make(f".results.csv.w99999999@{_HOST}.jkl12345.tmp"),  # no such process
            make(f".x.yaml.w123@other-host.mno12345.tmp", age=STALE_FOREIGN_SECONDS + 60),  # another host, old
        }
        gone = {p.name for p in remove_stale_temp_files(tmp_path)}
    finally:
        sleeper.kill()
        sleeper.wait(30)
    assert gone == removed
    assert set(temp_files(tmp_path)) == kept


def test_a_concurrent_write_of_this_process_is_not_swept(tmp_path):
    """Another thread's write in flight into the same directory keeps its temp file."""
    release, started = threading.Event(), threading.Event()

    def slow(file):
        file.write(b"y" * 1000)
        started.set()
        assert release.wait(10)

    thread = threading.Thread(target=atomic_write, args=(tmp_path / "a.bin", slow))
    thread.start()
    assert started.wait(10)
    assert remove_stale_temp_files(tmp_path) == []
    release.set()
    thread.join(10)
    assert (tmp_path / "a.bin").read_bytes() == b"y" * 1000 and temp_files(tmp_path) == []


# ---- a vanished directory ------------------------------------------------------------------------------

def test_a_missing_directory_is_an_error_unless_the_caller_creates_it(tmp_path):
    run_dir = tmp_path / "runs" / "exp"
    with pytest.raises(FileNotFoundError, match=r"directory .*runs/exp does not exist"):
        atomic_write_text(run_dir / "training_params.yaml", "a: 1\n")
    assert not (tmp_path / "runs").exists()
    atomic_write_text(run_dir / "training_params.yaml", "a: 1\n", make_dirs=True)  # the run's first write
    assert (run_dir / "training_params.yaml").read_text() == "a: 1\n"


def test_background_write_into_a_deleted_run_dir_fails_and_does_not_recreate_it(tmp_path):
    run_dir = tmp_path / "exp"
    run_dir.mkdir()
    writer = CheckpointWriter()
    writer.save({"v": torch.ones(2)}, run_dir / "ckpt_latest.pth")
    writer.flush()
    for path in run_dir.iterdir():
        path.unlink()
    run_dir.rmdir()
    writer.save({"v": torch.ones(2)}, run_dir / "ckpt_latest.pth")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        writer.close()
    assert not run_dir.exists()


def test_a_temp_file_removed_mid_write_is_named_in_the_error(tmp_path):
    def write_then_lose_the_temp_file(file):
        file.write(b"x")
        for temp in tmp_path.glob(".ckpt_latest.pth.w*"):
            temp.unlink()  # what deleting the run dir's files does to a write in flight

    with pytest.raises(FileNotFoundError, match=r"temp file \.ckpt_latest\.pth\.w.* was removed while being written"):
        atomic_write(tmp_path / "ckpt_latest.pth", write_then_lose_the_temp_file)
    assert list(tmp_path.iterdir()) == []


def test_training_fails_when_its_run_dir_is_deleted(tmp_path):
    deleted = []

    class DeleteRunDir(Callback):
        def on_validation_loader_end(self, context):
            if context.epoch == 1:
                deleted.append(context.ckpt_dir)
                while context.ckpt_dir.exists():  # the background writer may add or rename a file meanwhile
                    shutil.rmtree(context.ckpt_dir, ignore_errors=True)

    # a background write caught mid-way names its removed temp file; any later write names the missing dir
    with pytest.raises(FileNotFoundError, match="does not exist|was removed while being written"):
        Trainer("exp", tmp_path).train(model=make_model(), training_params=quiet_params(
            max_epochs=3, phase_callbacks=[DeleteRunDir()]), train_loader=make_loader(), valid_loader=make_loader(16))
    assert deleted and not deleted[0].exists()  # the run dir was not recreated


def test_csv_logger_creates_its_own_folder_once(tmp_path):
    from super_trainer import CSVLogger

    path = tmp_path / "logs" / "run1" / "results.csv"
    Trainer("exp", tmp_path).train(model=make_model(), training_params=quiet_params(
        max_epochs=2, phase_callbacks=[CSVLogger(path=str(path))]), train_loader=make_loader(),
        valid_loader=make_loader(16))
    assert path.read_text().count("\n") == 3  # header + 2 epochs


# ---- a full disk ---------------------------------------------------------------------------------------

def full_disk_after(monkeypatch, nbytes, code=errno.ENOSPC):
    """torch.save writes ``nbytes`` and then fails as a full disk does."""
    real = torch.save

    def failing(obj, file, *args, **kwargs):
        file.write(b"z" * nbytes)
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(torch, "save", failing)
    return real


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_full_disk_says_so_names_the_path_and_keeps_the_previous_file(tmp_path, monkeypatch, code):
    path = tmp_path / "ckpt_latest.pth"
    save_checkpoint({"v": torch.ones(3)}, path)
    full_disk_after(monkeypatch, 100_000, code)
    with pytest.raises(OSError) as info:
        save_checkpoint({"v": torch.zeros(3)}, path)
    message = str(info.value)
    assert info.value.errno == code and "no space left" in message and str(path) in message
    assert "previous ckpt_latest.pth was kept" in message and "\n" not in message
    monkeypatch.undo()
    assert torch.equal(read_checkpoint(path, required_keys=())["v"], torch.ones(3))
    assert temp_files(tmp_path) == []


def test_full_disk_at_fsync_in_the_background_writer(tmp_path, monkeypatch):
    path = tmp_path / "ckpt_latest.pth"
    writer = CheckpointWriter()
    writer.save({"v": torch.ones(3)}, path)
    writer.flush()
    real_fsync = os.fsync

    def fsync(fd):  # delayed allocation: the disk fills when the data is flushed
        if stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    writer.save({"v": torch.zeros(3)}, path)
    with pytest.raises(OSError, match=r"no space left on device while writing .*ckpt_latest.pth; the previous "
                                      r"ckpt_latest.pth was kept"):
        writer.flush()
    monkeypatch.undo()
    writer.close()
    assert torch.equal(read_checkpoint(path, required_keys=())["v"], torch.ones(3))
    assert temp_files(tmp_path) == []


# ---- the writer thread ---------------------------------------------------------------------------------

def test_writer_thread_is_a_daemon(tmp_path):
    """As docs/checkpoints.md says: a daemon, so an idle writer never holds up the interpreter's exit (a write in
    flight still lands: the atexit hook waits for it, see test_checkpoint_writer's
    test_unflushed_write_completes_when_the_interpreter_exits, whose writer is never closed)."""
    with CheckpointWriter() as writer:
        writer.save({"v": torch.ones(2)}, tmp_path / "a.pth")
        thread = next(t for t in threading.enumerate() if t.name == WRITER_THREAD_NAME)
        assert thread.daemon
