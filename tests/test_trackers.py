"""report_to: every accelerate tracker, comma lists, one-line errors; MLflow runs for real."""

from __future__ import annotations

import importlib.util

import pytest

from notrainer.observability import history
from notrainer.observability import trackers
from notrainer.errors import UsageError


def test_none_and_empty_mean_no_tracker():
    assert trackers.resolve_report_to("none") is None
    assert trackers.resolve_report_to("") is None
    assert trackers.resolve_report_to(None) is None


def test_every_accelerate_tracker_is_known():
    from accelerate.utils import LoggerType

    assert set(trackers.supported_trackers()) == {t.value for t in LoggerType} - {"all"}
    for name in trackers.supported_trackers():
        if trackers.is_installed(name):
            assert trackers.resolve_report_to(name) == [name]
        else:
            with pytest.raises(UsageError, match=r"pip install \S+$"):
                trackers.resolve_report_to(name)


def test_comma_list_keeps_order_and_drops_repeats():
    assert trackers.resolve_report_to("tensorboard, tensorboard") == ["tensorboard"]
    if trackers.is_installed("mlflow"):
        assert trackers.resolve_report_to("mlflow,tensorboard") == ["mlflow", "tensorboard"]
        assert trackers.resolve_report_to(["tensorboard", "mlflow"]) == ["tensorboard", "mlflow"]


def test_all_means_every_installed_tracker():
    assert trackers.resolve_report_to("all") == (trackers.installed_trackers() or None)
    assert "tensorboard" in trackers.resolve_report_to("all")  # a core dependency


def test_unknown_tracker_gets_did_you_mean_in_one_line():
    with pytest.raises(UsageError) as e:
        trackers.resolve_report_to("mlfow")
    assert "did you mean mlflow?" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UsageError, match="unknown tracker 'neptune'"):
        trackers.resolve_report_to("tensorboard,neptune")
    with pytest.raises(UsageError, match="cannot be combined"):
        trackers.resolve_report_to("none,tensorboard")


def test_missing_package_names_the_pip_command(monkeypatch):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_comet_ml_available", lambda: False)
    with pytest.raises(UsageError) as e:
        trackers.resolve_report_to("comet")  # an alias of comet_ml
    assert str(e.value) == "report_to=comet_ml needs the comet_ml package: pip install comet-ml"


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow not installed")
def test_mlflow_local_store_records_logged_values(tmp_path, monkeypatch):
    """Values logged through accelerate's MLflow tracker come back from mlflow's own client.

    The store is a local SQLite file (MLflow 3 refuses its old ./mlruns file store unless
    MLFLOW_ALLOW_FILE_STORE=true); `default_tracker_env` picks it when no URI is set.
    """
    import mlflow
    from accelerate import Accelerator
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    env = trackers.default_tracker_env(["mlflow"], str(tmp_path))
    uri = env["MLFLOW_TRACKING_URI"]
    assert uri == "sqlite:///" + str(tmp_path / "logs" / "mlflow.db")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    log_with = trackers.resolve_report_to("mlflow")
    acc = Accelerator(cpu=True, log_with=log_with, project_dir=str(tmp_path))
    acc.init_trackers("notrainer-test", config={"learning_rate": 1e-3, "seed": 7})
    losses = {1: 2.5, 2: 2.25, 3: 1.875}
    for step, loss in losses.items():
        # What the loop does at each logging step: the same dict to the trackers and the history.
        logs = {"train_loss": loss, "learning_rate": 1e-3 * step, "epoch": step / 3}
        acc.log(logs, step=step)
        history.append(str(tmp_path), history.train_record(step, **logs))
    run_id = acc.get_tracker("mlflow").tracker.info.run_id
    acc.end_training()

    client = MlflowClient(tracking_uri=uri)
    got = {m.step: m.value for m in client.get_metric_history(run_id, "train_loss")}
    assert got == losses
    assert got == {r["step"]: r["loss"] for r in history.read(str(tmp_path))}
    assert client.get_run(run_id).data.params["learning_rate"] == "0.001"
    assert mlflow.active_run() is None
    assert (tmp_path / "logs" / "mlflow.db").is_file()  # inside the run directory, not the cwd
