#!/usr/bin/env python3
"""Makes the ONNX fixtures under tests/fixtures/ (run with the venv's Python: `.venv/bin/python
tests/python/make_fixtures.py`). The files are committed; this script says how they were made.

nested_if.onnx: y = If(sr == 16000, then: If(sum(x) > 0, relu(x), -x), else: concat(x, x)),
with x [?, ?] float (both sizes open, neither numbered nor named) and sr an int64 scalar: like
silero VAD's graph before its Ifs were removed, the branches give different shapes ([N, K] and
[N, 2K]) under a condition known only at run time. tract analyses the file while the sizes are
unknown, so it loads, but fails to analyse it once any input shape is given (`Failed analyse
for node ... "If_0"`), so no request could ever run: the agent must refuse it at load.

text_cnn.onnx: a small text classifier with an INT32 input, as real ones are: tokens INT32
[batch, 512] -> OneHot (depth 64) -> Conv1d 64->128 (k 5) -> Relu -> Conv1d 128->128 (k 5) ->
Relu -> max over positions -> Dense 128->64 -> Relu -> Dense 64->4 -> Softmax -> probabilities
FP32 [batch, 4]; about 63 M multiply-adds per row, fixed pseudo-random weights (seed 7). Served
by both tract and onnxruntime, it checks that the engines agree and times them.

`make_fixtures.py --slow OUT.onnx [LAYERS]` writes (not committed: the e2e lifecycle tests make
it in a temp dir) a deliberately slow model: x [1, 64] -> [1, 512] -> an outer product to
[1, 512, 512] -> LAYERS MatMuls with a 512x512 weight and Tanh -> mean over axis 1 -> y [1, 512];
about 0.27 GFLOP per layer.
"""

import os
import sys

import onnx
import onnx.numpy_helper
from onnx import TensorProto, helper


def nested_if():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None])
    sr = helper.make_tensor_value_info("sr", TensorProto.INT64, [])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None])
    out = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, None)

    inner_then = helper.make_graph([helper.make_node("Relu", ["x"], ["t_out"])], "inner_then", [], [out("t_out")])
    inner_else = helper.make_graph([helper.make_node("Neg", ["x"], ["e_out"])], "inner_else", [], [out("e_out")])
    outer_then = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
            helper.make_node("Constant", [], ["zero"], value=helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])),
            helper.make_node("Greater", ["s", "zero"], ["positive"]),
            helper.make_node("If", ["positive"], ["inner_out"], then_branch=inner_then, else_branch=inner_else, name="If_1"),
        ],
        "outer_then",
        [],
        [out("inner_out")],
    )
    outer_else = helper.make_graph(
        [
            helper.make_node("Concat", ["x", "x"], ["doubled"], axis=1),
        ],
        "outer_else",
        [],
        [out("doubled")],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["rate"], value=helper.make_tensor("rate", TensorProto.INT64, [], [16000])),
            helper.make_node("Equal", ["sr", "rate"], ["is16k"]),
            helper.make_node("If", ["is16k"], ["y"], then_branch=outer_then, else_branch=outer_else, name="If_0"),
        ],
        "nested_if",
        [x, sr],
        [y],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="flotilla-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def slow(layers):
    import numpy as np

    rng = np.random.default_rng(7)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 512])
    w0 = (rng.standard_normal((64, 512)) / 8.0).astype(np.float32)
    w = (rng.standard_normal((512, 512)) / np.sqrt(512.0)).astype(np.float32)
    w1 = (rng.standard_normal((1, 512)) / 8.0).astype(np.float32)
    inits = [
        onnx.numpy_helper.from_array(w0, "w0"),
        onnx.numpy_helper.from_array(w1, "w1"),
        onnx.numpy_helper.from_array(w, "w"),
        onnx.numpy_helper.from_array(np.array([1, 512, 1], dtype=np.int64), "column"),
    ]
    # [1, 64] -> [1, 512] -> [1, 512, 1] x [1, 512] (an outer product) -> [1, 512, 512]: every
    # shape is constant, so tract plans it at load.
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["v"]),
        helper.make_node("Reshape", ["v", "column"], ["vc"]),
        helper.make_node("MatMul", ["vc", "w1"], ["h0"]),
    ]
    for i in range(layers):
        nodes.append(helper.make_node("MatMul", [f"h{i}", "w"], [f"m{i}"]))
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [f"h{i + 1}"]))
    nodes.append(helper.make_node("ReduceMean", [f"h{layers}"], ["y"], axes=[1], keepdims=0))
    graph = helper.make_graph(nodes, "slow", [x], [y], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="flotilla-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def text_cnn():
    import numpy as np

    rng = np.random.default_rng(7)
    seq, depth, channels, hidden, classes = 512, 64, 128, 64, 4
    tokens = helper.make_tensor_value_info("tokens", TensorProto.INT32, ["batch", seq])
    probs = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", classes])
    weight = lambda *shape: (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)
    inits = [
        onnx.numpy_helper.from_array(np.array(depth, dtype=np.int32), "depth"),
        onnx.numpy_helper.from_array(np.array([0.0, 1.0], dtype=np.float32), "onehot_values"),
        onnx.numpy_helper.from_array(weight(channels, depth, 5), "conv1_w"),
        onnx.numpy_helper.from_array(np.zeros(channels, dtype=np.float32) + 0.01, "conv1_b"),
        onnx.numpy_helper.from_array(weight(channels, channels, 5), "conv2_w"),
        onnx.numpy_helper.from_array(np.zeros(channels, dtype=np.float32) - 0.01, "conv2_b"),
        onnx.numpy_helper.from_array(weight(hidden, channels), "dense1_w"),
        onnx.numpy_helper.from_array(np.zeros(hidden, dtype=np.float32), "dense1_b"),
        onnx.numpy_helper.from_array(weight(classes, hidden), "dense2_w"),
        onnx.numpy_helper.from_array(np.zeros(classes, dtype=np.float32), "dense2_b"),
    ]
    nodes = [
        helper.make_node("OneHot", ["tokens", "depth", "onehot_values"], ["onehot"], axis=-1),
        helper.make_node("Transpose", ["onehot"], ["channels_first"], perm=[0, 2, 1]),
        helper.make_node("Conv", ["channels_first", "conv1_w", "conv1_b"], ["c1"], pads=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "conv2_w", "conv2_b"], ["c2"], pads=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("ReduceMax", ["r2"], ["pooled"], axes=[2], keepdims=0),
        helper.make_node("Gemm", ["pooled", "dense1_w", "dense1_b"], ["d1"], transB=1),
        helper.make_node("Relu", ["d1"], ["h"]),
        helper.make_node("Gemm", ["h", "dense2_w", "dense2_b"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(nodes, "text_cnn", [tokens], [probs], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="flotilla-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "--slow":
        layers = int(sys.argv[3]) if len(sys.argv) > 3 else 6
        onnx.save(slow(layers), sys.argv[2])
        return
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "fixtures")
    os.makedirs(out_dir, exist_ok=True)
    onnx.save(nested_if(), os.path.join(out_dir, "nested_if.onnx"))
    onnx.save(text_cnn(), os.path.join(out_dir, "text_cnn.onnx"))


if __name__ == "__main__":
    main()
