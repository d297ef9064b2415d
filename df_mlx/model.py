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


# Every `[deepfilternet]` key the upstream families read: attribute -> (key, cast, default).
# Families list the attributes they read, in their reading order (the order keys are written
# to config.ini), overriding defaults where upstream's differ.
DEEPFILTERNET_KEYS = {
    "conv_lookahead": ("CONV_LOOKAHEAD", int, 0),
    "conv_k_enc": ("CONV_K_ENC", int, 2),
    "conv_k_dec": ("CONV_K_DEC", int, 1),
    "conv_ch": ("CONV_CH", int, 16),
    "conv_width_f": ("CONV_WIDTH_FACTOR", int, 1),
    "conv_dec_mode": ("CONV_DEC_MODE", str, "transposed"),
    "conv_depthwise": ("CONV_DEPTHWISE", bool, True),
    "convt_depthwise": ("CONVT_DEPTHWISE", bool, True),
    "conv_kernel": ("CONV_KERNEL", "csv_int", (1, 3)),
    "convt_kernel": ("CONVT_KERNEL", "csv_int", (1, 3)),
    "conv_kernel_inp": ("CONV_KERNEL_INP", "csv_int", (3, 3)),
    "emb_hidden_dim": ("EMB_HIDDEN_DIM", int, 256),
    "emb_num_layers": ("EMB_NUM_LAYERS", int, 2),
    "emb_gru_skip_enc": ("EMB_GRU_SKIP_ENC", str, "none"),
    "emb_gru_skip": ("EMB_GRU_SKIP", str, "none"),
    "df_hidden_dim": ("DF_HIDDEN_DIM", int, 256),
    "df_gru_skip": ("DF_GRU_SKIP", str, "none"),
    "df_output_layer": ("DF_OUTPUT_LAYER", str, "linear"),
    "df_pathway_kernel_size_t": ("DF_PATHWAY_KERNEL_SIZE_T", int, 1),
    "enc_concat": ("ENC_CONCAT", bool, False),
    "df_num_layers": ("DF_NUM_LAYERS", int, 3),
    "df_n_iter": ("DF_N_ITER", int, 1),
    "gru_type": ("GRU_TYPE", str, "grouped"),
    "gru_groups": ("GRU_GROUPS", int, 1),
    "lin_groups": ("LINEAR_GROUPS", int, 1),
    "enc_lin_groups": ("ENC_LINEAR_GROUPS", int, 16),
    "group_shuffle": ("GROUP_SHUFFLE", bool, True),
    "dfop_method": ("DFOP_METHOD", str, "real_unfold"),
    "mask_pf": ("MASK_PF", bool, False),
    "pf_beta": ("PF_BETA", float, 0.02),
    "lsnr_dropout": ("LSNR_DROPOUT", bool, False),
    "mfop_method": ("MFOP_METHOD", str, "WF"),
    "mf_est_inverse": ("MF_ESTIMATE_INVERSE", bool, True),
    "mf_use_cholesky_decomp": ("MF_USE_CHOLESKY_DECOMP", bool, False),
}


def read_model_keys(params, section: str, attrs, **defaults):
    """Set `params.<attr>` from `[section]` for each attribute, in order (see DEEPFILTERNET_KEYS)."""
    from df_mlx.config import Csv

    for attr in attrs:
        key, cast, default = DEEPFILTERNET_KEYS[attr]
        cast = Csv(int) if cast == "csv_int" else cast
        setattr(params, attr, config(key, cast=cast, default=defaults.get(attr, default), section=section))
