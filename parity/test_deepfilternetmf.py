"""DeepFilterNetMF: every traced layer, the outputs and all gradients against
df.deepfilternetmf, at the default and at non-default configs that switch every option."""

import pytest

from parity.models import MF_LAYER, VARIANTS, model_report

FAMILY = "deepfilternetmf"


@pytest.mark.parametrize("variant", VARIANTS[FAMILY], ids=[v.name for v in VARIANTS[FAMILY]])
@pytest.mark.usefixtures("recurrence_path")
def test_layers_and_outputs(variant):
    report = model_report(FAMILY, variant, grads=False, tol=MF_LAYER)
    print(report.table())
    assert report.passed, report.summary()


@pytest.mark.parametrize("variant", VARIANTS[FAMILY], ids=[v.name for v in VARIANTS[FAMILY]])
@pytest.mark.usefixtures("recurrence_path")
def test_gradients_in_training_mode(variant):
    """df's eval-mode DfNet filters its `spec` input in place, which torch cannot
    differentiate; in training mode it copies first (BatchNorms keep running statistics)."""
    report = model_report(FAMILY, variant, grads=True, grad_inputs=(1, 2), train=True, tol=MF_LAYER)
    print(report.table())
    assert report.passed, report.summary()
