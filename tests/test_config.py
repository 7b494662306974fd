from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from proxy import config
from proxy.config import Settings
from proxy.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
ENV = {"HOME": "/home/u"}


def test_defaults_without_file_or_environment() -> None:
    s = config.load(environ=ENV)
    assert s.port == 8080 and s.host == "127.0.0.1" and s.upstream == "https://api.openai.com/v1"
    assert s.data_dir == "/home/u/.local/share/memory-proxy" and s.db == "/home/u/.local/share/memory-proxy/memory.db"


def test_precedence_file_then_environment_then_flags(tmp_path: Path) -> None:
    file = tmp_path / "c.toml"
    file.write_text('port = 9001\nrecall_k = 7\nupstream = "http://file/v1"\nmin_similarity = 0.5\n')
    env = {**ENV, "MEMORY_PROXY_PORT": "9002", "MEMORY_PROXY_RECALL_K": "8"}
    s = config.load(file, env, {"port": 9003, "upstream": None})
    assert (s.port, s.recall_k, s.upstream, s.min_similarity) == (9003, 8, "http://file/v1", 0.5)


def test_config_path_from_environment(tmp_path: Path) -> None:
    file = tmp_path / "c.toml"
    file.write_text("workers = 3\n")
    assert config.load(environ={**ENV, "MEMORY_PROXY_CONFIG": str(file)}).workers == 3


def test_xdg_data_home_and_explicit_db() -> None:
    s = config.load(environ={**ENV, "XDG_DATA_HOME": "/xdg"})
    assert s.db == "/xdg/memory-proxy/memory.db"
    assert config.load(environ={**ENV, "MEMORY_PROXY_DB": "postgresql://h/db"}).db == "postgresql://h/db"


@pytest.mark.parametrize(("env", "message"), [
    ({"MEMORY_PROXY_PORT": "eighty"}, "must be int"),
    ({"MEMORY_PROXY_PORT": "0"}, "at least 1"),
    ({"MEMORY_PROXY_UPSTREAM": "ftp://x"}, "http:// or https://"),
    ({"MEMORY_PROXY_MIN_SIMILARITY": "2"}, "between -1 and 1"),
    ({"MEMORY_PROXY_LOG_LEVEL": "loud"}, "log_level"),
])
def test_bad_values_are_clear_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config.load(environ={**ENV, **env})


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "missing.toml", ENV)
    (tmp_path / "bad.toml").write_text("port = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(tmp_path / "bad.toml", ENV)
    (tmp_path / "typo.toml").write_text("prot = 1")
    with pytest.raises(ConfigError, match="unknown setting 'prot'"):
        config.load(tmp_path / "typo.toml", ENV)
    (tmp_path / "typo.toml").write_text('extracton = "background"')
    with pytest.raises(ConfigError, match="unknown setting 'extracton'; did you mean 'extraction'"):
        config.load(tmp_path / "typo.toml", ENV)
    (tmp_path / "type.toml").write_text('port = "8080x"')
    with pytest.raises(ConfigError, match="must be int"):
        config.load(tmp_path / "type.toml", ENV)


def test_shipped_config_file_documents_every_setting_with_its_default(tmp_path: Path) -> None:
    shipped = (ROOT / "config" / "memory-proxy.toml").read_text()
    assert shipped == config.render_toml(), "regenerate: python -c 'from proxy.config import render_toml; ...'"
    uncommented = "\n".join(line[2:] for line in shipped.splitlines() if re.match(r"# \w+ = ", line))
    path = tmp_path / "uncommented.toml"
    path.write_text(uncommented)
    loaded = config.load(path, ENV)
    defaults = Settings()
    for f in fields(Settings):
        if f.name not in {"data_dir", "db"}:  # resolved from the environment when empty
            assert getattr(loaded, f.name) == getattr(defaults, f.name), f.name


def test_readme_table_lists_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    assert config.render_markdown_table() in readme, "regenerate the table with proxy.config.render_markdown_table()"
