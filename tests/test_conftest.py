"""The shared test helpers: copies of the shared pipeline run are self-contained; CI never skips for a missing
fixture or tool."""

import pytest

from tests.conftest import copy_project, sh, skip_or_fail, stages_run


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
