"""Benchmark: report encoding speed of the default text encoder on CPU, and a cached re-run (not a test).

With the offline default encoder (all-MiniLM-L6-v2), at each batch size:

* (a) real reports: the first ``--n`` QaTa-COV19 (LViT) training reports, which repeat a lot (the encoder
  encodes each distinct text once);
* (b) distinct reports: ``--n`` distinct texts, all different report texts of the real tables in
  ``shared/reports`` (about 990), topped up with real texts plus a case number if ``--n`` is larger. This is the
  figure of the target (>= 300 distinct reports/s on 2 CPU cores).

Then the cached re-runs: ``build_or_update_cache`` in this process (nothing to encode; target < 1 s) and the
whole console command ``nnUNetv2_textseg_encode -d D`` in a subprocess on a small demo dataset made with
``nnUNetv2_textseg_make_demo``, its cache complete (target < 3 s: process start, imports, reading the reports
and the cache; it must not load the encoder or torch).

Wall time on a shared machine measures the neighbours too, so CPU seconds and the load average are recorded
with every figure. Prints a Markdown table and writes ``benchmarks/results/encode_reports.json``.

    .venv/bin/python benchmarks/encode_reports.py [--n 1000] [--repeats 2] [--batch_sizes 32 64 128]
                                                  [--threads N] [--reports_dir DIR]
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from nnunetv2_textseg.errors import TextSegError  # noqa: E402
from nnunetv2_textseg.harness import SHORT_FOLDERS, CommandRun, nnunet_env, run_command  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "encode_reports.json"
TARGET_RPS = 300.0
TARGET_CACHED_S = 1.0  # build_or_update_cache in-process
TARGET_COMMAND_S = 3.0  # the whole nnUNetv2_textseg_encode command
DEMO_ID = 978


def reports_dir(given: Path | None) -> Path:
    if given is not None:
        return given
    env = os.environ.get("NNUNET_TEXTSEG_SHARED_REPORTS")
    return Path(env) if env else REPO.parent / "shared" / "reports"


def _table_texts(path: Path) -> list[str]:
    import pandas as pd
    if path.suffix == ".xlsx":
        frame = pd.read_excel(path, dtype=str, keep_default_na=False)
    else:
        frame = pd.read_csv(path, sep=None, engine="python", dtype=str, keep_default_na=False)
    column = next((c for c in ("Description", "report", "text", "description") if c in frame), frame.columns[-1])
    return [t.strip() for t in frame[column].astype(str) if t.strip()]


def real_reports(folder: Path, n: int) -> tuple[list[str], str]:
    """The first n QaTa-COV19 (LViT) training reports (repeats included), else templates."""
    path = folder / "qata_cov19_lvit" / "train.csv"
    if path.is_file():
        texts = _table_texts(path)
        return [texts[i % len(texts)] for i in range(n)], str(path)
    sides = ["left lung", "right lung", "all left lung", "lower right lung", "middle lower left lung"]
    counts = ["one infected area", "two infected areas", "three infected areas"]
    kinds = ["Unilateral pulmonary infection", "Bilateral pulmonary infection"]
    return ([f"{kinds[i % 2]}, {counts[(i // 2) % 3]}, {sides[(i // 6) % 5]} and {sides[(i // 30) % 5]}."
             for i in range(n)], "generated templates (real reports not found)")


def distinct_reports(folder: Path, n: int) -> tuple[list[str], str]:
    """n distinct texts: every different report of the real tables (file order), then real texts + a case
    number."""
    seen: dict[str, None] = {}
    files = sorted(p for p in folder.rglob("*") if p.suffix in (".csv", ".xlsx")) if folder.is_dir() else []
    for path in files:
        for t in _table_texts(path):
            seen.setdefault(t, None)
    base = list(seen) or real_reports(folder, n)[0]
    texts = base[:n]
    i = 0
    while len(texts) < n:
        texts.append(f"{base[i % len(base)]} Case {i}.")
        i += 1
    return texts, f"{len(seen)} distinct real reports from {len(files)} tables in {folder}" + \
        (f", {n - min(n, len(seen))} with a case number appended" if n > len(seen) else "")


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        return None


def best_of(fn, repeats: int) -> tuple[float, float]:
    """(wall, process CPU) seconds of the fastest of ``repeats`` runs (warm the encoder up beforehand)."""
    best = (float("inf"), float("inf"))
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        best = min(best, (time.perf_counter() - t, time.process_time() - c))
    return best


def cached_command(tmp: Path, folder: Path, repeats: int, n_train: int, n_test: int) -> dict:
    """Wall seconds of ``nnUNetv2_textseg_encode -d D``: the first run (encodes) and cached re-runs."""
    # the experiment harness's environment: nnU-Net folders under tmp, this interpreter's commands first on PATH,
    # offline text encoders; plus the real report tables the demo's reports are drawn from
    env = nnunet_env(tmp, names=SHORT_FOLDERS)
    env["NNUNET_TEXTSEG_SHARED_REPORTS"] = str(folder)

    def run(cmd: list[str]) -> CommandRun:  # a failure raises CommandError with the output's last lines
        return run_command(cmd, env, capture=True, timeout=1800, echo=False)

    run(["nnUNetv2_textseg_make_demo", "-d", str(DEMO_ID), "--n_train", str(n_train), "--n_test", str(n_test),
         "--size", "32", "--raw", env["nnUNet_raw"]])
    encode = ["nnUNetv2_textseg_encode", "-d", str(DEMO_ID)]
    first_s = run(encode).seconds
    cached = []
    for _ in range(repeats):
        r = run(encode)
        if "(0 report(s) encoded now)" not in r.stdout or "report(s) encoded now)" in r.stdout.replace(
                "(0 report(s) encoded now)", ""):
            raise RuntimeError(f"the re-run encoded something:\n{r.stdout}")
        cached.append(r.seconds)
    return {"command": " ".join(encode), "n_train": n_train, "n_test": n_test,
            "first_run_s": round(first_s, 3), "cached_runs_s": [round(s, 3) for s in cached],
            "cached_best_s": round(min(cached), 3), "cached_median_s": round(statistics.median(cached), 3),
            "meets_target": min(cached) < TARGET_COMMAND_S}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads while encoding (default: the encoder's own choice)")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--reports_dir", type=Path, default=None,
                   help="real report tables (default: $NNUNET_TEXTSEG_SHARED_REPORTS or ../shared/reports)")
    p.add_argument("--command_repeats", type=int, default=5, help="cached runs of nnUNetv2_textseg_encode")
    p.add_argument("--skip_command", action="store_true", help="do not time the console command")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)

    import torch
    import transformers

    from nnunetv2_textseg.cache import build_or_update_cache
    from nnunetv2_textseg.encoders import TextEncoder

    load_before = load_average()
    folder = reports_dir(a.reports_dir)
    real, real_source = real_reports(folder, a.n)
    distinct, distinct_source = distinct_reports(folder, a.n)
    t0 = time.perf_counter()
    encoder = TextEncoder()
    load_s = time.perf_counter() - t0
    takes_threads = "num_threads" in inspect.signature(encoder.encode).parameters
    if a.threads and not takes_threads:  # an older encoder: the process setting
        torch.set_num_threads(a.threads)

    def encode(texts, bs):
        if takes_threads:
            return encoder.encode(texts, batch_size=bs, num_threads=a.threads)
        return encoder.encode(texts, batch_size=bs)

    encode(distinct[:128], 64)  # warm-up
    rows = []
    for name, texts in (("(a) real reports", real), ("(b) distinct reports", distinct)):
        n_distinct = len(set(texts))
        for bs in a.batch_sizes:
            s, cpu = best_of(lambda: encode(texts, bs), a.repeats)
            rows.append({"input": name, "n": len(texts), "distinct": n_distinct, "batch_size": bs,
                         "seconds": round(s, 4), "reports_per_s": round(len(texts) / s, 1),
                         "distinct_per_s": round(n_distinct / s, 1), "cpu_seconds": round(cpu, 4),
                         "distinct_per_cpu_s": round(n_distinct / cpu, 1),
                         "threads_used": {str(k): v for k, v in getattr(encoder, "threads_used", {}).items()},
                         "meets_target": n_distinct / s >= TARGET_RPS})
            print(f"  {name}, batch size {bs}: {n_distinct / s:.0f} distinct reports/s "
                  f"(load {load_average()})", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        reports = {f"case_{i:04d}": t for i, t in enumerate(distinct)}
        path = Path(tmp) / "emb.npz"
        t0 = time.perf_counter()
        _, n_first = build_or_update_cache(reports, path, encoder, batch_size=max(a.batch_sizes), progress=False)
        first_s = time.perf_counter() - t0
        counts = []

        def rerun():
            _, n = build_or_update_cache(reports, path, encoder=None, spec=encoder.spec, progress=False)
            counts.append(n)
        rerun()
        cached_s, _ = best_of(rerun, a.repeats)
        cache_bytes = path.stat().st_size
    assert all(c == 0 for c in counts), counts

    command = None
    if not a.skip_command:
        with tempfile.TemporaryDirectory() as tmp:
            command = cached_command(Path(tmp), folder, a.command_repeats, n_train=40, n_test=10)

    info = {
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads_process": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }
    result = {
        "encoder": {k: v for k, v in encoder.identity().items() if k in ("name_or_path", "pooling", "max_length",
                                                                            "dim")},
        "report_sources": {"real": real_source, "distinct": distinct_source},
        "threads_option": a.threads,
        "encoder_load_s": round(load_s, 3),
        "encode": rows,
        "cache": {"n_reports": len(reports), "first_build_s": round(first_s, 3), "first_build_encoded": n_first,
                  "cached_rerun_s": round(cached_s, 4), "cache_file_bytes": cache_bytes,
                  "meets_target": cached_s < TARGET_CACHED_S},
        "command": command,
        "targets": {"distinct_reports_per_s": TARGET_RPS, "cached_rerun_s": TARGET_CACHED_S,
                    "cached_command_s": TARGET_COMMAND_S},
        "machine": info,
    }

    threads = f"torch threads: {a.threads}" if a.threads else "torch threads: the encoder's choice"
    print(f"\nEncoder {encoder.spec.name_or_path} on CPU ({threads}), {info['affinity_cpus']} usable CPU(s), "
          f"torch {info['torch_version']}\nreports: (a) {real_source}; (b) {distinct_source}\n")
    print("| input | reports | distinct | batch size | seconds | distinct reports/s | distinct/CPU-s | "
          "threads (batches) | >= 300/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---|:---:|")
    for r in rows:
        used = ", ".join(f"{k}: {v}" for k, v in r["threads_used"].items()) or "-"
        print(f"| {r['input']} | {r['n']} | {r['distinct']} | {r['batch_size']} | {r['seconds']:.3f} | "
              f"{r['distinct_per_s']:.0f} | {r['distinct_per_cpu_s']:.0f} | {used} | "
              f"{'yes' if r['meets_target'] else 'no'} |")
    c = result["cache"]
    print(f"\n| cached re-run | reports | seconds | target |\n|---|---:|---:|---|")
    print(f"| build_or_update_cache, in process, 0 encoded | {c['n_reports']} | {c['cached_rerun_s']:.3f} | "
          f"{'met' if c['meets_target'] else 'missed'} (< {TARGET_CACHED_S:g} s) |")
    if command:
        print(f"| `{command['command']}` (whole command, subprocess; best / median of "
              f"{len(command['cached_runs_s'])}) | {command['n_train'] + command['n_test']} | "
              f"{command['cached_best_s']:.2f} / {command['cached_median_s']:.2f} | "
              f"{'met' if command['meets_target'] else 'missed'} (< {TARGET_COMMAND_S:g} s) |")
        print(f"\nFirst run of the command (loads the encoder, encodes): {command['first_run_s']:.2f} s")
    print(f"Encoder load {load_s:.2f} s; first cache build {first_s:.2f} s; cache file {cache_bytes / 1e6:.1f} MB; "
          f"load average before/after {info['load_average_before']} / {info['load_average_after']}")

    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"Wrote {a.out}")
    return result


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except TextSegError as err:  # a failed command (the harness's message: its output's last lines), not a traceback
        sys.exit(f"encode_reports: {err}")
