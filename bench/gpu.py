"""Everything a GPU machine should run, in one command: ``python -m bench --gpu`` (repository root).

No internet needed; torch (a CUDA build) and a CUDA toolkit (nvcc) must be installed. Stages, each in
its own process with its own time limit (a failing or timed-out stage does not stop the later ones):

1. ``env``: GPU, driver, Python, torch, triton, nvcc;
2. ``build``: ``LOWRANK_KERNELS_BUILD_CUDA=1 python -m pip install --no-deps --no-build-isolation
   --no-index .`` (README's command; if pip cannot build a wheel here, ``setup.py build_ext --inplace``);
3. ``import``: in a fresh interpreter outside the repository, the installed package loads its compiled
   rsvd (``cuda_ext_available()``, and a CUDA kernel registered for ``lowrank_kernels::rsvd``);
4. ``bench-model-step``: the whole optimizer step of the 60M and 1B LLaMA layouts (bf16), ours with and
   without a CUDA graph against torch AdamW(fused=True) (bench/bench_model_step.py): issue 10's target,
   first so that a short lease still measures it;
5. ``tests-gpu``: every GPU test, ``python -m pytest -q tests -m gpu``;
6. ``tests-ext``: tests/test_cuda_ext.py and tests/test_rsvd.py, requiring the compiled kernel;
7. ``bench-step``, ``bench-rsvd``: the goal shapes (4096x11008 bf16, ranks 128, 512, 1024).

Tests run on the installed package (tests/conftest.py prefers an installed build whose sources match
this checkout, and prints which package and which rsvd kernel it uses). Results (device, date,
versions, min/median/max) go to bench/results/, with a summary ``gpu_run_<device>_<date>.md`` holding
each stage's status, time and log tail; when $OUT is set, the results and full logs are copied there
too. The exit code is the number of failed stages (0: all passed). Whole run: about 9 minutes at most
(``--budget``; the device tool allows 10 per command); a stage gets at most its own limit and never more than the time left.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
GOAL = ["--shapes", "4096x11008", "--ranks", "128", "512", "1024", "--dtypes", "bfloat16"]

IMPORT_CHECK = r"""
import json, torch, lowrank_kernels
from lowrank_kernels import cuda_ext_available
ok, why = cuda_ext_available()
A = torch.randn(300, 200, device="cuda")
U, S, V = lowrank_kernels.rsvd(A, 8)
torch.cuda.synchronize()
print(json.dumps({"package": lowrank_kernels.__file__, "cuda_ext_available": [ok, why],
                  "cuda_kernel_registered": torch._C._dispatch_has_kernel_for_dispatch_key(
                      "lowrank_kernels::rsvd", "CUDA"),
                  "rsvd_ran": [list(U.shape), list(S.shape), list(V.shape)]}))
assert ok, why
"""


def run_stage(name: str, cmd: list[str], limit: float, log_dir: str, env: dict | None = None,
              cwd: str = REPO) -> dict:
    """Run ``cmd`` with a time limit, streaming its output to the console and to <log_dir>/<name>.log."""
    log_path = os.path.join(log_dir, f"{name}.log")
    print(f"\n=== [{name}] (limit {limit:.0f} s): {' '.join(cmd)}", flush=True)
    start = time.monotonic()
    status = "failed"
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        try:
            # Own process group, so a time-out kills the whole tree (pip's compilers, pytest's workers).
            proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, errors="replace",
                                    start_new_session=True)
        except OSError as exc:
            log.write(f"could not start: {exc}\n")
            print(f"[{name}] could not start: {exc}", flush=True)
            return {"stage": name, "status": "failed", "seconds": 0.0, "log": log_path}
        timed_out = False

        def pump():
            for line in proc.stdout:
                log.write(line)
                sys.stdout.write(f"[{name}] {line}")
                sys.stdout.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            proc.wait(timeout=max(limit, 1.0))
        except subprocess.TimeoutExpired:
            timed_out = True
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=10)
                    break
                except subprocess.TimeoutExpired:
                    continue
        reader.join(timeout=10)
        seconds = time.monotonic() - start
        if timed_out:
            status = f"timed out after {limit:.0f} s"
        elif proc.returncode == 0:
            status = "ok"
        else:
            status = f"failed (exit {proc.returncode})"
        log.write(f"\n[{name}] {status} in {seconds:.1f} s\n")
    print(f"=== [{name}] {status} in {seconds:.1f} s", flush=True)
    return {"stage": name, "status": status, "seconds": round(seconds, 1), "log": log_path}


def use_checkout(py: str) -> bool:
    """Whether scripts outside the repository root must import ./lowrank_kernels: it has an in-place
    build of the extension, or no installed copy exists (then the benchmarks still run, on the
    PyTorch rsvd, and say so)."""
    if any(f.startswith("_C") for f in os.listdir(os.path.join(REPO, "lowrank_kernels"))):
        return True
    probe = subprocess.run([py, "-c", "import importlib.util, sys; "
                                      "sys.exit(importlib.util.find_spec('lowrank_kernels') is None)"],
                           cwd=tempfile.gettempdir(), capture_output=True, timeout=60)
    return probe.returncode != 0


def tail(path: str, lines: int = 25) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def device_slug() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout.strip().splitlines()
        name = out[0] if out else "no-gpu"
    except (OSError, subprocess.SubprocessError):
        name = "no-gpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=540.0, help="seconds for the whole run (default 540)")
    parser.add_argument("--skip-build", action="store_true", help="use the package as installed")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.budget
    started = datetime.datetime.now(datetime.timezone.utc)
    stamp = started.strftime("%Y-%m-%d")
    log_dir = tempfile.mkdtemp(prefix="lowrank_gpu_run_")
    py = sys.executable
    results_env = {"BENCH_RESULTS_DIR": RESULTS}
    # The tests and the import check must see the compiled kernel, not a silent fallback.
    require = {"LOWRANK_KERNELS_REQUIRE_CUDA_EXT": "1"}
    env_script = ("import platform, torch; print('python', platform.python_version()); "
                  "print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', "
                  "torch.cuda.is_available()); print('device', torch.cuda.get_device_name() "
                  "if torch.cuda.is_available() else None)\n"
                  "try:\n import triton; print('triton', triton.__version__)\n"
                  "except ImportError as e: print('triton missing', e)")
    stages = [
        ("env", ["bash", "-c", f"nvidia-smi; {py} -c \"{env_script}\"; (nvcc --version | tail -2) || "
                               "echo 'nvcc not found'; echo python: $(command -v python) pip: $(command -v pip)"],
         30, {}),
    ]
    if not args.skip_build:
        build = ("LOWRANK_KERNELS_BUILD_CUDA=1 {py} -m pip install --no-deps --no-build-isolation --no-index . || "
                 "{{ echo '== pip could not build a wheel; building the extension in place instead'; "
                 "LOWRANK_KERNELS_BUILD_CUDA=1 {py} setup.py build_ext --inplace; }}").format(py=py)
        stages.append(("build", ["bash", "-c", build], 240, {}))
    stages += [
        ("import", [py, "-c", IMPORT_CHECK], 90, {}),  # cwd: a temp dir, so the installed package loads
        ("bench-model-step", [py, os.path.join(HERE, "bench_model_step.py"), "--layouts", "60M", "1B",
                              "--rep", "10", "--kinds", "ours", "ours+graph", "torch AdamW",
                              "--out", RESULTS], 150, {}),
        ("tests-gpu", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests", "-m", "gpu"], 300, require),
        ("tests-ext", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda_ext.py",
                       "tests/test_rsvd.py"], 150, require),
        ("bench-step", [py, os.path.join(HERE, "bench_step.py")] + GOAL, 150, results_env),
        ("bench-rsvd", [py, os.path.join(HERE, "bench_rsvd.py")] + GOAL, 150, results_env),
    ]
    report = []
    for name, cmd, limit, env in stages:
        left = deadline - time.monotonic()
        if left < 5:
            print(f"=== [{name}] skipped: the {args.budget:.0f} s budget is spent", flush=True)
            report.append({"stage": name, "status": "skipped (no time left)", "seconds": 0.0, "log": ""})
            continue
        cwd = tempfile.mkdtemp(prefix="lowrank_import_") if name == "import" else REPO  # away from ./lowrank_kernels
        if name in ("import", "bench-model-step", "bench-step", "bench-rsvd") and use_checkout(py):
            env = {**env, "PYTHONPATH": REPO}  # an in-place build, or nothing installed
        report.append(run_stage(name, cmd, min(limit, left), log_dir, env=env, cwd=cwd))

    failed = [r for r in report if r["status"] != "ok"]
    total = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
    lines = [f"# GPU run ({device_slug()}), {started.strftime('%Y-%m-%d %H:%M UTC')}", "",
             f"- command: python -m bench --gpu (budget {args.budget:.0f} s); total {total:.0f} s",
             f"- python: {sys.version.split()[0]} at {py}", "",
             "| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {r['stage']} | {r['status']} | {r['seconds']} |" for r in report]
    for r in report:
        if r["log"]:
            lines += ["", f"## {r['stage']}: last lines of its log", "", "```", tail(r["log"]).rstrip(), "```"]
    os.makedirs(RESULTS, exist_ok=True)
    summary = os.path.join(RESULTS, f"gpu_run_{device_slug()}_{stamp}.md")
    with open(summary, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines[:6 + len(report) + 2]))
    print(f"summary: {summary}; full logs: {log_dir}")

    out = os.environ.get("OUT")
    if out:  # the device tool fetches whatever lies under $OUT
        copied = os.path.join(out, "bench_results")
        os.makedirs(copied, exist_ok=True)
        since = started.timestamp() - 1
        for f in os.listdir(RESULTS):
            path = os.path.join(RESULTS, f)
            if os.path.isfile(path) and os.path.getmtime(path) >= since:
                shutil.copy2(path, copied)
        shutil.copytree(log_dir, os.path.join(out, "logs"), dirs_exist_ok=True)
        print(f"copied this run's results to {copied} and the logs to {out}/logs")
    print(f"{len(failed)} of {len(report)} stages did not pass" if failed else "every stage passed")
    return min(len(failed), 100)


if __name__ == "__main__":
    sys.exit(main())
