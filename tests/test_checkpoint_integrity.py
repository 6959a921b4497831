"""Checkpoint integrity (SPEC §8 "No silent wrong results", "Clear messages"): the SHA-256 stored in every
checkpoint and verified on load, and one clear line for every way a file can be unreadable."""
from __future__ import annotations

import hashlib
import os
import zipfile

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_loader, make_model, quiet_params
from super_trainer import CheckpointError, Trainer, load_checkpoint_to_model
from super_trainer.checkpoint import CheckpointWriter, read_checkpoint, save_checkpoint
from super_trainer.checksum import TRAILER_PREFIX, verify_checksum


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real ckpt_latest.pth of a 1-epoch run (written by the background writer), and its bytes."""
    root = tmp_path_factory.mktemp("integrity")
    result = Trainer("exp", root).train(model=make_model(), training_params=quiet_params(max_epochs=1),
                                        train_loader=make_loader(), valid_loader=make_loader(16))
    path = Path(result.ckpt_dir) / "ckpt_latest.pth"
    return path, path.read_bytes()


def flip_positions(size):
    """~300 positions: spread over the whole file, plus every byte of the last 120 (the zip's end record and
    the checksum trailer)."""
    spread = np.linspace(0, size - 1, 200).astype(int).tolist()
    return sorted(set(spread) | set(range(size - 120, size)))


def test_every_single_bit_flip_is_refused_naming_the_file(trained, tmp_path):
    path, data = trained
    positions = flip_positions(len(data))
    assert len(positions) >= 300
    damaged = tmp_path / "ckpt_latest.pth"
    loaded_silently_by_torch = 0
    for i, pos in enumerate(positions):
        flipped = bytearray(data)
        flipped[pos] ^= 1 << (i % 8)
        damaged.write_bytes(bytes(flipped))
        with pytest.raises(CheckpointError) as info:
            read_checkpoint(damaged)
        message = str(info.value)
        assert str(damaged) in message and "\n" not in message, (pos, message)
        try:  # what a load without the checksum would have done
            torch.load(damaged, weights_only=True)
            loaded_silently_by_torch += 1
        except Exception:
            pass
    # Without the checksum many of these flips load without any error (the issue counted 231 of 300).
    assert loaded_silently_by_torch > len(positions) // 3


def test_flipped_bytes_are_refused_by_every_loader(trained, tmp_path):
    path, data = trained
    run = tmp_path / "exp" / "RUN_20260101_000000_000000"  # a run dir the resume finds
    run.mkdir(parents=True)
    damaged = run / "ckpt_latest.pth"
    for pos in (len(data) // 3, len(data) // 2, len(data) - 50):  # tensor bytes, pickle/zip records, the trailer
        flipped = bytearray(data)
        flipped[pos] ^= 0xFF
        damaged.write_bytes(bytes(flipped))
        with pytest.raises(CheckpointError, match="corrupted"):
            load_checkpoint_to_model(make_model(), damaged)
        with pytest.raises(CheckpointError, match="ckpt_latest.pth is corrupted"):  # resume: before any event
            Trainer("exp", tmp_path).train(model=make_model(), training_params=quiet_params(resume=True),
                                           train_loader=make_loader(), valid_loader=make_loader(16))


def test_checkpoint_stays_a_plain_torch_file_with_a_verifiable_digest(trained, tmp_path):
    path, data = trained
    state = torch.load(path, weights_only=True)  # by hand, as users do
    assert state["epoch"] == 1
    assert torch.load(path, weights_only=True, mmap=True)["epoch"] == 1
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
        comment = archive.comment
    assert comment.startswith(TRAILER_PREFIX)
    # The digest covers every byte before the comment's 2-byte length field: checkable with sha256sum.
    assert hashlib.sha256(data[:-len(comment) - 2]).hexdigest().encode() == comment[len(TRAILER_PREFIX):]
    with open(path, "rb") as file:
        assert verify_checksum(file) == comment[len(TRAILER_PREFIX):].decode()


def test_every_writer_stores_the_checksum(tmp_path):
    state = {"net": make_model().state_dict(), "epoch": 1}
    save_checkpoint(state, tmp_path / "sync.pth")
    with CheckpointWriter() as writer:
        writer.save(state, tmp_path / "bg.pth", tmp_path / "copy.pth")
    for name in ("sync.pth", "bg.pth", "copy.pth"):
        with open(tmp_path / name, "rb") as file:
            assert verify_checksum(file) is not None, name


def test_checkpoints_without_checksum_still_load(tmp_path):
    """0.2 checkpoints (and any plain torch.save file) have no checksum: read unverified, as before."""
    path = tmp_path / "old.pth"
    model = make_model()
    torch.save({"net": model.state_dict(), "epoch": 2, "format": "super_trainer/1"}, path)
    with open(path, "rb") as file:
        assert verify_checksum(file) is None
    assert read_checkpoint(path, required_keys=("net",))["epoch"] == 2
    load_checkpoint_to_model(make_model(seed=1), path)
    legacy = tmp_path / "legacy.pth"  # torch's pre-zip format
    torch.save({"net": model.state_dict()}, legacy, _use_new_zipfile_serialization=False)
    assert read_checkpoint(legacy, required_keys=("net",))["net"].keys() == model.state_dict().keys()


# ---- messages ----------------------------------------------------------------------------------------

def test_unknown_format_version_is_refused(tmp_path):
    path = tmp_path / "future.pth"
    save_checkpoint({"net": {}, "format": "super_trainer/7"}, path)
    with pytest.raises(CheckpointError, match=r"future.pth has format 'super_trainer/7'.*upgrade"):
        read_checkpoint(path, required_keys=())


def test_random_bytes_are_not_told_that_weights_only_false_would_help(tmp_path):
    for name, data in (("random.pth", os.urandom(4096)), ("pickle_like.pth", b"\x80\x02" + os.urandom(4096))):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(CheckpointError) as info:
            read_checkpoint(path)
        message = str(info.value)
        assert name in message and "weights_only" not in message and "likely succeed" not in message, message
        assert "\n" not in message


def test_refused_object_gets_one_complete_line_naming_the_opt_out(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"net": make_model().state_dict(), "payload": zipfile.ZipInfo("x")}, path)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path, required_keys=())
    message = str(info.value)
    assert "\n" not in message and "\x1b" not in message
    assert "evil.pth" in message and "zipfile.ZipInfo" in message
    assert "resume_weights_only: false" in message and "weights_only=False" in message and "trust" in message
    assert message.endswith("add_safe_globals")  # complete, not cut off
    assert read_checkpoint(path, weights_only=False, required_keys=())["payload"].filename == "x"


def test_directory_named_like_a_checkpoint_is_reported_as_a_directory(tmp_path):
    (tmp_path / "ckpt_latest.pth").mkdir()
    with pytest.raises(CheckpointError, match="ckpt_latest.pth is a directory"):
        read_checkpoint(tmp_path / "ckpt_latest.pth")
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "nope.pth")


@pytest.mark.parametrize("keep", [0, 10, 100, 0.5, -10, -50, -120])
def test_truncated_file_is_reported_as_truncated(trained, tmp_path, keep):
    _, data = trained
    size = int(len(data) * keep) if isinstance(keep, float) else keep if keep >= 0 else len(data) + keep
    path = tmp_path / "cut.pth"
    path.write_bytes(data[:size])
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert "cut.pth" in message and ("truncated" in message), message
    assert "Errno" not in message
