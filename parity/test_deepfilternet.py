"""DeepFilterNet (1): every traced layer, the four outputs and all gradients against
df.deepfilternet, at the default and at non-default configs that switch every option."""

import pytest

from parity.models import VARIANTS, model_report

FAMILY = "deepfilternet"


@pytest.mark.parametrize("variant", VARIANTS[FAMILY], ids=[v.name for v in VARIANTS[FAMILY]])
@pytest.mark.usefixtures("recurrence_path")
def test_layers_outputs_and_gradients(variant):
    report = model_report(FAMILY, variant, grads=True)
    print(report.table())
    assert report.passed, report.summary()
