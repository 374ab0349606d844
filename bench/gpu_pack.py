"""The GPU pack: every throughput figure of the suite in one command, written into BENCHMARKS.md.

    make bench-gpu                        # = python bench/gpu_pack.py (one GPU, under 9 minutes on an H100)
    python bench/gpu_pack.py --tiny --out /tmp/bench.md     # the same pack on the CPU with tiny models (tests)

Runs, each in its own process (a failure or an out-of-memory in one leaves the others' tables), with a time limit on
a GPU (``--tiny`` runs without limits: a slow CPU must not fail a check that the pack runs):

* Stage I end to end (``bench/score_throughput.py``): the naive batch-1 loop, the batched pass eager and with
  ``--compile``, peak GPU memory;
* the FKD student step (``bench/student_throughput.py``): ResNet-18 teacher -> ResNet-18 / ResNet-50 / MobileNet-V2 /
  EfficientNet-B0 / Swin-T / ViT-B students, fed from the on-device set with on-device augmentation and from
  pre-made tensors (the ceiling);
* the generative methods (``bench/generate_throughput.py``): FLOPs per image and images/s of DiT-XL/2 generation and
  inversion, the Minimax / seed-001 fine-tune step, D4M's img2img with SD v1.5's architecture.

The tables replace the pack's section of BENCHMARKS.md (between its two markers), headed by the device and the date,
and are printed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
START, END = "<!-- gpu-pack:start -->", "<!-- gpu-pack:end -->"
# (title, script, arguments on a GPU, arguments with --tiny, time limit in seconds on a GPU)
PARTS = [
    ("Stage I scoring, SD v1.5 architecture (random weights), 256 px, N = 8, DIFT ensemble 8",
     "score_throughput.py", ["--compile", "--images", "1024"], ["--tiny", "--images", "8", "--naive-images", "2"],
     300),
    ("FKD student step, teacher ResNet-18, batch 256, 224 px, bf16", "student_throughput.py", [],
     ["--tiny"], 150),
    ("Generative methods (random weights), bf16: DiT-XL/2 generation and inversion at 256 px, batch 32; the "
     "Minimax / seed-001 fine-tune step; D4M's img2img with SD v1.5's architecture at 512 px",
     "generate_throughput.py", [], ["--tiny"], 150),
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU (checks the pack end to end)")
    parser.add_argument("--out", default=str(BENCH.parent / "BENCHMARKS.md"), help="the file whose section is replaced")
    return parser.parse_args()


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({torch.get_num_threads()} threads)"


def run_part(script: str, arguments: list[str], limit: float | None) -> tuple[str, float]:
    """The Markdown lines (tables, device lines) a bench script printed, or why there are none (``limit``: seconds,
    ``None`` for none)."""
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, str(BENCH / script), *arguments], capture_output=True, text=True,
                              timeout=limit, check=False)
    except subprocess.TimeoutExpired as expired:
        output = expired.stdout.decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        return table_lines(output) + f"\n(stopped at its {limit:.0f} s limit)\n", time.perf_counter() - start
    lines = table_lines(done.stdout)
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
        lines += f"\n(failed with exit status {done.returncode}: {reason})\n"
    return lines, time.perf_counter() - start


def table_lines(output: str) -> str:
    """The lines of a bench's output worth keeping: tables and the lines that say what was measured; runs of kept
    lines that other lines separated stay apart (a blank line between them), so two tables never merge."""
    blocks, block = [], []
    for line in output.splitlines() + [""]:
        if line.startswith(("|", "device:", "Stage I", "DIFT")):
            block.append(line)
        elif block:
            blocks.append("\n".join(block))
            block = []
    return "\n\n".join(blocks) + "\n"


def replace_section(path: Path, section: str) -> None:
    """Put ``section`` between the pack's markers in ``path`` (appended, markers and all, the first time)."""
    text = path.read_text() if path.is_file() else ""
    block = f"{START}\n{section.rstrip()}\n{END}"
    if START in text and END in text:
        text = text[:text.index(START)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + ("\n\n" if text else "") + block + "\n"
    path.write_text(text)


def main() -> None:
    args = parse_args()
    device, date = device_name(), time.strftime("%Y-%m-%d")
    parts = [f"## GPU pack (`make bench-gpu`): {device}, {date}\n",
             "Printed by `bench/gpu_pack.py`" + (" with `--tiny` (tiny models on the CPU: the figures only show that "
                                                 "the pack runs)" if args.tiny else "") + "; every figure below was "
             "measured in that run.\n"]
    for title, script, gpu_arguments, tiny_arguments, limit in PARTS:
        lines, seconds = run_part(script, tiny_arguments if args.tiny else gpu_arguments, None if args.tiny else limit)
        parts.append(f"### {title} (`bench/{script}`, {seconds:.0f} s)\n\n{lines}")
        print(parts[-1], flush=True)
    replace_section(Path(args.out), "\n".join(parts))
    print(f"wrote the pack's section of {args.out}")


if __name__ == "__main__":
    main()
