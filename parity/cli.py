"""`dfmlx parity TARGET`: print the layer-by-layer error table against the reference."""

from typing import Callable, Dict, List

import click

from parity.report import Report


def _dsp_reports() -> List[Report]:
    from parity.dsp import SETTINGS, dsp_report, helpers_report

    return [dsp_report(s) for s in SETTINGS] + [helpers_report()]


def _model_reports(family: str) -> Callable[[], List[Report]]:
    def reports() -> List[Report]:
        from parity.models import family_reports

        return family_reports(family)

    return reports


def _growth_reports() -> List[Report]:
    """Each family at its default config, forward only, at T = 100, 1000 and 6000 frames."""
    from parity.models import VARIANTS, model_report

    return [model_report(family, VARIANTS[family][0], frames=frames, grads=False)
            for family in ("deepfilternet", "deepfilternet2", "deepfilternet3", "deepfilternetmf")
            for frames in (100, 1000, 6000)]


def _fork_growth_reports() -> List[Report]:
    """The DFNet4 fork's Mamba(256) and default DfNet4 at T = 100 to 6000 (needs $DFMLX_FORK_DIR)."""
    from parity.fork_growth import growth_reports

    return growth_reports()


TARGETS: Dict[str, Callable[[], List[Report]]] = {
    "growth": _growth_reports,
    "growth-dfnet4": _fork_growth_reports,
    "dsp": _dsp_reports,
    "dfnet3": _model_reports("deepfilternet3"),
    "dfnet2": _model_reports("deepfilternet2"),
    "dfnet1": _model_reports("deepfilternet"),
    "dfnetmf": _model_reports("deepfilternetmf"),
}


@click.command("parity")
@click.argument("target", type=click.Choice(sorted(TARGETS)), default="dsp")
@click.option("--summary-only", is_flag=True, help="One line per report instead of full tables.")
def parity(target: str, summary_only: bool):
    """Compare df_mlx against the PyTorch reference (upstream `df` or $DF_REFERENCE), layer by
    layer; exit 1 when any layer is past its tolerance."""
    from parity.reference import ReferenceUnavailable, load_reference

    try:
        click.echo(f"reference: {load_reference().describe()}")
    except ReferenceUnavailable as e:
        raise click.ClickException(f"parity reference unavailable: {e}")
    from parity.fork_recorder import ForkUnavailable

    try:
        reports = TARGETS[target]()
    except ForkUnavailable as e:
        raise click.ClickException(f"the DFNet4 fork is unavailable: {e}")
    for report in reports:
        click.echo(report.summary() if summary_only else report.table() + "\n")
    failed = [r for r in reports if not r.passed]
    click.echo(f"{len(reports) - len(failed)}/{len(reports)} reports within tolerance")
    if failed:
        raise SystemExit(1)
