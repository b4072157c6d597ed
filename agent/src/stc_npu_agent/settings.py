"""Reads the YAML config file; the pure parsing lives in core.config."""

from __future__ import annotations

from pathlib import Path

import yaml

from stc_npu_agent.core.config import Config, ConfigError, parse_config


def load_config(path: str | Path | None) -> Config:
    """The config from ``path`` (None: defaults); ConfigError names the file."""
    if path is None:
        return Config()
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except IsADirectoryError:
        raise ConfigError(f"config {file}: is a directory, expected a YAML file") from None
    except FileNotFoundError:
        raise ConfigError(f"config {file}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"config {file}: cannot read: {error}") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or "not valid YAML"
        raise ConfigError(f"config {file}:{where}: invalid YAML: {problem}") from None
    try:
        return parse_config(document)
    except ConfigError as error:
        raise ConfigError(f"config {file}: {error}") from None
