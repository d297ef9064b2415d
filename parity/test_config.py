"""df_mlx.config against upstream df.config: same values, same files, both directions."""

import pytest

from df_mlx.config import Config as MlxConfig
from df_mlx.config import Csv as MlxCsv
from df_mlx.config import DfParams as MlxDfParams
from parity.reference import import_ref

# (option, default, cast name, section): the kinds of query models and training make.
QUERIES = [
    ("SR", 48000, int, "df"),
    ("FFT_SIZE", 960, int, "df"),
    ("NORM_TAU", 1.0, float, "df"),
    ("CONV_LOOKAHEAD", 0, int, "deepfilternet"),
    ("CONV_KERNEL", (1, 3), "csv_int", "deepfilternet"),
    ("EMB_GRU_SKIP", "none", str, "deepfilternet"),
    ("MASK_PF", False, bool, "deepfilternet"),
    ("LSNR_MAX", 35, int, "deepfilternet"),
    ("FACTOR", [1.0, 2.0], "csv_float", "MultiResSpecLoss"),
    ("MODEL", "deepfilternet3", str, "train"),
]

INI = """[df]
sr = 16000
fft_size = 320
hop_size = 160
norm_tau = 0.5

[deepfilternet]
conv_kernel = 2,3
emb_gru_skip = groupedlinear
mask_pf = true
lsnr_max = 30

[multiressspecloss]

[MultiResSpecLoss]
factor = 0.5,3

[train]
model = deepfilternet2
"""


def _cast(name, csv):
    return {"csv_int": csv(int), "csv_float": csv(float)}.get(name, name)


def _query(cfg, csv):
    return [cfg(opt, default=default, cast=_cast(cast, csv), section=sec) for opt, default, cast, sec in QUERIES]


@pytest.fixture
def ref_config():
    return import_ref("config")


def test_defaults_and_written_files_equal(ref_config, tmp_path):
    ref, mine = ref_config.Config(), MlxConfig()
    ref.load(str(tmp_path / "ref.ini"), allow_defaults=True)
    mine.load(str(tmp_path / "mlx.ini"), allow_defaults=True)
    assert _query(mine, MlxCsv) == _query(ref, ref_config.Csv)
    ref.save(str(tmp_path / "ref.ini"))
    mine.save(str(tmp_path / "mlx.ini"))
    assert (tmp_path / "mlx.ini").read_text() == (tmp_path / "ref.ini").read_text()


@pytest.mark.parametrize("writer", ["reference", "mlx"])
def test_files_load_in_the_other(ref_config, tmp_path, writer):
    src = tmp_path / "config.ini"
    src.write_text(INI)
    first = ref_config.Config() if writer == "reference" else MlxConfig()
    first.load(str(src))
    _query(first, ref_config.Csv if writer == "reference" else MlxCsv)
    first.save(str(tmp_path / "written.ini"))
    ref, mine = ref_config.Config(), MlxConfig()
    ref.load(str(tmp_path / "written.ini"))
    mine.load(str(tmp_path / "written.ini"))
    assert _query(mine, MlxCsv) == _query(ref, ref_config.Csv)
    assert mine("SR", cast=int, section="df") == 16000
    assert str(mine) == str(ref)


def test_df_params_equal(ref_config, tmp_path):
    src = tmp_path / "config.ini"
    src.write_text(INI)
    ref_config.config.load(str(src), allow_reload=True)
    from df_mlx.config import config

    config.load(str(src), allow_reload=True)
    try:
        assert vars(MlxDfParams()) == vars(ref_config.DfParams())
    finally:
        ref_config.config.use_defaults(allow_reload=True)
        config.use_defaults(allow_reload=True)


@pytest.mark.parametrize("option", ["NOT_THERE"])
def test_missing_option_without_default_raises_the_same(ref_config, tmp_path, option):
    src = tmp_path / "config.ini"
    src.write_text(INI)
    errors = []
    for cfg in (ref_config.Config(), MlxConfig()):
        cfg.load(str(src))
        with pytest.raises(Exception) as e:
            cfg(option, cast=int, section="df")
        errors.append(type(e.value).__name__)
    assert errors[0] == errors[1]


@pytest.mark.parametrize("family", ["deepfilternet3", "deepfilternet2"])
def test_model_params_keys_defaults_and_order(family, tmp_path):
    """Each family reads the same keys with the same defaults, in the same order, as df: the
    config files both write after building ModelParams are identical."""
    import importlib

    from df_mlx.config import config as mlx_config

    ref_cfg = import_ref("config").config
    for cfg in (ref_cfg, mlx_config):
        cfg.use_defaults(allow_reload=True)
        cfg.set("MODEL", family, str, "train")
    ref_params = vars(import_ref(family).ModelParams())
    mlx_params = vars(importlib.import_module(f"df_mlx.{family}").ModelParams())
    assert mlx_params == ref_params
    ref_cfg.save(str(tmp_path / "ref.ini"))
    mlx_config.save(str(tmp_path / "mlx.ini"))
    assert (tmp_path / "mlx.ini").read_text() == (tmp_path / "ref.ini").read_text()
