"""The DCES table of the step-cost benchmark: what a CsKO step holds and spends scales with channel_ratio."""

from lightning_cskl.experiments.step_cost import measure_ratios, ratio_markdown
from lightning_cskl.models import mobilenet_v2, resnet18


def test_the_costs_of_the_trained_centers_scale_with_the_channel_ratio():
    result = measure_ratios("ResNet-18 (nf=8)", lambda: resnet18(10, 3, 8), batch_size=4, ratios=[0.5, 1.0],
                            score_batches=1, seed=0)
    half, whole = result["rows"]
    assert half["centers"] * 2 == whole["centers"]
    assert half["weight_gradient_flops"] * 2 == whole["weight_gradient_flops"] > 0
    assert half["lowest_saved"] * 2 == whole["lowest_saved"] > 0
    for key in ("gradient_bytes", "optimizer_state_bytes", "flops", "saved_activation_bytes"):
        assert getattr(half["cost"], key) < getattr(whole["cost"], key), key  # nothing gets more expensive
    assert "| 0.5 | " in ratio_markdown(result)


def test_depthwise_layers_slice_too():
    result = measure_ratios("MobileNetV2", lambda: mobilenet_v2(10, 3, 0.25), batch_size=2, ratios=[0.5, 1.0],
                            score_batches=1, seed=0)
    half, whole = result["rows"]
    assert half["centers"] * 2 == whole["centers"] and not half["grouped"]
    assert half["lowest_saved"] * 2 == whole["lowest_saved"]
