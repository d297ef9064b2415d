"""df_mlx.libdf and the helpers that wrap it, against the Rust libdf and upstream df."""

import numpy as np
import pytest

import df_mlx.libdf as ours
from parity.dsp import SETTINGS, dsp_report, helpers_report

_widths = ours.erb_band_widths


def _assert_passes(report):
    print(report.table())
    assert report.passed, report.summary()


@pytest.mark.parametrize("setting", SETTINGS, ids=[s.label for s in SETTINGS])
def test_libdf(setting):
    _assert_passes(dsp_report(setting))


def test_helpers():
    _assert_passes(helpers_report())


# Each perturbation below breaks one thing on the MLX side; the report must name it.


def _failures(report):
    return {r.name for r in report.layers if not r.passed}


def _perturb_df_init(monkeypatch, attr, change):
    init = ours.DF.__init__

    def perturbed(self, *args, **kwargs):
        init(self, *args, **kwargs)
        setattr(self, attr, change(getattr(self, attr)))

    monkeypatch.setattr(ours.DF, "__init__", perturbed)


@pytest.mark.parametrize(
    "perturb, expected",
    [
        (lambda mp: mp.setattr(ours, "vorbis_window", lambda n: np.hanning(n).astype(np.float32)),
         {"fft_window", "random/analysis", "real/synthesis"}),
        (lambda mp: _perturb_df_init(mp, "_wnorm", lambda w: w * np.float32(1 + 1e-5)),
         {"random/analysis", "real/analysis"}),
        (lambda mp: mp.setattr(ours, "erb_band_widths", lambda sr, n, b, m: _widths(sr, n, b, m + 1)),
         {"erb_widths"}),
        (lambda mp: mp.setattr(ours, "MEAN_NORM_INIT", (-60.0, -90.5)),
         {"real/erb_norm", "real/features_erb"}),
        (lambda mp: mp.setattr(ours, "UNIT_NORM_INIT", (0.001, 0.0002)),
         {"unit_norm_init", "real/unit_norm", "real/features_spec"}),
        (lambda mp: mp.setattr(ours, "_round_half_away", lambda x: int(np.round(x)) + 1),
         {"erb_widths"}),
    ],
    ids=["window", "wnorm", "erb_widths", "mean_norm_init", "unit_norm_init", "band_rounding"],
)
def test_dsp_report_catches_perturbation(monkeypatch, perturb, expected):
    perturb(monkeypatch)
    failures = _failures(dsp_report(SETTINGS[0]))
    assert expected <= failures, f"missed {expected - failures}"


def test_dsp_report_catches_lost_stream_state(monkeypatch):
    analysis, synthesis = ours.DF.analysis, ours.DF.synthesis
    monkeypatch.setattr(ours.DF, "analysis", lambda self, x, reset=True: analysis(self, x, True))
    monkeypatch.setattr(ours.DF, "synthesis", lambda self, x, reset=True: synthesis(self, x, True))
    failures = _failures(dsp_report(SETTINGS[0]))
    assert {"random/analysis_odd_chunks", "real/synthesis_chunked"} <= failures


def test_dsp_report_catches_wrong_norm_state(monkeypatch):
    erb_norm, unit_norm = ours.erb_norm, ours.unit_norm
    monkeypatch.setattr(ours, "erb_norm", lambda x, a, state=None, **kw: erb_norm(x, a, None, **kw))
    monkeypatch.setattr(ours, "unit_norm", lambda x, a, state=None, **kw: unit_norm(x, a, None, **kw))
    failures = _failures(dsp_report(SETTINGS[0]))
    assert {"real/erb_norm_state_carried", "real/unit_norm_state_carried"} <= failures


def test_helpers_report_catches_wrong_alpha(monkeypatch):
    import df_mlx.utils as utils

    calc = utils._calculate_norm_alpha
    monkeypatch.setattr(utils, "_calculate_norm_alpha", lambda sr, hop_size, tau: calc(sr, hop_size, tau * 1.01))
    failures = _failures(helpers_report())
    assert any(name.startswith("get_norm_alpha") for name in failures)


def test_helpers_report_catches_wrong_erb_fb(monkeypatch):
    import df_mlx.modules as modules

    erb_fb = modules.erb_fb
    monkeypatch.setattr(modules, "erb_fb", lambda w, sr, normalized=True, inverse=False:
                        erb_fb(w, sr, normalized=not normalized, inverse=inverse))
    failures = _failures(helpers_report())
    assert any(name.startswith("erb_fb") for name in failures)


def test_cli_prints_the_dsp_table():
    from click.testing import CliRunner

    from df_mlx.cli import main

    result = CliRunner().invoke(main, ["parity", "dsp"])
    assert result.exit_code == 0, result.output
    assert "random/analysis_odd_chunks" in result.output and "6/6 reports within tolerance" in result.output
