import os

import torch

from deeplab.files import remove_stale_temps, save_torch, write_json


def test_save_torch_is_byte_reproducible(tmp_path):
    # DVC hashes the weights: the same tensors must give the same bytes, whatever the file name or process.
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    save_torch(state, tmp_path / "a.pt")
    save_torch(state, tmp_path / "sub" / "b.pt")
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "sub" / "b.pt").read_bytes()
    assert torch.equal(torch.load(tmp_path / "a.pt", weights_only=True)["w"], state["w"])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_write_json_atomic(tmp_path):
    write_json(tmp_path / "x.json", {"b": 1, "a": [1, 2]})
    assert (tmp_path / "x.json").read_text().startswith('{\n  "a"')


def test_stale_temps_of_dead_writers_are_removed_and_a_live_writers_kept(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead_pid = int(dead.stdout)
    target = tmp_path / "ck.pt"
    stale, live = tmp_path / f".ck.pt.{dead_pid}.tmp", tmp_path / f".ck.pt.{os.getppid()}.tmp"
    others = [tmp_path / f".other.pt.{dead_pid}.tmp", tmp_path / ".ck.pt.notapid.tmp", target]
    for f in (stale, live, *others):
        f.write_bytes(b"x")
    assert remove_stale_temps(target) == [stale]
    assert not stale.exists() and live.exists() and all(f.exists() for f in others)
