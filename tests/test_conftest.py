"""The shared test helpers: copies of the shared pipeline run are self-contained; a project's ready-made MLflow store
is the one MLflow would make; CI never skips for a missing fixture or tool."""

import sqlite3
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, copy_project, make_project, sh, skip_or_fail, stages_run, tiny_params


def test_missing_fixture_skips_for_a_developer_and_fails_in_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="fixture not found"):
        skip_or_fail("fixture not found")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="fixture not found.*CI=true"):
        skip_or_fail("fixture not found")


def test_copy_of_the_shared_run_is_up_to_date_and_logs_into_its_own_store(tiny_pipeline, tmp_path):
    from mlflow.tracking import MlflowClient

    copy = copy_project(tiny_pipeline, tmp_path / "copy")
    assert stages_run(sh(copy, "dvc", "repro").stdout) == []
    assert sh(copy, "git", "status", "--porcelain").stdout == ""
    client = MlflowClient(tracking_uri=f"sqlite:///{copy / 'mlflow.db'}")
    exp = client.get_experiment_by_name("deeplab")
    assert exp.artifact_location == (copy / "mlartifacts").as_uri()
    runs = client.search_runs([exp.experiment_id])
    assert runs and all(r.info.artifact_uri.startswith(exp.artifact_location + "/") for r in runs)
    run = next(r for r in runs if r.data.tags.get("deeplab.stage") == "evaluate@crf")
    assert "metrics/crf/scores.json" in [a.path for a in client.list_artifacts(run.info.run_id, "metrics/crf")]


def _store(folder: Path) -> tuple:
    """What folder/mlflow.db holds: schema, migration revision, rows per table, experiments (locations relative)."""
    con = sqlite3.connect(folder / "mlflow.db")
    # Each statement as its sorted lines: alembic's batch migrations order a table's constraints differently
    # from one run to the next (two stores MLflow makes differ so), but every column and constraint is a line.
    schema = [(kind, name, sorted(line.strip().rstrip(",").strip() for line in sql.splitlines()) if sql else None)
              for kind, name, sql in con.execute("SELECT type, name, sql FROM sqlite_master ORDER BY type, name")]
    rows = {name: con.execute(f'SELECT count(*) FROM "{name}"').fetchone()[0] for kind, name, _ in schema
            if kind == "table"}
    exps = [(i, name, str(Path(loc).relative_to(folder.resolve())), stage, created) for i, name, loc, stage, created
            in con.execute("SELECT experiment_id, name, artifact_location, lifecycle_stage, creation_time "
                           "FROM experiments")]
    revision = con.execute("SELECT version_num FROM alembic_version").fetchall()
    con.close()
    return schema, rows, revision, exps


def test_a_projects_ready_made_store_is_the_one_mlflow_makes_there(tmp_path):
    start = int(time.time() * 1000)
    root = make_project(tmp_path / "repo", tiny_params())
    fresh = make_project(tmp_path / "fresh", tiny_params(), mlflow_store=False)
    assert not (fresh / "mlflow.db").exists()
    sh(fresh, sys.executable, "-c", "import sys; from deeplab.tracking import client; client(sys.argv[1])",
       f"sqlite:///{fresh / 'mlflow.db'}", env={"PYTHONPATH": str(REPO)})  # MLflow makes it, in the project
    made, ready = _store(fresh), _store(root)
    assert ready[:3] == made[:3]  # same tables and migrations, all as empty
    assert [e[:4] for e in ready[3]] == [e[:4] for e in made[3]] == [(0, "Default", "mlruns/0", "active")]
    assert start <= ready[3][0][4] <= int(time.time() * 1000)  # made now, as far as anyone reading it can tell
