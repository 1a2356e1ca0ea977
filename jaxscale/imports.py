"""Objects named in a config by import path, `package.module:Name` (models, datasets, tasks)."""
from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from jaxscale.errors import ConfigError, first_line


def add_search_path(directory: str) -> None:
  """Appends `directory` to sys.path (once), so a user's files beside a config import by name."""
  directory = os.path.abspath(directory)
  if directory not in sys.path:
    sys.path.append(directory)


def import_object(path: str, key: str) -> Any:
  """The object named by `package.module:Name`; ConfigError naming `key` if it cannot be had."""
  module_name, sep, attribute = path.partition(":")
  if not sep or not module_name or not attribute:
    raise ConfigError(f"config key {key!r}: {path!r} is not an import path 'package.module:Name'")
  try:
    module = importlib.import_module(module_name)
  except Exception as e:  # noqa: BLE001 - any import failure of a user's file
    raise ConfigError(f"config key {key!r}: cannot import {module_name!r} ({first_line(e)}); "
                      f"its directory must be on sys.path (PYTHONPATH, the current directory "
                      f"or the config file's directory)") from None
  obj = module
  for part in attribute.split("."):
    if not hasattr(obj, part):
      raise ConfigError(f"config key {key!r}: module {module_name!r} has no {attribute!r}")
    obj = getattr(obj, part)
  return obj
