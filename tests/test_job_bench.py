"""tools/job_bench.py runs on a CPU with a tiny preset (the H200 row runs the same code)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

TOOLS = Path(__file__).parents[1] / "tools"
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

import job_bench


def test_job_bench_smoke(tmp_path, capsys):
    assert job_bench.main(["--preset", "tiny-opt", "--batch", "4", "--prompts", "10", "--min-len", "3",
                           "--max-len", "30", "--new", "3", "--device", "cpu", "--out", str(tmp_path)]) == 0
    (md,) = tmp_path.glob("*-cpu-jobs.md")
    (js,) = tmp_path.glob("*-cpu-jobs.json")
    rows = json.loads(js.read_text())["rows"]
    assert [r["job"] for r in rows] == ["mixed", "padded"]
    assert all(r["prompts"] == 10 and r["new_tokens"] == 30 for r in rows)
    mixed, padded = rows
    # 3 batches of 4 rows (the last filled with copies), 30 tokens each
    assert (padded["prompt_tokens"], padded["carried_prompt_tokens"]) == (10 * 30, 12 * 30)
    assert mixed["prompt_tokens"] <= mixed["carried_prompt_tokens"] < padded["carried_prompt_tokens"]
    assert "| mixed | 10 | 30 |" in md.read_text()


def test_carried_tokens_counts_sorted_batches():
    assert job_bench.carried_tokens([5, 1, 3, 2], 2) == 2 * 2 + 2 * 5
