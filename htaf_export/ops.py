"""Names of the ``htaf`` ONNX domain: the step ops every target reproduces."""

HTAF_DOMAIN = "htaf"
HTAF_OPSET_VERSION = 1
# Heaviside(X, T) → {0, 1}; Sign(X, T) → {−1, +1}; attribute tie: "ge" fires at X = T, "gt" does not.
STEP_OPS = ("Heaviside", "Sign")
