"""harness.provenance.git_commit: git where there is a .git, else the COMMIT file the GPU staging writes."""

import subprocess

from harness.provenance import ENV, ROOT, git_commit


def test_git_checkout_gives_head():
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    assert git_commit() == head and len(head) == 40


def test_without_git_the_commit_file_is_read(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert git_commit(tmp_path) is None  # no .git, no file
    (tmp_path / ".gpu/a").mkdir(parents=True)
    (tmp_path / ".gpu/a/COMMIT").write_text("1234abcd\ndirty\n")  # stage-model.sh's format
    assert git_commit(tmp_path) == "1234abcd+dirty"
    (tmp_path / "COMMIT").write_text("feedbeef\n")
    assert git_commit(tmp_path) == "feedbeef"  # the root's file comes first
    monkeypatch.setenv(ENV, "cafe0001")
    assert git_commit(tmp_path) == "cafe0001"
    (tmp_path / "elsewhere").write_text("cafe0002\n")
    monkeypatch.setenv(ENV, str(tmp_path / "elsewhere"))
    assert git_commit(tmp_path) == "cafe0002"


def test_the_gpu_scripts_commit_wins_over_a_stale_git(monkeypatch):
    """The device's copy of the checkout can carry a .git whose HEAD is not the code that runs there."""
    monkeypatch.setenv(ENV, "cafe0003")
    assert git_commit() == "cafe0003"
