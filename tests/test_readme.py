"""The README's DVC commands, taken from README.md itself so the text cannot drift from what DVC does: run in a
tiny project (a real git + DVC repository), queued but never run."""

from __future__ import annotations

import json
import shlex
import shutil

import pytest
import yaml

from tests.conftest import REPO, make_project, sh, tiny_params


def readme_commands(starts: str) -> list[list[str]]:
    """The commands (joined by ``&&``) of the README's one code line that starts with ``starts``."""
    lines = [line for line in (REPO / "README.md").read_text().splitlines() if line.startswith(starts)]
    assert len(lines) == 1, f"README.md: expected one line starting {starts!r}, found {len(lines)}"
    return [shlex.split(part, comments=True) for part in lines[0].split("&&")]


def readme_command(starts: str) -> list[str]:
    return readme_commands(starts)[0]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tiny project with dvc.lock, its outputs and metrics/ committed, as this repository has them; its
    pipeline cut to the download stage, so that it has all run in seconds."""
    root = make_project(tmp_path_factory.mktemp("readme") / "repo", tiny_params())
    pipeline = yaml.safe_load((root / "dvc.yaml").read_text())
    pipeline["stages"] = {"download": pipeline["stages"]["download"]}
    (root / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    shutil.copytree(REPO / "metrics", root / "metrics")
    sh(root, "dvc", "repro")
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-q", "-m", "download ran")
    return root


def _queued(root) -> dict[str, dict]:
    """Name -> params.yaml content of each queued experiment."""
    shown = json.loads(sh(root, "dvc", "exp", "show", "--json").stdout)
    out = {}
    for row in shown:
        for exp in row.get("experiments") or []:
            if (exp.get("executor") or {}).get("state") == "queued":
                out[exp["name"]] = exp["revs"][0]["data"]["params"]["params.yaml"]["data"]
    return out


@pytest.fixture
def queue(project):
    yield project
    sh(project, "dvc", "queue", "remove", "--all")
    sh(project, "git", "checkout", "--", "params.yaml")


def test_readme_queue_command_queues_two_experiments(queue):
    cmd = readme_command("dvc exp run --queue")
    assert "--queue" in cmd
    sh(queue, *cmd)
    queued = _queued(queue)
    assert sorted(p["train"]["lr"] for p in queued.values()) == [5e-4, 1e-3]
    status = sh(queue, "dvc", "queue", "status").stdout
    assert all(name in status for name in queued) and status.count("Queued") == 2


def test_readme_reset_keeps_a_workspace_experiment_out_of_the_queue(queue):
    committed = yaml.safe_load((queue / "params.yaml").read_text())["crf"]["bi_w"]
    sh(queue, "dvc", "exp", "run", "-S", "crf.bi_w=5")  # a workspace experiment (nothing to rerun)
    sh(queue, *readme_command("dvc exp run --queue"))
    assert {p["crf"]["bi_w"] for p in _queued(queue).values()} == {5}  # inherited, as the README warns
    sh(queue, "dvc", "queue", "remove", "--all")
    for cmd in readme_commands("git checkout -- params.yaml"):
        sh(queue, *cmd)
    sh(queue, *readme_command("dvc exp run --queue"))
    assert {p["crf"]["bi_w"] for p in _queued(queue).values()} == {committed}


def test_only_changed_shows_the_queued_lr_in_a_narrow_table(queue):
    sh(queue, *readme_command("dvc exp run --queue"))
    cmd = readme_command("dvc exp show --only-changed")
    narrow = sh(queue, *cmd, "--csv").stdout.splitlines()[0].split(",")
    full = sh(queue, "dvc", "exp", "show", "--csv").stdout.splitlines()[0].split(",")
    assert "train.lr" in narrow and len(narrow) < len(full) / 3
