"""DeepFilterNet3: every traced layer, the four outputs and all gradients against
df.deepfilternet3, at the default and at non-default configs that switch every option."""

import pytest

from parity.models import VARIANTS, model_report

FAMILY = "deepfilternet3"


@pytest.mark.parametrize("variant", VARIANTS[FAMILY], ids=[v.name for v in VARIANTS[FAMILY]])
@pytest.mark.usefixtures("recurrence_path")
def test_layers_outputs_and_gradients(variant):
    report = model_report(FAMILY, variant, grads=True)
    print(report.table())
    assert report.passed, report.summary()


def test_perturbed_layer_is_named_first(monkeypatch):
    """A slightly wrong weight deep in the ERB decoder must be reported as the first divergence."""
    import df_mlx.deepfilternet3 as dfn3

    init = dfn3.init_model

    def perturbed(*args, **kwargs):
        model = init(*args, **kwargs)
        original = model.load_weights

        def load_then_perturb(weights, strict=True):
            out = original(weights, strict=strict)
            conv = model.erb_dec.convt2["1"]
            conv.weight = conv.weight * 1.001
            return out

        model.load_weights = load_then_perturb
        return model

    monkeypatch.setattr(dfn3, "init_model", perturbed)
    report = model_report(FAMILY, VARIANTS[FAMILY][0], grads=False)
    assert not report.passed
    assert report.first_failure.name.startswith("erb_dec"), report.summary()
    assert not any(r.name.startswith("enc") and not r.passed for r in report.layers)
