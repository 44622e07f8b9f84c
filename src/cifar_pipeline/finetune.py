"""Fine-tune the backbone end to end with its converged head, on augmented images.

The head has first trained on cached features (head.py), so fine-tuning starts
from a good classifier instead of pushing a random head's gradients into the
ImageNet weights. Every backbone layer with weights trains (or the top N),
except BatchNormalization: frozen, which in Keras also keeps it in inference
mode, so batches of a hundred CIFAR images never replace the ImageNet
statistics. Training reads the TFRecords like the scratch CNN (online flip and
shift, each epoch a function of the seed alone) and saves a checkpoint after
every epoch, so a killed run resumes where it stopped.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import keras
from keras import layers

from cifar_pipeline import checkpoints, records
from cifar_pipeline.errors import PipelineError
from cifar_pipeline.features import extractor_and_head
from cifar_pipeline.keras_save import save_model
from cifar_pipeline.prepare import load_meta
from cifar_pipeline.saved_models import load_model
from cifar_pipeline.train import compute_policy, fit, learning_rate, make_optimizer

log = logging.getLogger(__name__)

# The output layer stays float32 under any policy (a softmax in 16 bits loses small probabilities).
OUTPUT_LAYER = "probabilities"


def backbone_of(model: keras.Model) -> keras.Model:
    """The backbone inside a transfer model (transfer model -> feature extractor -> backbone)."""
    parts = extractor_and_head(model)
    inner = [layer for layer in parts[0].layers if isinstance(layer, keras.Model)] if parts else []
    if not inner:
        raise PipelineError(f"{model.name} is not a transfer model (feature extractor + head)")
    return inner[0]


def unfreeze(model: keras.Model, count: int | str, depthwise: bool = True) -> list[str]:
    """Make the last `count` ("all": every one) layers with weights of the backbone inside
    `model` trainable and the rest of it frozen; BatchNormalization layers always stay
    frozen, hence in inference mode, and with `depthwise` False so do the depthwise
    convolutions among them. Return the trainable layers' names."""
    backbone = backbone_of(model)
    weighted = [layer for layer in backbone.layers
                if layer.weights and not isinstance(layer, layers.BatchNormalization)]
    count = len(weighted) if count == "all" else count
    if count > len(weighted):
        raise PipelineError(f"finetune.layers = {count}, but the backbone {backbone.name} has "
                            f"{len(weighted)} layers with weights (BatchNormalization not counted)")
    backbone.trainable = True
    for layer in backbone.layers:
        layer.trainable = False
    # A frozen depthwise kernel skips its weight gradient (TensorFlow's depthwise filter
    # backprop, slow on CPUs), while the gradient still flows through it.
    tuned = [layer for layer in weighted[len(weighted) - count:]
             if depthwise or not isinstance(layer, layers.DepthwiseConv2D)]
    for layer in tuned:
        layer.trainable = True
    return [layer.name for layer in tuned]


def with_policy(model: keras.Model, policy: str) -> keras.Model:
    """`model` rebuilt with its float32 layers in the dtype policy `policy` (the output layer
    excepted), same weights. A loaded model keeps the policy it was saved with; train_head
    saves float32, as the head trains on float32 features."""
    if policy == "float32":
        return model

    def rewrite(node):
        if isinstance(node, dict):
            if node.get("class_name") == "DTypePolicy" and node["config"]["name"] == "float32":
                return {**node, "config": {**node["config"], "name": policy}}
            if isinstance(node.get("config"), dict) and node["config"].get("name") == OUTPUT_LAYER:
                return node
            return {key: rewrite(value) for key, value in node.items()}
        if isinstance(node, list):
            return [rewrite(value) for value in node]
        return node

    rebuilt = keras.Model.from_config(rewrite(model.get_config()))
    rebuilt.set_weights(model.get_weights())
    return rebuilt


def finetune(*, head_model_path: Path, records_dir: Path, prepared_dir: Path, model_path: Path, live_dir: Path,
             checkpoint_dir: Path | None, layers: int | str, depthwise: bool, epochs: int, batch_size: int, lr: float,
             warmup_epochs: float, weight_decay: float, label_smoothing: float, online_shift_px: int,
             online_cutout_px: int, fit_on: str, precision: str, seed: int) -> dict:
    """Fine-tune the transfer model saved by train_head on the splits `fit_on` names
    (records.fit_splits), keeping the weights of the best validation epoch (of the last epoch
    when the validation split trains too); save it to `model_path` and return the history.
    AdamW, linear warm-up from lr / 10 then cosine decay to 0; random flip, up to
    `online_shift_px` pixels of shift and a cutout square of side `online_cutout_px` (painted
    with the mean pixel) per image. A run killed after an epoch resumes from `checkpoint_dir`
    when called again with the same arguments and starting model."""
    arguments = dict(locals())  # first, so it holds exactly the arguments
    meta = load_meta(prepared_dir)
    num_classes = len(meta["class_names"])
    policy = compute_policy(precision)
    model = with_policy(load_model(head_model_path), policy)
    head = extractor_and_head(model)
    if head is not None and not head[1].trainable_weights:
        raise PipelineError(f"{head_model_path} has a head without trainable weights (head.kind = random_forest?): "
                            "fine-tuning needs a head trained by gradient descent (head.kind dense or logistic)")
    tuned = unfreeze(model, layers, depthwise)
    log.info(f"finetune: {len(tuned)} backbone layers ({tuned[0]} .. {tuned[-1]}) + head, in {policy}, "
          f"peak lr {lr}, {epochs} epochs")
    splits = records.fit_splits(fit_on)
    train_records = sum(records.fit_shard_sizes(records_dir, splits))
    steps = train_records // batch_size
    if steps == 0:
        raise PipelineError(f"finetune.batch_size = {batch_size} exceeds the {train_records} training records")
    # A checkpoint resumes only from the same starting weights: a new head starts over.
    start = hashlib.sha256(Path(head_model_path).read_bytes()).hexdigest()
    settings = checkpoints.fingerprint(arguments, policy, start, records.read_info(records_dir))
    history = fit(
        model,
        lambda first_epoch: records.training_dataset(records_dir, batch_size, num_classes, seed, "random",
                                                     online_shift_px, online_cutout_px,
                                                     meta["mean"], start_epoch=first_epoch, splits=splits),
        None if "val" in splits else records.eval_dataset(records_dir, "val", max(batch_size, 256), num_classes),
        steps_per_epoch=steps, epochs=epochs,
        optimizer=make_optimizer("adamw", learning_rate("cosine", lr, epochs, steps, warmup_epochs), 0.0,
                                 weight_decay),
        label_smoothing=label_smoothing, schedule="cosine", patience=epochs, live_dir=live_dir,
        images_per_epoch=steps * batch_size, checkpoint_dir=checkpoint_dir, fingerprint=settings)
    save_model(model, model_path)
    checkpoints.remove(checkpoint_dir)
    return history
