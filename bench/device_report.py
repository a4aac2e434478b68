"""bench/device.sh's bookkeeping: the machine line, one JSON line per step into results.jsonl (whatever the step
did: its own JSON line, or why there is none), the CUDA tests as a JSON line, and the goals table at the end.

    python bench/device_report.py env RESULTS                     # device, torch, date, commit
    python bench/device_report.py record RESULTS NAME RC WALL LIMIT STDOUT STDERR [NOTE]
    python bench/device_report.py pytest XML [PYTEST ARGS...]       # runs pytest, prints one JSON line
    python bench/device_report.py summary RESULTS                 # the goals table
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def append(results: Path, row: dict) -> None:
    line = json.dumps(row)
    with open(results, "a") as f:
        f.write(line + "\n")
    print(line, flush=True)


def env(results: Path) -> None:
    import torch

    def cmd(*args: str) -> str | None:
        try:
            return subprocess.run(args, capture_output=True, text=True, timeout=20, cwd=REPO).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            return None

    cuda = torch.cuda.is_available()
    append(results, {
        "bench": "env", "status": "ok",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None,
        "gpu": cmd("nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"),
        "python": platform.python_version(), "cpus": os.cpu_count(), "host": platform.node(),
        # the GPU machine gets a copy of the tree without .git: DEVICE_COMMIT names the commit
        "commit": os.environ.get("DEVICE_COMMIT") or cmd("git", "rev-parse", "HEAD"),
        "quick": os.environ.get("DEVICE_QUICK") == "1",
    })


def last_json(path: Path) -> dict | None:
    try:
        lines = path.read_text().strip().splitlines()
        row = json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None
    return row if isinstance(row, dict) else None


def record(results: Path, name: str, rc: int, wall: int, limit: int, stdout: Path, stderr: Path,
           note: str = "") -> None:
    """The step's own JSON line (its last stdout line) with the step's status, time and limit; else a line saying
    why there is none: timed out, failed (with the end of its stderr) or skipped (``note``)."""
    row = last_json(stdout) if rc == 0 else None
    if rc == 0 and row is not None:
        row = {"step": name, "bench": name, **row}
        row.setdefault("status", "ok")
        lines = len(stdout.read_text().strip().splitlines())
        if lines > 1:  # a benchmark prints its one JSON line and nothing else
            row["extra_stdout_lines"] = lines - 1
    elif rc == 0:
        row = {"bench": name, "step": name, "status": "skipped" if note else "ok"}
    else:
        row = last_json(stdout) or {}  # a step that failed after saying why keeps its line
        row = {"step": name, "bench": name, **row, "status": "timeout" if rc in (124, 137) else "failed", "rc": rc}
        try:
            row["stderr_tail"] = stderr.read_text(errors="replace")[-1500:]
        except OSError:
            pass
    row.update(wall_s=wall, limit_s=limit)
    if note:
        row["note"] = note
    append(results, row)


def pytest(xml: Path, args: list[str]) -> None:
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                          f"--junitxml={xml}", *args], cwd=REPO, capture_output=True, text=True)
    sys.stderr.write(res.stdout + res.stderr)
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    skips: list[str] = []
    try:
        root = ET.parse(xml).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in counts}
        skips = sorted({s.get("message", "") for s in root.iter("skipped")})
    except (OSError, ET.ParseError, AttributeError):
        pass
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    if res.returncode not in (0, 5) or counts["failures"] or counts["errors"]:
        status = "failed"
    elif passed == 0:
        status = "skipped"  # every test needs CUDA and there is none
    else:
        status = "ok"
    print(json.dumps({"bench": "cuda_tests", "status": status, "args": args, "passed": passed,
                      "failed": counts["failures"], "errors": counts["errors"], "skipped": counts["skipped"],
                      "skip_reasons": skips, "pytest_rc": res.returncode, "tail": res.stdout[-600:]}))


def summary(results: Path) -> None:
    """Each goal of issue 16 beside what this run measured."""
    rows: dict[str, dict] = {}
    for line in results.read_text().splitlines():
        row = json.loads(line)
        rows[row.get("step", row.get("bench"))] = row

    def get(step: str, *keys: str):
        value = rows.get(step)
        for k in keys:
            value = value.get(k) if isinstance(value, dict) else None
        return value

    crf182 = next((r for r in get("crf", "results") or [] if r.get("classes") == 182), {})
    goals = [
        ("train fast/parity images/s", get("train", "speedup"), ">= 3"),
        ("train fast/parity peak memory", get("train", "memory_ratio"), "<= 1"),
        ("train loss tail rel diff (fast)", get("train", "loss", "fast", "tail_rel_diff"), "within noise:"),
        ("  parity's own tail rel std (the noise)", get("train", "loss", "reference_tail_rel_std"), "-"),
        ("train fast TFLOP/s share of peak", get("train", "fast", "peak_share"), ">= 0.40"),
        ("train compile/fast images/s", get("train_compile", "compile_vs_fast"), "> 1 to pay"),
        ("infer fast/parity images/s", get("infer", "speedup"), ">= 3"),
        ("infer argmax agreement", get("infer", "argmax_agreement"), ">= 0.999"),
        ("  on the confident half (random weights)", get("infer", "argmax_agreement_confident_half"), "-"),
        ("infer fast TFLOP/s share of peak", get("infer", "fast", "peak_share"), "-"),
        ("crf 182: CUDA vs 1 pydensecrf core", crf182.get("cuda_vs_1core"), ">= 40"),
        ("crf 182: batched CUDA vs joblib all cores", crf182.get("cuda_batched_vs_joblib"), "> 1"),
        ("crf 182: CUDA label agreement", crf182.get("agreement_cuda"), "-"),
    ]
    print(f"\n{'step':<16}{'status':<10}{'wall s':>8}")
    for name, row in rows.items():
        print(f"{name:<16}{row.get('status', '?'):<10}{row.get('wall_s', ''):>8}  {row.get('note', '')}")
    if get("env", "quick"):
        print("\n--quick: toy sizes on CPU; the figures below only show that every step ran")
    print(f"\n{'goal':<44}{'measured':>12}  target")
    for name, value, target in goals:
        shown = "n/a" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)
        print(f"{name:<44}{shown:>12}  {target}")


def main() -> None:
    verb, args = sys.argv[1], sys.argv[2:]
    if verb == "env":
        env(Path(args[0]))
    elif verb == "record":
        record(Path(args[0]), args[1], int(args[2]), int(args[3]), int(args[4]), Path(args[5]), Path(args[6]),
               *args[7:8])
    elif verb == "pytest":
        pytest(Path(args[0]), args[1:])
    elif verb == "summary":
        summary(Path(args[0]))
    else:
        sys.exit(f"unknown verb {verb!r}: env, record, pytest or summary")


if __name__ == "__main__":
    main()
