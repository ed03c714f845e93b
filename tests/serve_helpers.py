"""A tiny model + hypernetwork saved as directories `hyperlora serve` loads, and a real server subprocess on
127.0.0.1 (a free port) to talk to with the `openai` client."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import urllib.error
import urllib.request

from eval_helpers import tiny_llama, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
MODEL_ID = "tiny"


def write_tiny_dirs(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """(model dir, hypernetwork dir): a random 2-layer Llama with a byte-level ChatML tokenizer, and a q/v
    HyperNetwork with a random B head whose policy encoder is the base model's mean hidden state (no MiniLM)."""
    from hyperlora.hypernets.t2l.hypernet import HyperNetwork
    from hyperlora.hypernets.t2l.text_encoders import PolicyTextEncoder

    tok = tiny_tokenizer()
    model = tiny_llama(tok, seed=seed)
    model.config.max_position_embeddings = 4096  # room for long generations (default rope: no table to resize)
    mdir, hdir = root / "model", root / "hypernet"
    model.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    torch.manual_seed(seed + 1)
    enc = PolicyTextEncoder("base_mean", model, tok, layer=1)
    hn = HyperNetwork.for_model(model, rank=4, target_modules=("q_proj", "v_proj"), latent_dim=6,
                                task_emb_dim=int(enc.dim), task_proj_dim=8, layer_emb_dim=4, module_emb_dim=4,
                                hidden_dim=16)
    with torch.no_grad():
        for p in hn.head_b.values():
            p.normal_(0, 2.0)
    hn.save_pretrained(hdir)
    enc.save(hdir)
    return mdir, hdir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m hyperlora serve ARGS` on a free port; `url` is its /v1 base. Also the load benchmark's launcher
    (benchmarks/bench_serve.py imports it) for hyperlora and for another OpenAI-compatible server.

    command: the program and its leading arguments instead of `python -m hyperlora serve --threads 1 --log-level
    warning` (then `--port PORT` and `args` follow; a server that answers GET /health with 200 when ready, such
    as `vllm serve MODEL`). log: a file for the server's output instead of a pipe (a chatty server would fill
    the pipe, which nothing reads while it runs, and block)."""

    def __init__(self, args: list[str], env: dict | None = None, *, command: list[str] | None = None,
                 log: Path | None = None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = self.base + "/v1"
        self.log = Path(log) if log is not None else None
        head = [sys.executable, "-m", "hyperlora", "serve"] if command is None else list(command)
        own = ["--threads", "1", "--log-level", "warning"] if command is None else []
        cmd = [*head, "--port", str(self.port), *own, *args]
        out = open(self.log, "w") if self.log is not None else subprocess.PIPE
        try:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
                                         stdout=out, stderr=subprocess.STDOUT, text=True)
        finally:
            if self.log is not None:
                out.close()

    def wait_ready(self, timeout: float = 120.0) -> "ServerProcess":
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self._read()[-4000:]}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(self.base + "/health", timeout=1.0) as r:
                    if r.status == 200:
                        return self
            time.sleep(0.2)
        self.stop()
        raise TimeoutError("server did not become ready")

    def sigterm(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def _read(self) -> str:
        if self.log is not None:
            return self.log.read_text(errors="replace") if self.log.exists() else ""
        return self.proc.stdout.read() if self.proc.stdout else ""

    def output(self) -> str:
        return self._read() if self.proc.poll() is not None else ""
