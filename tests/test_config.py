"""df_mlx.config behaviour (the reference comparison lives in parity/test_config.py)."""

import pytest

from df_mlx.config import Config, Csv, DfParams, config
from df_mlx.model import ModelParams


def test_defaults_are_recorded_and_saved(tmp_path):
    cfg = Config()
    cfg.load(str(tmp_path / "c.ini"), allow_defaults=True)
    assert cfg("SR", cast=int, default=48000, section="df") == 48000
    assert cfg("KERNEL", cast=Csv(int), default=(1, 3), section="net") == [1, 3]
    cfg.save(str(tmp_path / "c.ini"))
    again = Config()
    again.load(str(tmp_path / "c.ini"))
    assert again("KERNEL", cast=Csv(int), section="net") == [1, 3]
    assert again("sr", cast=int, section="df") == 48000  # option names are case-insensitive


def test_bool_and_set(tmp_path):
    (tmp_path / "c.ini").write_text("[x]\nflag = true\n")
    cfg = Config()
    cfg.load(str(tmp_path / "c.ini"))
    assert cfg("FLAG", cast=bool, section="x") is True
    cfg.set("FLAG", False, bool, "x")
    assert cfg("FLAG", cast=bool, section="x") is False


def test_missing_file_without_defaults_fails(tmp_path):
    with pytest.raises(Exception):
        Config().load(str(tmp_path / "absent.ini"), config_must_exist=True)


def test_df_params_follow_global_config(tmp_path):
    (tmp_path / "c.ini").write_text("[df]\nsr = 16000\nhop_size = 160\nfft_size = 320\n")
    config.load(str(tmp_path / "c.ini"), allow_reload=True)
    try:
        p = DfParams()
        assert (p.sr, p.hop_size, p.fft_size) == (16000, 160, 320)
    finally:
        config.use_defaults(allow_reload=True)


def test_unknown_model_family_is_an_error(tmp_path):
    (tmp_path / "c.ini").write_text("[train]\nmodel = deepfilternet99\n")
    config.load(str(tmp_path / "c.ini"), allow_reload=True)
    try:
        with pytest.raises(ValueError, match="deepfilternet99"):
            ModelParams()
    finally:
        config.use_defaults(allow_reload=True)
