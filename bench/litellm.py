"""LiteLLM's proxy as the yardstick: installed into its own virtual environment, forwarding to the fake upstream.

`litellm[proxy]` comes from PyPI into bench/.venv-litellm (gitignored) the first time; it runs offline
(LITELLM_LOCAL_MODEL_COST_MAP=True, no database, no telemetry) on 127.0.0.1 with a master key.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.harness import ROOT, Server, free_port, process

VENV = ROOT / "bench" / ".venv-litellm"
MASTER_KEY = "sk-bench-master"
MODEL = "bench"


def executable() -> Path:
    return VENV / "bin" / "litellm"


def ensure_installed(log: bool = True) -> str | None:
    """Install litellm[proxy] into its venv unless it is there. Returns why it cannot be used, or None."""
    if executable().exists():
        return None
    if log:
        print(f"installing litellm[proxy] into {VENV} (once; a few minutes)…", file=sys.stderr)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, capture_output=True, timeout=300)
        subprocess.run([str(VENV / "bin" / "pip"), "install", "--quiet", "litellm[proxy]"], check=True,
                       capture_output=True, timeout=1200)
    except subprocess.CalledProcessError as exc:
        tail = (exc.stderr or b"").decode(errors="replace").strip().splitlines()[-3:]
        return f"installing litellm[proxy] failed: {' / '.join(tail)}"
    except subprocess.TimeoutExpired:
        return "installing litellm[proxy] took longer than 20 minutes"
    return None if executable().exists() else "litellm[proxy] installed no `litellm` command"


def version() -> str:
    out = subprocess.run([str(VENV / "bin" / "python"), "-c", "import importlib.metadata as m; "
                          "print(m.version('litellm'))"], capture_output=True, text=True, timeout=60)
    return out.stdout.strip() or "?"


def config(upstream: str) -> str:
    return "\n".join([
        "model_list:",
        f"  - model_name: {MODEL}",
        "    litellm_params:",
        f"      model: openai/{MODEL}",
        f"      api_base: {upstream}",
        "      api_key: sk-fake",
        "general_settings:",
        f"  master_key: {MASTER_KEY}",
        "litellm_settings:",
        "  telemetry: false",
        "  drop_params: true",
        "",
    ])


@contextmanager
def litellm_proxy(upstream: str, workers: int = 1) -> Iterator[Server]:
    """LiteLLM's proxy in front of `upstream`, in its own process; yields its base URL (…/v1)."""
    port = free_port()
    with tempfile.TemporaryDirectory() as home:
        path = Path(home) / "litellm.yaml"
        path.write_text(config(upstream))
        env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False",
               "HOME": home, "PYTHONPATH": "", "NO_DOCS": "True", "DISABLE_ADMIN_UI": "True"}
        args = [str(executable()), "--config", str(path), "--host", "127.0.0.1", "--port", str(port),
                "--num_workers", str(workers)]
        with process(args, f"http://127.0.0.1:{port}/health/liveliness", env=env, timeout=180) as proc:
            yield Server(f"http://127.0.0.1:{port}/v1", proc)
