"""Multi-process training (torchrun, gloo on CPU) and recovery from kill -9."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import torch
import yaml

from deeplab import synthetic
from deeplab.config import ModelConfig, TrainConfig
from deeplab.data import voc_layout_items, write_list
from deeplab.loader import DrawSampler
from deeplab.models import build_model, init_from_scratch, read_state_dict
from tests.conftest import REPO, run_env

MODEL = ModelConfig(n_blocks=(1, 1, 1, 1), width=8)


def setup(tmp_path, n=8):
    synthetic.generate(tmp_path / "raw", n, 1, 48, 48, 4, seed=1)
    write_list(tmp_path / "train.txt", voc_layout_items(tmp_path / "raw", "train"))
    model = build_model(4, MODEL.n_blocks, MODEL.width)
    init_from_scratch(model, 0)
    torch.save(model.state_dict(), tmp_path / "init.pt")


WORKER = textwrap.dedent("""
    import os, sys, torch
    from pathlib import Path
    from deeplab.config import DatasetConfig, ModelConfig, TrainConfig
    from deeplab.train import train
    tmp = Path(sys.argv[1])
    t = TrainConfig.model_validate_json(sys.argv[2])
    r = train(DatasetConfig(n_classes=4), ModelConfig(n_blocks=(1, 1, 1, 1), width=8), t, tmp / "train.txt",
              tmp / "init.pt", tmp / "final.pt", tmp / "ck.pt", tmp / "log.csv")
    torch.save(r.model.state_dict(), tmp / f"rank{os.environ.get('RANK', 0)}.pt")
""")


def run_worker(tmp_path, t: TrainConfig, nproc: int = 1, background: bool = False):
    (tmp_path / "worker.py").write_text(WORKER)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd = [*(launcher if nproc > 1 else [sys.executable]), str(tmp_path / "worker.py"), str(tmp_path),
           t.model_dump_json()]
    env = {**run_env(tmp_path), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if background:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_draws_are_split_across_ranks():
    def take(n, sampler):
        return [draw for _, draw in (next(it) for it in [iter(sampler)] * n)]

    stream = take(12, DrawSampler(5, seed=0))
    ranks = [take(6, DrawSampler(5, seed=0, stride=2, offset=r)) for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == stream == list(range(12))
    assert ranks[1] == [1, 3, 5, 7, 9, 11]
    assert take(3, DrawSampler(5, seed=0, start=3, stride=2, offset=1)) == ranks[1][3:6]


def test_two_gloo_processes_stay_in_sync(tmp_path):
    setup(tmp_path)
    t = TrainConfig(iterations=4, batch_size=1, iter_size=2, crop_size=33, checkpoint_every=2, log_every=1)
    run_worker(tmp_path, t, nproc=2)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    final, init = read_state_dict(tmp_path / "final.pt"), torch.load(tmp_path / "init.pt")
    assert all(torch.equal(final[k], r0[k]) for k in r0)
    assert not torch.equal(final["base.aspp.c0.weight"], init["base.aspp.c0.weight"])
    assert len((tmp_path / "log.csv").read_text().splitlines()) == 1 + 4


def test_kill_9_then_resume_matches_uninterrupted(tmp_path):
    setup(tmp_path)
    # The kill lands at the first checkpoint from iteration 10 on, far from the end: the margin is what the size is for
    t = TrainConfig(iterations=100, batch_size=2, iter_size=1, crop_size=33, checkpoint_every=5, log_every=5,
                    deterministic=True)
    ref = tmp_path / "ref"
    ref.mkdir()
    for f in ("train.txt", "init.pt"):
        (ref / f).write_bytes((tmp_path / f).read_bytes())
    run_worker(ref, t)

    proc = run_worker(tmp_path, t, background=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (tmp_path / "ck.pt").exists():
            try:
                if torch.load(tmp_path / "ck.pt")["iteration"] >= 10:
                    break
            except Exception:  # noqa: BLE001 - the file may be replaced while we read it
                pass
        time.sleep(0.05)
    assert proc.poll() is None, f"training ended before it could be killed: {proc.stderr.read()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(tmp_path / "ck.pt")["iteration"]
    assert 10 <= killed_at < t.iterations and not (tmp_path / "final.pt").exists()
    # The kill may land while the next checkpoint is written: its temporary stays behind (nothing runs on SIGKILL),
    # never under the real name (ck.pt loaded above). The resumed run removes it; one is planted so that is tested.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / f".ck.pt.{int(dead.stdout)}.tmp").write_bytes(b"half a checkpoint")

    run_worker(tmp_path, t)
    assert not list(tmp_path.glob(".*.tmp"))
    a, b = read_state_dict(ref / "final.pt"), read_state_dict(tmp_path / "final.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (ref / "log.csv").read_text() == (tmp_path / "log.csv").read_text()
    yaml.safe_dump({"killed_at": killed_at})  # keep the value visible in failure output


def test_torchrun_training_logs_the_last_iteration_to_mlflow(tmp_path):
    """The train stage under torchrun reads its log back for MLflow: the final loss is the last iteration's, as
    in one process, not the last multiple of train.log_every's (iterations 3, log_every 2: iteration 2's)."""
    from mlflow.tracking import MlflowClient

    from tests.conftest import make_project, sh, tiny_params

    params = tiny_params(**{"train.iterations": 3, "train.log_every": 2, "train.checkpoint_every": 3,
                            "train.nproc_per_node": 2})
    params["dataset"]["synthetic"].update(n_train=4, n_val=1, height=48, width=48)
    root = make_project(tmp_path / "repo", params)
    env = {"OMP_NUM_THREADS": "1", "DEEPLAB_TRACKING": "off"}
    for stage in ("download", "prepare", "init"):
        sh(root, sys.executable, "-m", f"stages.{stage}", env=env)
    sh(root, sys.executable, "-m", "stages.train", env={"OMP_NUM_THREADS": "1"})
    last = (root / "metrics" / "train_log.csv").read_text().splitlines()[-1].split(",")
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("deeplab").experiment_id],
                                "tags.`deeplab.stage` = 'train'")
    assert last[0] == "3" and run.data.metrics["final_train_loss"] == float(last[1])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [2, 3]
