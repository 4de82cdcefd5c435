"""Artifact directories: atomic replacement, manifests, fingerprints, readable errors."""

import errno
import json

import pytest

from lmlab import artifacts
from lmlab.errors import UserError


def test_atomic_dir_replaces_only_on_success(tmp_path):
    out = tmp_path / "art"
    with artifacts.atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("good")
    assert (out / "a.txt").read_text() == "good"

    with pytest.raises(RuntimeError):
        with artifacts.atomic_dir(out) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("crash mid-write")
    assert (out / "a.txt").read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["art"]  # no temp debris


def test_full_disk_keeps_previous_artifact(tmp_path):
    out = tmp_path / "art"
    with artifacts.atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("good")
    with pytest.raises(UserError, match="out of disk space.*intact"):
        try:
            with artifacts.atomic_dir(out) as tmp:
                raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise artifacts.disk_error(e, out) from None
    assert (out / "a.txt").read_text() == "good"


def test_manifest_and_fingerprints(tmp_path):
    fp = artifacts.stage_fingerprint("corpus", {"a": 1}, {"x": "abc"})
    assert fp == artifacts.stage_fingerprint("corpus", {"a": 1}, {"x": "abc"})
    assert fp != artifacts.stage_fingerprint("corpus", {"a": 2}, {"x": "abc"})
    artifacts.write_manifest(tmp_path, "corpus", {"a": 1}, fp, verb="corpus", timings={"total_s": 1.0})
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["kind"] == "corpus" and m["fingerprint"] == fp and m["lmlab_version"]
    assert artifacts.is_up_to_date(tmp_path, fp) and not artifacts.is_up_to_date(tmp_path, "other")


def test_require_artifact_messages(tmp_path):
    with pytest.raises(UserError, match=r"not found.*run `lmlab pretrain` first"):
        artifacts.require_artifact(tmp_path / "missing", "model")
    (tmp_path / "d").mkdir()
    with pytest.raises(UserError, match="no readable manifest.json"):
        artifacts.require_artifact(tmp_path / "d", "packed")
    artifacts.write_manifest(tmp_path / "d", "corpus", {}, "fp", verb="corpus")
    with pytest.raises(UserError, match="is a 'corpus' artifact, expected 'packed'"):
        artifacts.require_artifact(tmp_path / "d", "packed")
