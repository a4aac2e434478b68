"""DVC's own cost at COCO-Stuff 164k's file count (issue 15): a fake 164k layout (tiny 33x33 images and labels,
each file distinct, so only the file count is real) recorded as the download stage's output of a fresh copy of
this project on the cocostuff164k preset shrunk to a toy model, then timed:

    python bench/dvc_scale.py                 # 246,574 files (118,287 + 5,000 image/label pairs)
    python bench/dvc_scale.py --files 20000   # the same layout, scaled down
    python bench/dvc_scale.py --outside       # the layout outside the repository, as dataset.root (README)

Prints one JSON line: seconds for `dvc commit` of data/raw, a full `dvc repro` (wall, the stages' own commands,
and DVC's part: the difference), a no-op `dvc repro`, `dvc status`, `dvc exp run -S crf.bi_w=5` (which stages ran
and DVC's part), the disk used by data/ plus .dvc/cache (a hardlinked file counted once), and each DVC command's
peak memory (its own process, not the stages it runs). With --outside the layout is a folder beside the repository,
named by dataset.root: DVC hashes it in place as prepare's dependency (first in a `dvc status`, timed as
`first_hash`), and the download stage only checks it. Not part of `make test`; tests/test_bench.py smoke-runs it
at a small count."""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
FULL = 2 * (118_287 + 5_000)
VAL_SHARE = 5_000 / (118_287 + 5_000)
SIDE = 33
PROJECT_FILES = ["deeplab", "stages", "dvc.yaml", ".dvc/config", ".dvcignore", ".gitignore"]

# Runs one DVC command in this process and appends its wall time and peak memory (this process only: the stages
# DVC starts are children, counted apart) to a JSON-lines file.
_DVC = """
import json, resource, sys, time
from dvc.cli import main
t0 = time.perf_counter()
rc = main(sys.argv[2:])
took = time.perf_counter() - t0
with open(sys.argv[1], "a") as f:
    f.write(json.dumps({"cmd": sys.argv[2:], "rc": rc, "s": took,
                        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}) + "\\n")
sys.exit(rc)
"""

# Wraps a stage's command: appends the stage name and the command's own seconds to a file.
_TIMER = """
import subprocess, sys, time
t0 = time.perf_counter()
rc = subprocess.call(sys.argv[3:])
with open(sys.argv[1], "a") as f:
    f.write(f"{sys.argv[2]}\\t{time.perf_counter() - t0}\\n")
sys.exit(rc)
"""


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _write_pairs(job: tuple[str, str, int, int]) -> int:
    """Image/label pairs start..stop-1 of one split; pixel values vary with the index, so no two files match."""
    from PIL import Image

    root, split, start, stop = job
    images, labels = Path(root, "images", split), Path(root, "annotations", split)
    rng = np.random.default_rng(start)
    base = rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
    for i in range(start, stop):
        rgb = base.copy()
        rgb[0, :4] = np.frombuffer(i.to_bytes(12, "little"), np.uint8).reshape(4, 3)
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
        (images / f"{i:012d}.jpg").write_bytes(buf.getvalue())
        label = np.full((SIDE, SIDE), i % 182, np.uint8)
        label[:2, :2] = 255
        label[-1, :3] = np.frombuffer((i % 182 ** 3).to_bytes(3, "little"), np.uint8) % 182
        (labels / f"{i:012d}.png").write_bytes(_png(label))
    return stop - start


def build_layout(root: Path, n_files: int, processes: int = 2, val_pairs: int | None = None) -> dict[str, int]:
    """COCO-Stuff 164k's layout under ``root`` with about ``n_files`` files (half images, half labels), of which
    ``val_pairs`` pairs (default: 164k's share) are the val split."""
    pairs = max(2, n_files // 2)
    n_val = max(1, min(pairs - 1, val_pairs or round(pairs * VAL_SHARE)))
    splits = {"train2017": pairs - n_val, "val2017": n_val}
    jobs = []
    for split, n in splits.items():
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        offset = 0 if split == "train2017" else 10 ** 9
        step = max(1, -(-n // (8 * processes)))
        jobs += [(str(root), split, offset + s, offset + min(n, s + step)) for s in range(0, n, step)]
    with Pool(processes) as pool:
        pool.map(_write_pairs, jobs)
    return splits


def toy_params(root: str = "data/raw") -> dict:
    p = yaml.safe_load((REPO / "presets" / "cocostuff164k.yaml").read_text())
    p["dataset"]["root"] = root
    p["model"].update(n_blocks=[1, 1, 1, 1], width=8, scales=[])
    p["init"].update(source="scratch", path=None)
    p["train"].update(device="cpu", iterations=2, batch_size=2, iter_size=1, crop_size=33, checkpoint_every=2,
                      log_every=1, num_workers=0, amp=False, channels_last=False)
    p["logits"].update(device="cpu", num_workers=0, amp=False, channels_last=False)
    p["crf"].update(iterations=1, n_jobs=2)
    p["evaluate"]["n_examples"] = 2
    return p


class Project:
    def __init__(self, root: Path, log: Path) -> None:
        self.root, self.log = root, log
        self.env = {**os.environ, "DEEPLAB_TRACKING": "off", "DVC_SITE_CACHE_DIR": str(root.parent / "site-cache"),
                    "PYTHONPATH": str(root), "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.com",
                    "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@example.com"}
        self.env.pop("MLFLOW_TRACKING_URI", None)
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env.get('PATH', '')}"

    def run(self, *cmd: str) -> subprocess.CompletedProcess:
        res = subprocess.run(cmd, cwd=self.root, env=self.env, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
        return res

    def dvc(self, *args: str) -> dict:
        """One timed DVC command: wall seconds, peak memory, stages run and their own seconds."""
        timings = self.log.with_suffix(".stages")
        timings.unlink(missing_ok=True)
        res = self.run(sys.executable, "-c", _DVC, str(self.log), *args)
        rec = json.loads(self.log.read_text().splitlines()[-1])
        stages = {}
        if timings.exists():
            for line in timings.read_text().splitlines():
                name, secs = line.split("\t")
                stages[name] = float(secs)
        ran = [line.split("'")[1] for line in res.stdout.splitlines() if line.startswith("Running stage '")]
        work = sum(stages.values())
        return {"s": round(rec["s"], 2), "stages_s": round(work, 2), "dvc_s": round(rec["s"] - work, 2),
                "peak_mb": round(rec["peak_mb"]), "ran": ran}


def make_project(root: Path, log: Path, dataset_root: str = "data/raw") -> Project:
    root.mkdir(parents=True)
    for name in PROJECT_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / name)
    (root / "params.yaml").write_text(yaml.safe_dump(toy_params(dataset_root), sort_keys=False))
    timer = log.with_suffix(".timer.py")
    timer.write_text(_TIMER)
    spec = yaml.safe_load((root / "dvc.yaml").read_text())
    for name, stage in spec["stages"].items():  # each command timed on its own, to tell DVC's part apart
        body = stage.get("do", stage)
        label = f"{name}@${{item}}" if "do" in stage else name
        body["cmd"] = f"python {timer} {log.with_suffix('.stages')} {label} {body['cmd']}"
    (root / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return Project(root, log)


def disk_mb(root: Path, paths: list[str] | None = None) -> float:
    """Blocks used by ``paths`` under ``root`` (default data/ and .dvc/cache) together (du counts a file
    hardlinked into both once)."""
    out = subprocess.run(["du", "-sk", "--total", *(paths or ["data", ".dvc/cache"])], cwd=root,
                         capture_output=True, text=True)
    return round(int(out.stdout.splitlines()[-1].split()[0]) / 1024, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=FULL, help=f"dataset files (default {FULL:,}, COCO-Stuff 164k)")
    ap.add_argument("--processes", type=int, default=2, help="processes writing the layout")
    ap.add_argument("--val-pairs", type=int, help="val split size (default 164k's share); the stages after train "
                    "work on it, so a small one measures DVC at the full file count in less time")
    ap.add_argument("--workdir", type=Path, help="a new folder to work in (default: a temporary one, removed)")
    ap.add_argument("--skip-exp", action="store_true", help="leave out the crf experiment")
    ap.add_argument("--cache-type", help="cache.type to try instead of the project's .dvc/config one")
    ap.add_argument("--outside", action="store_true", help="the layout outside the repository, as dataset.root")
    args = ap.parse_args()
    tmp = None
    if args.workdir is None:
        tmp = tempfile.mkdtemp(prefix="dvc-scale-")
        args.workdir = Path(tmp)
    args.workdir.mkdir(parents=True, exist_ok=True)
    try:
        out = bench(args)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out))


def bench(args: argparse.Namespace) -> dict:
    import dvc

    log = args.workdir / "dvc-commands.jsonl"
    dataset = args.workdir / "dataset" if args.outside else None
    p = make_project(args.workdir / "repo", log, str(dataset) if dataset else "data/raw")
    p.run("git", "init", "-q", "-b", "main")
    p.run(sys.executable, "-m", "dvc", "init", "-q", "--force")
    shutil.copy2(REPO / ".dvc" / "config", p.root / ".dvc" / "config")  # the project's cache.type and settings
    if args.cache_type:
        p.run(sys.executable, "-m", "dvc", "config", "cache.type", args.cache_type)
    t0 = time.perf_counter()
    splits = build_layout(dataset or p.root / "data" / "raw", args.files, args.processes, args.val_pairs)
    layout_s = time.perf_counter() - t0
    p.run("git", "add", "-A")
    p.run("git", "commit", "-q", "-m", "project")
    out: dict = {"bench": "dvc_scale", "dvc": dvc.__version__, "files": 2 * sum(splits.values()), "pairs": splits,
                 "layout_s": round(layout_s, 1), "dataset": "outside" if dataset else "data/raw",
                 "cache_type": subprocess.run([sys.executable, "-m", "dvc", "config", "cache.type"], cwd=p.root,
                                              env=p.env, capture_output=True, text=True).stdout.strip()}
    if dataset:
        out["first_hash"] = p.dvc("status")  # DVC hashes the folder in place, once
    else:
        out["commit_raw"] = p.dvc("commit", "-f", "download")  # data/raw recorded as the download stage's output
    out["full_repro"] = p.dvc("repro")
    p.run("git", "add", "-A")
    p.run("git", "commit", "-q", "-m", "ran the pipeline")
    out["noop_repro"] = p.dvc("repro")
    out["status"] = p.dvc("status")
    if not args.skip_exp:
        out["crf_exp"] = p.dvc("exp", "run", "-S", "crf.bi_w=5")
    out["disk_mb"] = {"data+cache": disk_mb(p.root)}
    if dataset:
        out["disk_mb"]["dataset"] = disk_mb(dataset, ["."])
    out["peak_mb"] = max(v["peak_mb"] for v in out.values() if isinstance(v, dict) and "peak_mb" in v)
    return out


if __name__ == "__main__":
    main()
