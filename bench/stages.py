"""The real pipeline stages on a GPU: download (synthetic data), prepare, init, then train, logits and crf (torch
backend) on CUDA at ResNet-101 preset sizes for a few dozen iterations with DataLoader workers on, each as its
own `python -m stages.<name>` process in a fresh folder, as dvc would run them (without dvc or MLflow, which
the GPU machine lacks: DEEPLAB_TRACKING=off).

    python bench/stages.py WORKDIR            # on a GPU: train.device cuda, fails without one
    python bench/stages.py WORKDIR --quick    # CPU, tiny model and data (what CI can run)

Prints one JSON line: seconds per stage, the training loss first and last, the train loop's rate as tqdm
reported it, and what was written."""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
STAGES = ("download", "prepare", "init", "train", "logits", "crf")


def params(quick: bool) -> dict:
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    if quick:
        p["dataset"]["synthetic"].update(n_train=12, n_val=3, height=64, width=64)
        p["model"].update(n_blocks=[1, 1, 1, 1], width=8)
        p["train"].update(device="cpu", iterations=4, batch_size=2, iter_size=1, crop_size=49, num_workers=2,
                          checkpoint_every=4, log_every=2)
        p["logits"].update(device="cpu", num_workers=1)
        p["crf"].update(backend="torch", device="cpu", n_jobs=1, iterations=2)
    else:  # the voc12 preset's model, crop, batch and workers on synthetic data
        preset = yaml.safe_load((REPO / "presets" / "voc12.yaml").read_text())
        p["dataset"]["synthetic"].update(n_train=60, n_val=8, height=400, width=400)
        p["model"] = preset["model"]
        p["train"].update({k: preset["train"][k] for k in ("batch_size", "iter_size", "crop_size", "num_workers")})
        p["train"].update(device="cuda", iterations=40, checkpoint_every=20, log_every=10)
        p["logits"].update(device="cuda", num_workers=4)
        p["crf"].update(backend="torch", device="cuda")
    return p


def tqdm_rate(stderr: str, desc: str) -> dict:
    """The last progress line of the ``desc`` bar: elapsed time and rate as tqdm printed them."""
    lines = [s for s in re.split(r"[\r\n]", stderr) if s.startswith(f"{desc}:")]
    if not lines:
        return {}
    m = re.search(r"\[(?P<elapsed>[\d:]+)<[^,]*, *(?P<rate>[\d.]+|\?)(?P<unit>\w+/s|s/\w+)", lines[-1])
    return {"bar": lines[-1].strip()[-90:], **({"rate": m["rate"] + m["unit"], "elapsed": m["elapsed"]} if m else {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workdir", type=Path, help="a new folder to run the stages in")
    ap.add_argument("--quick", action="store_true", help="CPU, tiny model and data")
    args = ap.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=False)
    p = params(args.quick)
    (work / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    env = {**os.environ, "DEEPLAB_TRACKING": "off", "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    out: dict = {"bench": "stages", "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                 "torch": torch.__version__, "quick": args.quick, "model": p["model"],
                 "train": {k: p["train"][k] for k in ("device", "iterations", "batch_size", "iter_size", "crop_size",
                                                      "num_workers")},
                 "tracking": "off", "stage_s": {}}
    for stage in STAGES:
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=work, env=env, capture_output=True,
                             text=True)
        out["stage_s"][stage] = round(time.perf_counter() - t0, 2)
        if stage in ("train", "logits"):
            out[f"{stage}_progress"] = tqdm_rate(res.stderr, stage)
        if res.returncode != 0:
            out.update(status="failed", failed_stage=stage, rc=res.returncode, stderr_tail=res.stderr[-1500:])
            print(json.dumps(out))
            sys.exit(1)
    with open(work / "metrics" / "train_log.csv", newline="") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    out["loss_first_last"] = [round(losses[0], 4), round(losses[-1], 4)]
    out["loss_finite"] = all(math.isfinite(x) for x in losses)
    out["written"] = {d: len(list((work / "data" / d).glob("*"))) for d in ("logits", "predictions/raw",
                                                                          "predictions/crf")}
    out["mlflow_db"] = (work / "mlflow.db").exists()  # DEEPLAB_TRACKING=off: nothing logged
    out["status"] = "ok" if out["loss_finite"] else "failed"
    print(json.dumps(out))


if __name__ == "__main__":
    main()
