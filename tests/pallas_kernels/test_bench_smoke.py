"""pallas_kernels.bench runs end to end (tiny shapes, kernels interpreted on CPU) and its
table holds numbers; its correctness guard marks a wrong kernel and a failing kernel
costs only its cell. Speed is not checked: interpreted kernels say nothing about it."""

from __future__ import annotations

import itertools
import math

import jax.numpy as jnp
import pytest

from pallas_kernels import bench
from pallas_kernels.flash_attention import gpu as flash_gpu
from pallas_kernels.paged_attention import gpu as paged_gpu

COL = {name: i for i, name in enumerate(bench.COLUMNS)}


def _table_rows(report: str) -> dict[str, list[str]]:
    """config -> cells of its table row."""
    rows = {}
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] in ("decode", "prefill"):
            rows[cells[COL["config"]]] = cells
    return rows


def _number(cell: str) -> float:
    return float(cell.split()[0])


def test_smoke_table_has_numbers():
    report, results = bench.run(bench.Options(interpret=True, reps=2))
    rows = _table_rows(report)
    suite = bench.SMOKE
    assert len(rows) == len(suite.decode_batches) * len(suite.decode_contexts) * len(suite.page_sizes) + len(
        suite.prefill
    )
    for config, cells in rows.items():
        columns = ("ours ms", "bundled ms", "xla ms") if cells[0] == "decode" else ("ours ms", "xla ms")
        for column in columns:
            assert _number(cells[COL[column]]) > 0, (config, column, cells)
            assert "!" not in cells[COL[column]], f"{config} {column} failed its check: {cells}"
        assert _number(cells[COL["ours rate"]]) > 0
    for row in results["rows"]:
        for variant in row["variants"]:
            assert variant["error"] is None, variant
            assert variant["rel_err"] is not None and variant["rel_err"] <= bench.REL_ERR_BOUND, variant
    assert report.splitlines()[-1].startswith("| prefill"), "the table must come last"


def test_guard_marks_wrong_kernel_and_survives_failing_one(monkeypatch):
    def wrong(q, *args, **kwargs):  # attention that ignores the keys: plausible, finite, wrong
        return q * 0.5

    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(paged_gpu, "paged_attention", wrong)
    monkeypatch.setattr(flash_gpu, "flash_attention", broken)
    report, _ = bench.run(bench.Options(interpret=True, reps=1))
    for cells in _table_rows(report).values():
        if cells[0] == "decode":
            assert cells[COL["ours ms"]].endswith("!"), cells
            assert cells[COL["speedup"]] == "-", "a failed check must not count as our time"
            assert _number(cells[COL["bundled ms"]]) > 0
        else:
            assert "kernel exploded" in cells[COL["ours ms"]], cells
            assert _number(cells[COL["xla ms"]]) > 0


@pytest.mark.parametrize("S", bench.FULL.page_sizes)
def test_bundled_knobs_are_accepted(S):
    """The bundled kernel asserts these; a bad choice would lose the whole column."""
    for ctx, k_splits in itertools.product(bench.FULL.decode_contexts, (16, 4, 1)):
        mp = ctx // S
        knobs = bench._bundled_knobs(mp, S, k_splits)
        ks, ppcb = knobs["k_splits"], knobs["pages_per_compute_block"]
        assert mp % ks == 0 and (mp // ks) % ppcb == 0, (ctx, S, knobs)


def test_rotation_fits_budget():
    budget = bench.POOL_FRACTION * (80 << 30)
    for B, ctx in itertools.product(bench.FULL.decode_batches, bench.FULL.decode_contexts):
        nbytes = 2 * B * ctx * 8 * 128 * jnp.dtype(jnp.bfloat16).itemsize  # K and V, 8 kv heads of 128
        sets = bench._rotation(nbytes, bench.FULL, budget)
        assert sets * nbytes <= budget
        assert sets >= min(2, math.floor(budget / nbytes)), (B, ctx, sets)


def test_quantized_matmul_bench_runs_and_checks_every_cell(tmp_path):
    """python -m pallas_kernels.bench_quantized_matmul --interpret: a row per projection
    and M with a time in every kernel column, none marked by the reference check (gate/up
    also its gated cells). The Mosaic GPU cells run at one M only (interpreted, each costs
    ~20 s on 2 cores)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    runs = {"triton": ("--rows=1,20", "qkv,down", ("xla bf16", "kernel int8", "kernel fp8")),
            "mosaic": ("--rows=20", "gate_up", ("xla bf16", "mosaic bf16", "mosaic int8", "mosaic fp8"))}
    for kernels, (rows_flag, projections, columns) in runs.items():
        out = tmp_path / f"qmm_{kernels}.json"
        p = subprocess.run([sys.executable, "-m", "pallas_kernels.bench_quantized_matmul", "--interpret", rows_flag,
                            f"--projections={projections}", f"--kernels={kernels}", "--reps=1", f"--out={out}"],
                           cwd=root, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(root)})
        assert p.returncode == 0, p.stderr[-3000:]
        lines = [line for line in p.stdout.splitlines() if line.startswith("| ") and not line.startswith("| proj")]
        assert len(lines) == len(projections.split(",")) * len(rows_flag.split(",")), p.stdout
        assert "!" not in "".join(lines), p.stdout
        rows = json.loads(out.read_text())["rows"]
        assert [r["proj"] for r in rows] == [p for p in projections.split(",") for _ in rows_flag.split(",")]
        for r in rows:
            gated = ("xla gated", "mosaic gated") if kernels == "mosaic" and r["proj"] == "gate_up" else ()
            for name in columns + gated:
                cell = r["cells"][name]
                assert cell["ms"] > 0 and cell["rel_err"] <= bench.REL_ERR_BOUND, (kernels, r["proj"], r["M"], name, cell)


def test_decode_latency_bench_runs_and_says_which_kernel_runs():
    """pallas_kernels.bench_decode_latency (the measurements behind the batch-1 dispatch to
    the Triton kernel) runs end to end interpreted: every cell a number within the
    reference's tolerance, and the "runs" column follows gpu_mosaic.latency_bound."""
    import dataclasses

    from pallas_kernels import bench_decode_latency as bdl

    report, rows = bdl.run(dataclasses.replace(bdl.Options(), interpret=True, **bdl.TINY))
    assert [(r["batch"], r["context"], r["table"]) for r in rows] == [(1, 40, 64), (2, 40, 64)]
    for r in rows:
        assert r["mosaic_us"] > 0 and r["triton_us"] > 0 and all(v > 0 for v in r["triton_by_splits"].values()), r
    assert rows[0]["runs"].startswith("triton") and rows[1]["runs"].startswith("mosaic")
    assert "failed" not in report and " !" not in report, report
    errors = [float(e.split(")")[0]) for e in report.split("(err ")[1:]]
    assert len(errors) == 2 * (2 + len(bdl.TINY["splits"])) and max(errors) <= bench.REL_ERR_BOUND, report
