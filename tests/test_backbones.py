"""Backbones: preprocessing matches keras.applications, extractors take uint8 and save/load."""
import keras
import numpy as np
import pytest

from cifar_pipeline.backbones import BACKBONES, LITE0, ImageNetPreprocessing, build_feature_extractor
from cifar_pipeline.errors import PipelineError

PREPROCESS = {
    "tf": keras.applications.mobilenet_v2.preprocess_input,
    "torch": keras.applications.densenet.preprocess_input,
    "caffe": keras.applications.vgg16.preprocess_input,
}


@pytest.mark.parametrize("mode", sorted(PREPROCESS))
def test_preprocessing_layer_matches_keras_applications(mode):
    x = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(ImageNetPreprocessing(mode)(x), PREPROCESS[mode](x.copy()), rtol=1e-5, atol=1e-4)


def test_each_spec_names_a_keras_application_or_lite0():
    for spec in BACKBONES.values():
        assert spec.constructor == LITE0 or hasattr(keras.applications, spec.constructor)


@pytest.mark.parametrize("backbone", ["mobilenet_v2", LITE0])
def test_extractor_takes_uint8_resizes_in_graph_and_round_trips(tmp_path, backbone):
    extractor = build_feature_extractor(backbone, 48, "none")
    assert not extractor.trainable_weights
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    features = extractor.predict(images, verbose=0)
    assert features.shape == (2, 1280)
    extractor.save(tmp_path / "e.keras")
    np.testing.assert_allclose(keras.models.load_model(tmp_path / "e.keras").predict(images, verbose=0),
                               features, atol=1e-6)


def test_bad_backbone_size_and_weights():
    with pytest.raises(PipelineError, match="image_size = 64 is too small for xception; it needs at least 71"):
        build_feature_extractor("xception", 64, "none")
    with pytest.raises(ValueError, match="unknown backbone 'alexnet'"):
        build_feature_extractor("alexnet", 64, "none")
    with pytest.raises(FileNotFoundError, match="neither 'imagenet', 'none' nor an existing weights file"):
        build_feature_extractor("mobilenet_v2", 64, "/nonexistent/weights.h5")


def test_local_weights_file_is_loaded(tmp_path):
    source = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3), pooling="avg")
    source.save_weights(tmp_path / "mnv2.weights.h5")
    extractor = build_feature_extractor("mobilenet_v2", 32, str(tmp_path / "mnv2.weights.h5"))
    loaded = extractor.get_layer(source.name).get_weights()
    for a, b in zip(loaded, source.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_lite0_imagenet_weights_come_from_the_installed_package_not_the_network(monkeypatch):
    import urllib.request

    def no_network(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(urllib.request, "urlretrieve", no_network)
    with_weights = build_feature_extractor(LITE0, 32, "imagenet")
    random = build_feature_extractor(LITE0, 32, "none")
    stem = [layer for layer in with_weights.layers if layer.name == "efficientnet_lite0"][0].get_layer("conv_stem")
    assert not np.allclose(stem.get_weights()[0], random.get_layer("efficientnet_lite0").get_layer("conv_stem")
                           .get_weights()[0])


def test_mid_level_features_append_the_last_stages_pooled(tmp_path):
    plain = build_feature_extractor(LITE0, 64, "none")
    extractor = build_feature_extractor(LITE0, 64, "none", mid_level=True)
    assert plain.output_shape == (None, 1280)
    assert extractor.output_shape == (None, 2 * 112 + 3 * 192 + 320 + 1280)
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    # Built from the same seed, the last 1280 features are the plain extractor's.
    keras.utils.set_random_seed(0)
    plain = build_feature_extractor(LITE0, 64, "none")
    keras.utils.set_random_seed(0)
    extractor = build_feature_extractor(LITE0, 64, "none", mid_level=True)
    np.testing.assert_allclose(extractor.predict(images, verbose=0)[:, -1280:], plain.predict(images, verbose=0),
                               rtol=1e-5, atol=1e-6)
    extractor.save(tmp_path / "e.keras")
    assert keras.models.load_model(tmp_path / "e.keras").output_shape == (None, 2400)
    with pytest.raises(PipelineError, match="mid_level_features is not available for mobilenet_v2"):
        build_feature_extractor("mobilenet_v2", 64, "none", mid_level=True)


def test_mirrored_train_features_are_the_mirror_images_features_and_only_on_request(training_data, tmp_path):
    from cifar_pipeline.features import MIRRORED_TRAIN, extract, extract_features
    from cifar_pipeline.prepare import load_split

    settings = dict(prepared_dir=training_data / "prepared", extractor_path=tmp_path / "extractor.keras",
                    backbone="mobilenet_v2", image_size=32, weights="none", mid_level_features=False, batch_size=16)
    keras.utils.set_random_seed(0)
    extract_features(features_dir=tmp_path / "plain", mirrored_train=False, **settings)
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == [
        "meta.json", "test.npy", "test_mirrored.npy", "train.npy", "val.npy"]  # the mirrored test: flip TTA
    keras.utils.set_random_seed(0)
    extract_features(features_dir=tmp_path / "features", mirrored_train=True, **settings)
    train = np.load(tmp_path / "features" / "train.npy")
    mirrored = np.load(tmp_path / "features" / f"{MIRRORED_TRAIN}.npy")
    np.testing.assert_array_equal(train, np.load(tmp_path / "plain" / "train.npy"))
    images = load_split(training_data / "prepared", "train").images
    extractor = keras.models.load_model(tmp_path / "extractor.keras")
    scale = np.abs(train).max()  # random-init features are tiny: tolerances relative to them
    np.testing.assert_allclose(mirrored, extract(extractor, images[:, :, ::-1].copy(), 16), atol=1e-4 * scale)
    assert np.abs(mirrored - train).max() > 0.1 * scale
