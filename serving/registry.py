"""Build the configured engine: import the module of the engine named by ``settings.engine``
(it registers itself in `serving.engine.ENGINES`) and construct it. Only that module is
imported, so a local engine never loads the SGLang or HTTP clients. Knows no engine's
internals."""

from __future__ import annotations

import importlib
from typing import Any

from infra.errors import ConfigError
from infra.settings import ServingSettings
from serving.engine import ENGINES, Engine

# engine name -> the module that registers it (infra.settings.EngineName lists the same names)
ENGINE_MODULES = {"local": "serving.local", "sglang": "serving.sglang", "remote": "serving.remote"}


def create_engine(settings: ServingSettings, **kwargs: Any) -> Engine:
    """The engine named by `settings.engine`, constructed from the serving settings."""
    module = ENGINE_MODULES.get(settings.engine)
    if module is None:
        raise ConfigError(f"serving engine {settings.engine!r} is not one of {sorted(ENGINE_MODULES)} "
                          "(NEXTSTATE_SERVING__ENGINE)")
    importlib.import_module(module)
    return ENGINES[settings.engine](settings, **kwargs)
