"""The benchmark pack runs end to end (``make bench-gpu``'s script with ``--tiny``: tiny models on the CPU)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_gpu_pack_runs_every_part_and_replaces_only_its_section(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\nkept before\n\n<!-- gpu-pack:start -->\nold figures\n<!-- gpu-pack:end -->\n\nkept after\n")
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_pack.py"), "--tiny", "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    text = out.read_text()
    assert "kept before" in text and "kept after" in text and "old figures" not in text
    assert text.count("<!-- gpu-pack:start -->") == 1
    for part in ("score_throughput.py", "student_throughput.py", "generate_throughput.py"):
        section = text.split(f"`bench/{part}`")[1].split("###")[0]
        assert "| " in section and "failed" not in section and "limit" not in section, section
    assert "| batched" in text and "| tv:" not in text and "| convnet_d3 -> convnet_d3 |" in text
    assert "| d3hr inversion (to t = 600, CFG 4) |" in text
    assert "| Minimax-style, fifo eviction | 8 |" in text and "| Minimax-style, max_similarity eviction | 8 |" in text
    assert "| d4m img2img (tiny SD" in text
