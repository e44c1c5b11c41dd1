"""An output location that cannot be written, shared by the writers' refusal tests (test_writers.py,
test_sample.py, dataprep/test_data.py): a file where a folder must be, a folder that is not writable (a
read-only mount; stood in for by patching infra.run_folder's probe, as root writes anywhere), a full disk."""

from infra import run_folder as RF

UNWRITABLE = ["under a file", "not writable", "full"]


def make_unwritable(case, folder, monkeypatch, free_bytes=0):
    """Make `folder` (a parent of the output) unwritable in the way `case` names; returns the phrase the refusal
    must contain."""
    if case == "under a file":
        folder.write_text("a file")
        return f"{folder.name} is a regular file, not a folder"
    if case == "not writable":
        monkeypatch.setattr(RF, "_writable", lambda path: False)
        return "is not writable"
    if case == "full":
        monkeypatch.setattr(RF, "_free_bytes", lambda path: free_bytes)
        return f"is full ({free_bytes} bytes free)"
    raise ValueError(f"case must be one of {UNWRITABLE}, got {case!r}")
