"""Hand-built Keras + larq equivalents of htaf-export's BNNs, and the bare converters: the TFLite baselines.

Imports TensorFlow, larq and LCE only (no torch, no htaf_export), so that a fresh process running
``bare_lce(keras_bnn_cnn())`` measures exactly what a larq user pays. The models match ours in layers,
shapes and weight counts (random weights; Keras pads a stride-2 "same" conv on one side only, PyTorch on
both: the same cost). larq is imported inside the builders; importing it renames ``tf.keras`` to
"tensorflow.keras", which htaf-export's TFLite converter accepts (it checks where ``tf.keras.Model`` lives),
so larq and the converter may load in either order.
"""

from __future__ import annotations

import contextlib
import io
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@contextlib.contextmanager
def quiet():
    """Silence stdout and file descriptor 2 (TensorFlow's C++ logging bypasses Python's sys.stderr).

    Not ``htaf_export.tflite_file.quiet_stderr``: importing htaf_export loads torch, and this module must
    not, so that a baseline process pays only what a larq user pays."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(io.StringIO()):
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _modules():
    with quiet():
        import larq
        import tensorflow as tf
    return tf.keras, larq


def _bn(keras):
    return keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5)


def _qconv(larq, channels: int, stride: int = 1, binary_input: bool = True, pad: float = 1.0):
    """A binary 3x3 conv as larq users write it: ste_sign on inputs (unless real) and on the kernel."""
    return larq.layers.QuantConv2D(channels, 3, strides=stride, padding="same", pad_values=pad,
                                   input_quantizer="ste_sign" if binary_input else None,
                                   kernel_quantizer="ste_sign", kernel_constraint="weight_clip", use_bias=False)


def keras_bnn_cnn(channels=(32, 64, 64), image: int = 8, classes: int = 10):
    """bnn_cnn by hand: conv1 (real input, zero padding) → BN → [sign → conv (pad +1) → BN] ×2 with a max pool
    after the second → flatten → sign → binary dense → BN. larq writes the dense as QuantDense."""
    keras, larq = _modules()
    x = inp = keras.Input((image, image, 1))
    for i, c in enumerate(channels, start=1):
        x = _bn(keras)(_qconv(larq, c, binary_input=i > 1, pad=0.0 if i == 1 else 1.0)(x))
        if i == 2:
            x = keras.layers.MaxPool2D(2)(x)
    x = keras.layers.Flatten()(x)
    x = larq.layers.QuantDense(classes, input_quantizer="ste_sign", kernel_quantizer="ste_sign",
                               kernel_constraint="weight_clip", use_bias=False)(x)
    return keras.Model(inp, _bn(keras)(x))


def keras_bnn_resnet(widths=(64, 128, 256, 512), blocks=(4, 4, 4, 4), image: int = 32, classes: int = 10):
    """bnn_resnet by hand: stem conv + BN → blocks (sign → binary 3x3 conv → BN, plus a real shortcut: identity
    or average pool + 1x1 conv + BN) → global average pool → dense."""
    keras, larq = _modules()
    x = inp = keras.Input((image, image, 3))
    x = _bn(keras)(keras.layers.Conv2D(widths[0], 3, padding="same", use_bias=False)(x))
    width = widths[0]
    for i, (w, n) in enumerate(zip(widths, blocks)):
        for j in range(n):
            stride = 2 if i > 0 and j == 0 else 1
            y = _bn(keras)(_qconv(larq, w, stride)(x))
            if stride != 1 or width != w:
                s = keras.layers.AveragePooling2D(stride)(x) if stride > 1 else x
                s = _bn(keras)(keras.layers.Conv2D(w, 1, use_bias=False)(s))
            else:
                s = x
            x = keras.layers.Add()([y, s])
            width = w
    x = keras.layers.Dense(classes)(keras.layers.GlobalAveragePooling2D()(x))
    return keras.Model(inp, x)


def bare_lce(model) -> bytes:
    """LCE's own Keras entry point, as a larq user calls it."""
    import larq_compute_engine as lce

    with quiet():
        return bytes(lce.convert_keras_model(model))


def bare_tflite(model) -> bytes:
    """TensorFlow's own converter on the same Keras model (the float baseline)."""
    import tensorflow as tf

    with quiet():
        return bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
