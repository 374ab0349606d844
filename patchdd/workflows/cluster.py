"""Matrix cells as cluster jobs through submitit (``matrix --launcher submitit``): one job per pending cell (a job
array, as submitit batches them), each cell's job id recorded in its folder (``job.json``) so that a rerun of the
controller neither resubmits a cell whose job is still pending or running nor forgets it, and resubmits the failed
or timed-out ones. ``cluster: local`` runs the same path on this machine (the tests use it); ``debug`` runs the
jobs in the controller's process.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

JOB_FILE = "job.json"
LIVE_SLURM_STATES = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED")


@dataclass
class ExecutorSpec:
    """Where and how submitit runs a matrix's cells.

    Args:
        cluster: ``slurm``, ``local`` (subprocesses on this machine) or ``debug`` (in the controller's process).
        partition: the SLURM partition.
        gpus_per_cell: GPUs of one cell's job (its ``trainer.devices`` is the matrix's ``devices_per_cell``).
        cpus_per_task: CPUs of one cell's job.
        mem_gb: memory of one cell's job.
        timeout_min: wall-clock limit of one cell's job; a job cut by it is resubmitted by the next controller run
            and resumes from the cell's ``last.ckpt``.
        array_parallelism: the most cells of one job array running at once.
        additional_parameters: more ``#SBATCH`` settings, e.g. ``{"account": "proj", "qos": "high"}``.
        folder: where submitit keeps its job files (default: ``OUT/.submitit``).
    """

    cluster: str = "slurm"
    partition: str | None = None
    gpus_per_cell: int = 1
    cpus_per_task: int = 8
    mem_gb: int = 64
    timeout_min: int = 24 * 60
    array_parallelism: int = 64
    additional_parameters: dict = field(default_factory=dict)
    folder: str | None = None


def make_executor(spec: ExecutorSpec, out_dir: Path):
    """A submitit ``AutoExecutor`` with the spec's parameters."""
    import submitit

    if spec.cluster not in ("slurm", "local", "debug"):
        raise ValueError(f"executor.cluster must be slurm, local or debug, got {spec.cluster!r}")
    executor = submitit.AutoExecutor(folder=spec.folder or str(out_dir / ".submitit"), cluster=spec.cluster)
    executor.update_parameters(timeout_min=spec.timeout_min, gpus_per_node=spec.gpus_per_cell,
                               cpus_per_task=spec.cpus_per_task, mem_gb=spec.mem_gb, name="patchdd-cell",
                               slurm_partition=spec.partition, slurm_array_parallelism=spec.array_parallelism,
                               slurm_additional_parameters=spec.additional_parameters or None)
    return executor


def record_job(directory: Path, job_id: str, cluster: str, folder: str) -> None:
    """Write the cell's ``job.json`` (beside, then renamed)."""
    from patchdd.formats.stores import atomic_write_text

    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / JOB_FILE, json.dumps({"job_id": job_id, "cluster": cluster, "folder": folder}))


def recorded_job(directory: Path) -> dict | None:
    try:
        return json.loads((directory / JOB_FILE).read_text())
    except (OSError, ValueError):
        return None


def job_alive(record: dict | None) -> bool:
    """Whether a recorded job is still pending or running (a local job: its process exists; SLURM: its state)."""
    if record is None:
        return False
    if record["cluster"] == "local":
        try:
            os.kill(int(record["job_id"]), 0)
        except (OSError, ValueError):
            return False
        return True
    if record["cluster"] == "slurm":
        import submitit

        return submitit.SlurmJob(record["folder"], record["job_id"]).state in LIVE_SLURM_STATES
    return False


def wait_for(jobs: dict[int, object], adopted: dict[int, dict], poll_seconds: float = 2.0):
    """Yield ``(index, error or None)`` as each cell's job ends: the jobs submitted now (submitit handles) and the
    ones adopted from an earlier controller run (their records)."""
    while jobs or adopted:
        for index, job in list(jobs.items()):
            if job.done():
                del jobs[index]
                try:
                    yield index, job.result()
                except Exception as err:  # a job that died (out of memory, killed, timed out): record, go on
                    yield index, f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:300] if str(err) else ''}"
        for index, record in list(adopted.items()):
            if not job_alive(record):
                del adopted[index]
                yield index, None
        if jobs or adopted:
            time.sleep(poll_seconds)
