"""Serving: engines behind one protocol (`serving.engine`), built by `create_engine`."""


def create_engine(settings, **kwargs):
    """The engine named by ``settings.engine`` (a ServingSettings section); see serving.registry."""
    from serving.registry import create_engine as create

    return create(settings, **kwargs)
