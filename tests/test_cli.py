"""The dfmlx command line."""

from click.testing import CliRunner

from df_mlx.cli import main


def test_help_lists_commands():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0 and "parity" in result.output


def test_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and "dfmlx" in result.output


def test_parity_unknown_target_fails():
    result = CliRunner().invoke(main, ["parity", "nonsense"])
    assert result.exit_code == 2 and "nonsense" in result.output


def test_parity_without_reference_is_one_line_error(monkeypatch):
    import parity.reference as reference

    def unavailable():
        raise reference.ReferenceUnavailable("torch is not installed")

    monkeypatch.setattr(reference, "load_reference", unavailable)
    result = CliRunner().invoke(main, ["parity", "dsp"])
    assert result.exit_code == 1
    assert result.output.strip() == "Error: parity reference unavailable: torch is not installed"
