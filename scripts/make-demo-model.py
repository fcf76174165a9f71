"""Writes agent/assets/demo.onnx, the model `flotilla up` serves: a 4-feature, 3-class linear
softmax classifier with fixed weights, small enough to embed in the agent binary.

    .venv/bin/python scripts/make-demo-model.py
"""

import pathlib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

W = np.array(
    [[0.8, -0.4, -0.6], [0.3, 0.5, -0.7], [-1.2, 0.2, 1.1], [-0.9, -0.1, 1.3]], dtype=np.float32
)
B = np.array([0.2, 0.1, -0.3], dtype=np.float32)

graph = helper.make_graph(
    [
        helper.make_node("MatMul", ["features", "weights"], ["scores"]),
        helper.make_node("Add", ["scores", "bias"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ],
    "demo_classifier",
    [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 4])],
    [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3])],
    [numpy_helper.from_array(W, "weights"), numpy_helper.from_array(B, "bias")],
)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="flotilla")
model.ir_version = 8
onnx.checker.check_model(model)
out = pathlib.Path(__file__).resolve().parent.parent / "agent" / "assets" / "demo.onnx"
onnx.save(model, str(out))
print(f"wrote {out} ({out.stat().st_size} bytes)")
