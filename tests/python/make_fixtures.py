#!/usr/bin/env python3
"""Makes the ONNX fixtures under tests/fixtures/ (run with the venv's Python: `.venv/bin/python
tests/python/make_fixtures.py`). The files are committed; this script says how they were made.

nested_if.onnx: y = If(sr == 16000, then: If(sum(x) > 0, relu(x), -x), else: concat(x, x)),
with x [?, ?] float (both sizes open, neither numbered nor named) and sr an int64 scalar: like
silero VAD's graph before its Ifs were removed, the branches give different shapes ([N, K] and
[N, 2K]) under a condition known only at run time. tract analyses the file while the sizes are
unknown, so it loads, but fails to analyse it once any input shape is given (`Failed analyse
for node ... "If_0"`), so no request could ever run: the agent must refuse it at load.

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


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "--slow":
        layers = int(sys.argv[3]) if len(sys.argv) > 3 else 6
        onnx.save(slow(layers), sys.argv[2])
        return
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "fixtures")
    os.makedirs(out_dir, exist_ok=True)
    onnx.save(nested_if(), os.path.join(out_dir, "nested_if.onnx"))


if __name__ == "__main__":
    main()
