"""Build the configured engine: import every engine module (each registers itself in
`serving.engine.ENGINES`) and pick the one named by ``settings.engine``. Knows no engine's
internals."""

from __future__ import annotations

import importlib
from typing import Any

from infra.errors import ConfigError
from infra.settings import ServingSettings
from serving.engine import ENGINES, Engine

ENGINE_MODULES = ("serving.local", "serving.sglang", "serving.remote")


def create_engine(settings: ServingSettings, **kwargs: Any) -> Engine:
    """The engine named by `settings.engine`, constructed from the serving settings."""
    for module in ENGINE_MODULES:
        importlib.import_module(module)
    factory = ENGINES.get(settings.engine)
    if factory is None:
        raise ConfigError(f"serving engine {settings.engine!r} is not one of {sorted(ENGINES)} "
                          "(NEXTSTATE_SERVING__ENGINE)")
    return factory(settings, **kwargs)
