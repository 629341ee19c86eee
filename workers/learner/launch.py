"""One training round in child processes: ``torchrun --standalone --nproc_per_node N``.

The caller (the train job) writes the round to a folder and starts the launcher; it never shares
memory or a database with the ranks::

    write_round(work, groups, …) → work/spec.json + work/groups.jsonl
    LearnerProcess(torchrun_argv(N, spec))        torchrun, its own session (process group)
      every rank: python -m workers.learner.launch work/spec.json
        init_distributed_from_env (gloo on CPU, NCCL on GPUs) → trainer.train(…)
        rank 0: one PROGRESS_MARK line per optimizer step on stdout,
                the adapter (written atomically by the trainer), then work/result.json
        a rank that raises: its traceback in work/error-rank{R}.txt, then exits non-zero
    caller: events() — progress and log lines, read by a thread while the ranks run
            terminate() — TERM to torchrun (it stops its ranks), KILL to whatever outlives grace
            read_result(work/result.json) → the same ``TrainResult`` one process returns

No DB, no settings, no Celery: values in, files out.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.distributed as dist

from workers.learner.data import TrainingGroup, dump_groups_jsonl, load_groups_jsonl
from workers.learner.trainer import (
    TrainerConfig,
    TrainResult,
    init_distributed_from_env,
    on_gpu,
    train,
)

PROGRESS_MARK = "@@tracelearn.progress "
"""Prefix of rank 0's per-step stdout line; the rest of the line is JSON."""
GROUPS_FILE = "groups.jsonl"
RESULT_FILE = "result.json"
ERROR_FILES = "error-rank*.txt"


def max_processes(device: str = "cpu") -> int:
    """How many learner processes this machine can run on ``device`` (``TrainerConfig.device``):
    one per GPU when they train on GPUs, else one per CPU."""
    if on_gpu(device):
        return torch.cuda.device_count()
    return os.cpu_count() or 1


# --- the round, as files ----------------------------------------------------------------------


@dataclass(frozen=True)
class RoundSpec:
    """Everything a rank needs, as plain values (paths as strings)."""

    base_model: str
    out_dir: str
    parent: str | None
    config: dict[str, Any]
    groups_path: str
    result_path: str


def write_round(
    work: Path,
    groups: Sequence[TrainingGroup],
    base_model: str | Path,
    out_dir: str | Path,
    config: TrainerConfig,
    parent: str | Path | None,
) -> Path:
    """Write the round's groups and spec under ``work`` (created); returns the spec's path."""
    work.mkdir(parents=True, exist_ok=True)
    dump_groups_jsonl(groups, work / GROUPS_FILE)
    spec = RoundSpec(
        base_model=str(base_model),
        out_dir=str(out_dir),
        parent=str(parent) if parent is not None else None,
        config=config.to_dict(),
        groups_path=str(work / GROUPS_FILE),
        result_path=str(work / RESULT_FILE),
    )
    path = work / "spec.json"
    path.write_text(json.dumps(asdict(spec)))
    return path


def read_spec(path: str | Path) -> RoundSpec:
    return RoundSpec(**json.loads(Path(path).read_text()))


def torchrun_argv(processes: int, spec_path: str | Path) -> list[str]:
    """The command line of a data-parallel round. ``--standalone`` rendezvouses on a free local
    port, so two rounds on one box do not collide."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={processes}",
        "-m", "workers.learner.launch", str(spec_path),
    ]


def write_result(path: str | Path, result: TrainResult) -> None:
    """The round's outcome, renamed into place so a reader never sees half of it."""
    body = {
        "status": result.status,
        "adapter_path": result.adapter_path,
        "metrics": result.metrics,
        "history": result.history,
        "failure_reason": result.failure_reason,
        "manifest": result.manifest,
    }
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(body))
    os.replace(tmp, path)


def rank_errors(work: Path, lines: int = 12) -> str:
    """What the failed ranks raised, or '': per distinct error the ranks, its exception line, and
    the last ``lines`` of its traceback (every rank often fails the same way: said once)."""
    found = sorted(work.glob(ERROR_FILES), key=lambda p: int(p.stem.removeprefix("error-rank")))
    ranks_of: dict[str, list[str]] = {}
    for path in found:
        tail = "\n".join(path.read_text().rstrip("\n").splitlines()[-lines:])
        ranks_of.setdefault(tail, []).append(path.stem.removeprefix("error-rank"))
    return "\n".join(
        f"rank {', '.join(ranks)}: {tail.splitlines()[-1]}\n{tail}"
        for tail, ranks in ranks_of.items()
    )


def read_result(path: str | Path) -> TrainResult:
    body = json.loads(Path(path).read_text())
    return TrainResult(
        status=body["status"],
        adapter_path=body["adapter_path"],
        metrics=body["metrics"],
        history=body["history"],
        failure_reason=body["failure_reason"],
        manifest=body["manifest"],
    )


# --- the parent's side: the torchrun process --------------------------------------------------


@dataclass(frozen=True)
class Progress:
    step: int
    total: int
    metrics: dict[str, float]


def progress_line(step: int, total: int, metrics: dict[str, float]) -> str:
    return PROGRESS_MARK + json.dumps({"step": step, "total": total, "metrics": metrics})


def parse_line(line: str) -> Progress | str:
    """A rank-0 progress report, or a log line as printed."""
    if line.startswith(PROGRESS_MARK):
        body = json.loads(line[len(PROGRESS_MARK):])
        return Progress(int(body["step"]), int(body["total"]), dict(body["metrics"]))
    return line


class LearnerProcess:
    """torchrun and its ranks, started in a session of their own; their output (stdout and
    stderr together) goes to ``log_path`` and, line by line, to ``events()``.

    Used as a context manager: leaving the block while the ranks still run (the job was handed
    back, its lease lost, an error) terminates them."""

    def __init__(
        self, argv: list[str], log_path: Path, env: dict[str, str] | None = None,
        tail_lines: int = 40,
    ) -> None:
        self.log_path = log_path
        self._events: queue.Queue[Progress | str] = queue.Queue()
        self._tail: deque[str] = deque(maxlen=tail_lines)
        self._popen = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            text=True, bufsize=1, env=env, start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, name="learner-output", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self._popen.pid

    def _read(self) -> None:
        assert self._popen.stdout is not None
        with open(self.log_path, "a") as log:
            for raw in self._popen.stdout:
                line = raw.rstrip("\n")
                log.write(raw)
                log.flush()
                try:
                    event = parse_line(line)
                except (ValueError, KeyError, TypeError):
                    event = line
                if isinstance(event, str):
                    self._tail.append(line)
                self._events.put(event)

    def events(self, timeout: float) -> list[Progress | str]:
        """What the ranks reported since the last call; waits up to ``timeout`` for the first."""
        out: list[Progress | str] = []
        try:
            out.append(self._events.get(timeout=timeout))
            while True:
                out.append(self._events.get_nowait())
        except queue.Empty:
            return out

    def poll(self) -> int | None:
        return self._popen.poll()

    def finish(self, timeout: float = 10.0) -> list[Progress | str]:
        """After exit: wait for the last output lines and return the events not yet taken."""
        self._reader.join(timeout=timeout)
        return self.events(timeout=0)

    def tail(self) -> str:
        """The last lines the ranks printed (a crash's traceback ends here)."""
        return "\n".join(self._tail)

    def terminate(self, grace_s: float = 30.0) -> None:
        """TERM torchrun, which stops its ranks (each in a session of its own); KILL whatever of
        the tree is still alive after ``grace_s``."""
        if self._popen.poll() is not None:
            return
        try:
            tree = [psutil.Process(self.pid), *psutil.Process(self.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGTERM)
        _, alive = psutil.wait_procs(tree, timeout=grace_s)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(alive, timeout=5)
        self._popen.wait(timeout=5)
        self._reader.join(timeout=5)

    def __enter__(self) -> LearnerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.terminate()


# --- the rank's side --------------------------------------------------------------------------


def run_rank(spec_path: str | Path) -> int:
    """One rank of the round: train, and on rank 0 report progress and write the result."""
    spec = read_spec(spec_path)
    config = TrainerConfig.from_dict(spec.config)
    distributed = init_distributed_from_env(config)
    rank = dist.get_rank() if distributed else 0

    def report(step: int, total: int, metrics: dict[str, float]) -> None:
        print(progress_line(step, total, metrics), flush=True)

    try:
        result = train(
            load_groups_jsonl(spec.groups_path), spec.base_model, spec.out_dir,
            config, parent=spec.parent, progress=report,
        )
    finally:
        if distributed:
            dist.destroy_process_group()
    if rank == 0:
        write_result(spec.result_path, result)
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m workers.learner.launch SPEC_JSON", file=sys.stderr)
        return 2
    started = time.perf_counter()
    try:
        code = run_rank(argv[0])
    except Exception:
        # torchrun's own summary names the rank and its exit code, not the error: leave the
        # error where the caller can read it.
        rank = os.environ.get("RANK", "0")
        error_file = Path(argv[0]).parent / f"error-rank{rank}.txt"
        tmp = error_file.with_suffix(".tmp")
        tmp.write_text(traceback.format_exc())
        os.replace(tmp, error_file)
        raise
    print(f"rank {os.environ.get('RANK', '0')} done in {time.perf_counter() - started:.1f} s",
          flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
