"""A fitted scikit-learn random forest as a Keras layer.

A forest head then saves inside the end-to-end `.keras` model like the dense
and logistic heads, so evaluation and `cifar-predict` need no pickle beside it.
Each tree becomes flat node arrays; prediction walks all trees at once, one
level per step, with gathers.
"""
from __future__ import annotations

import keras
import numpy as np
from keras import layers, ops
from sklearn.ensemble import RandomForestClassifier

# Arrays per node; a leaf points to itself, so extra steps past it change nothing.
_NODE_ARRAYS = ("feature", "threshold", "left", "right")


@keras.saving.register_keras_serializable("cifar_pipeline")
class ForestLayer(layers.Layer):
    """Mean class probabilities of `trees` decision trees over the input features.

    Splits compare in float64, as scikit-learn does, so the layer reproduces the
    forest's `predict_proba` exactly. The node arrays are non-trainable weights;
    the config holds only their shapes, the weights file their values.
    """

    def __init__(self, trees: int, nodes: int, classes: int, depth: int, **kwargs):
        super().__init__(**kwargs)
        self.trees, self.nodes, self.classes, self.depth = trees, nodes, classes, depth

    def build(self, input_shape):
        shape = (self.trees, self.nodes)
        self.feature = self.add_weight(shape=shape, dtype="int32", initializer="zeros", trainable=False,
                                       name="feature")
        self.threshold = self.add_weight(shape=shape, dtype="float64", initializer="zeros", trainable=False,
                                         name="threshold")
        self.left = self.add_weight(shape=shape, dtype="int32", initializer="zeros", trainable=False, name="left")
        self.right = self.add_weight(shape=shape, dtype="int32", initializer="zeros", trainable=False, name="right")
        self.value = self.add_weight(shape=(*shape, self.classes), dtype="float32", initializer="zeros",
                                     trainable=False, name="value")

    def call(self, x):
        x = ops.cast(x, "float64")
        batch = ops.shape(x)[0]
        # Index into the flattened (trees * nodes) arrays: tree t's node n is t * nodes + n.
        offsets = ops.arange(self.trees, dtype="int32") * self.nodes
        flat = {name: ops.reshape(getattr(self, name), (-1,)) for name in _NODE_ARRAYS}
        node = ops.broadcast_to(offsets[None], (batch, self.trees))
        for _ in range(self.depth):
            values = ops.take_along_axis(x, ops.take(flat["feature"], node), axis=1)
            go_left = values <= ops.take(flat["threshold"], node)
            child = ops.where(go_left, ops.take(flat["left"], node), ops.take(flat["right"], node))
            node = child + offsets[None]
        leaf_values = ops.take(ops.reshape(self.value, (-1, self.classes)), node, axis=0)
        return ops.mean(leaf_values, axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.classes)

    def get_config(self):
        return {**super().get_config(), "trees": self.trees, "nodes": self.nodes, "classes": self.classes,
                "depth": self.depth}


def forest_layer(forest: RandomForestClassifier, num_features: int, name: str = "forest") -> ForestLayer:
    """A built ForestLayer holding the trees of a fitted `forest` (classes must be 0..K-1)."""
    if not np.array_equal(forest.classes_, np.arange(len(forest.classes_))):
        raise ValueError("the forest must be fitted on labels 0..K-1 with every class present")
    trees = [estimator.tree_ for estimator in forest.estimators_]
    nodes = max(tree.node_count for tree in trees)
    classes = len(forest.classes_)
    arrays = {"feature": np.zeros((len(trees), nodes), np.int32),
              "threshold": np.zeros((len(trees), nodes), np.float64),
              "left": np.tile(np.arange(nodes, dtype=np.int32), (len(trees), 1)),
              "right": np.tile(np.arange(nodes, dtype=np.int32), (len(trees), 1)),
              "value": np.zeros((len(trees), nodes, classes), np.float32)}
    for t, tree in enumerate(trees):
        n = tree.node_count
        split = tree.children_left >= 0  # leaves have -1 children
        arrays["feature"][t, :n] = np.where(split, tree.feature, 0)
        arrays["threshold"][t, :n] = tree.threshold
        arrays["left"][t, :n] = np.where(split, tree.children_left, np.arange(n))
        arrays["right"][t, :n] = np.where(split, tree.children_right, np.arange(n))
        counts = tree.value[:, 0, :]
        arrays["value"][t, :n] = counts / counts.sum(axis=1, keepdims=True)
    layer = ForestLayer(len(trees), nodes, classes, max(tree.max_depth for tree in trees), name=name)
    layer.build((None, num_features))
    layer.set_weights([arrays[name] for name in (*_NODE_ARRAYS, "value")])
    return layer
