"""Model family dispatch by `[train] model`, as `df.model`."""

from importlib import import_module

from loguru import logger

from df_mlx.config import DfParams, config

DEFAULT_MODEL = "deepfilternet3"


def _family_module(name: str):
    try:
        return import_module("df_mlx." + name)
    except ModuleNotFoundError as e:
        if e.name != "df_mlx." + name:
            raise
        raise ValueError(f"Unknown model family `{name}` in [train] model") from None


class ModelParams(DfParams):
    """The `ModelParams` of the family named by `[train] model`; attributes are forwarded."""

    def __init__(self):
        self.__model = config("MODEL", default=DEFAULT_MODEL, section="train")
        self.__params = _family_module(self.__model).ModelParams()

    def __getattr__(self, attr: str):
        return getattr(self.__params, attr)


def init_model(*args, **kwargs):
    """Initialize the model family specified in the config."""
    name = config("MODEL", default=DEFAULT_MODEL, section="train")
    logger.info(f"Initializing model `{name}`")
    return _family_module(name).init_model(*args, **kwargs)
