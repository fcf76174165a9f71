"""Makes int8 variants of an ONNX model for bench-optimize, with onnxruntime's own tools.

    python quantize.py MODEL.onnx OUT_DIR

Writes, beside each other in OUT_DIR:
- model.int8-dynamic.onnx: weights int8, activations quantized at run time
  (onnxruntime.quantization.quantize_dynamic; ConvInteger / MatMulInteger / DynamicQuantizeLinear);
- model.int8-qdq.onnx: static QDQ (QuantizeLinear / DequantizeLinear around each op), calibrated
  on a few fixed pseudo-random inputs of the model's input shapes (open sizes at 16, or as given
  with --dims NAME=D1xD2...).

Each variant that onnxruntime cannot make is reported on stderr and skipped; the optimizer then
measures what exists, on both engines, against tract's float baseline.
"""

import argparse
import pathlib
import sys

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static


def input_shapes(model, pinned):
    shapes = {}
    for i in model.graph.input:
        if i.name in pinned:
            shapes[i.name] = pinned[i.name]
            continue
        dims = []
        for axis, d in enumerate(i.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(d.dim_value)
            else:
                dims.append(1 if axis == 0 else 16)
        shapes[i.name] = dims
    return shapes


class Reader(CalibrationDataReader):
    def __init__(self, model, pinned):
        rng = np.random.default_rng(7)
        types = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
        self.batches = []
        for _ in range(8):
            feed = {}
            for name, shape in input_shapes(model, pinned).items():
                if types[name] == onnx.TensorProto.FLOAT:
                    feed[name] = rng.uniform(-1, 1, shape).astype(np.float32)
                else:
                    feed[name] = rng.integers(0, 8, shape).astype(onnx.helper.tensor_dtype_to_np_dtype(types[name]))
            self.batches.append(feed)
        self.at = 0

    def get_next(self):
        if self.at >= len(self.batches):
            return None
        self.at += 1
        return self.batches[self.at - 1]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model", type=pathlib.Path)
    parser.add_argument("out", type=pathlib.Path)
    parser.add_argument("--dims", action="append", default=[], help="NAME=D1xD2x... for an input's calibration shape")
    args = parser.parse_args()
    pinned = {}
    for d in args.dims:
        name, shape = d.split("=", 1)
        pinned[name] = [int(x) for x in shape.split("x")]
    model = onnx.load(str(args.model))
    args.out.mkdir(parents=True, exist_ok=True)
    made = 0
    try:
        quantize_dynamic(str(args.model), str(args.out / "model.int8-dynamic.onnx"), weight_type=QuantType.QInt8)
        made += 1
    except Exception as e:  # onnxruntime raises many kinds; report and go on
        print(f"quantize_dynamic failed on {args.model}: {e}", file=sys.stderr)
    try:
        quantize_static(
            str(args.model),
            str(args.out / "model.int8-qdq.onnx"),
            Reader(model, pinned),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QInt8,
        )
        made += 1
    except Exception as e:
        print(f"quantize_static failed on {args.model}: {e}", file=sys.stderr)
    print(f"{made} variants in {args.out}")


if __name__ == "__main__":
    main()
