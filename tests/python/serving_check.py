"""Drives a running flotilla-agent with Triton's own Python client (tritonclient[http]).

Run by the Rust end-to-end test `serving::tritonclient_works_unmodified`, which starts the agent,
writes the expected outputs of the shared models (computed by tract in-process) to a cases file,
and checks this script's exit status. Every check prints one line; the first failure raises.

    python serving_check.py --url 127.0.0.1:8000 --repo MODEL_DIR --cases cases.json
"""

import argparse
import json
import pathlib
import sys

import numpy as np
import onnx
import tritonclient.http as httpclient
from onnx import TensorProto, helper, numpy_helper
from tritonclient.utils import InferenceServerException

TOLERANCE = 1e-5

# KServe datatype -> (numpy dtype, ONNX element type)
DTYPES = {
    "BOOL": (np.bool_, TensorProto.BOOL),
    "UINT8": (np.uint8, TensorProto.UINT8),
    "UINT16": (np.uint16, TensorProto.UINT16),
    "UINT32": (np.uint32, TensorProto.UINT32),
    "UINT64": (np.uint64, TensorProto.UINT64),
    "INT8": (np.int8, TensorProto.INT8),
    "INT16": (np.int16, TensorProto.INT16),
    "INT32": (np.int32, TensorProto.INT32),
    "INT64": (np.int64, TensorProto.INT64),
    "FP16": (np.float16, TensorProto.FLOAT16),
    "FP32": (np.float32, TensorProto.FLOAT),
    "FP64": (np.float64, TensorProto.DOUBLE),
}


def check(condition, message):
    if not condition:
        raise AssertionError(message)
    print(f"ok: {message}")


def expect_error(fn, needle, what):
    try:
        fn()
    except InferenceServerException as e:
        check(needle in str(e), f"{what} is refused naming {needle!r} ({e})")
        return
    raise AssertionError(f"{what} was accepted")


def infer(client, model, arrays, output_names, binary):
    inputs = []
    for name, datatype, array in arrays:
        i = httpclient.InferInput(name, list(array.shape), datatype)
        i.set_data_from_numpy(array, binary_data=binary)
        inputs.append(i)
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in output_names]
    return client.infer(model, inputs, outputs=outputs)


def shared_models(client, cases, tolerance=TOLERANCE):
    for case in cases:
        model = case["model"]
        arrays = [
            (i["name"], i["datatype"],
             np.array(i["data"], dtype=DTYPES[i["datatype"]][0]).reshape(i["shape"]))
            for i in case["inputs"]
        ]
        names = [o["name"] for o in case["outputs"]]
        for binary in (True, False):
            result = infer(client, model, arrays, names, binary)
            for o in case["outputs"]:
                got = result.as_numpy(o["name"])
                want = np.array(o["data"], dtype=np.float64).reshape(o["shape"])
                check(list(got.shape) == o["shape"], f"{model} {o['name']} shape {o['shape']} (binary={binary})")
                err = float(np.max(np.abs(got.astype(np.float64) - want))) if want.size else 0.0
                check(err <= tolerance, f"{model} {o['name']} matches tract in-process within {tolerance:g} (max error {err:.2e}, binary={binary})")


def metadata_and_config(client):
    check(client.is_server_live(), "server is live")
    check(client.is_server_ready(), "server is ready")
    server = client.get_server_metadata()
    check("model_repository" in server["extensions"], "server metadata lists its extensions")
    meta = client.get_model_metadata("ocr")
    check(meta["inputs"][0]["name"] == "x" and meta["inputs"][0]["shape"] == [-1, 3, -1, -1],
          f"ocr metadata input x {meta['inputs'][0]}")
    config = client.get_model_config("ocr")
    check(config["max_batch_size"] == 8 and config["input"][0]["data_type"] == "TYPE_FP32",
          "ocr config: max_batch_size 8, TYPE_FP32 input")
    check(config["dynamic_batching"]["max_queue_delay_microseconds"] == 2000, "ocr config carries its batching settings")
    vad = client.get_model_config("vad")
    check(vad["max_batch_size"] == 0 and "scalar" in vad.get("batching_off_reason", ""),
          f"vad runs unbatched with a reason: {vad.get('batching_off_reason')}")
    check(client.is_model_ready("ocr") and client.is_model_ready("ocr", "1"), "ocr is ready (and version 1)")
    index = {m["name"]: m for m in client.get_model_repository_index()}
    check(index["broken"]["state"] == "UNAVAILABLE" and "broken" in index and index["broken"].get("reason"),
          f"a broken model is listed unavailable with its reason: {index['broken'].get('reason', '')[:80]}")
    check(index["ocr"]["state"] == "READY", "the others serve")


def bad_requests(client):
    x = np.zeros((1, 3, 48, 192), dtype=np.float64)
    expect_error(lambda: infer(client, "ocr", [("x", "FP64", x)], [], True), "expected datatype FP32", "FP64 into an FP32 input")
    y = np.zeros((1, 4, 48, 192), dtype=np.float32)
    expect_error(lambda: infer(client, "ocr", [("x", "FP32", y)], [], True), "expected shape", "a wrong channel count")
    expect_error(lambda: infer(client, "ocr", [("nope", "FP32", y)], [], True), "has no input", "an unknown input")
    expect_error(lambda: infer(client, "nosuch", [("x", "FP32", y)], [], True), "unknown model", "an unknown model")
    big = np.zeros((9, 3, 48, 192), dtype=np.float32)
    expect_error(lambda: infer(client, "ocr", [("x", "FP32", big)], [], True), "max_batch_size", "more rows than a batch")


def write_generated_models(repo):
    """A small affine model and one identity per datatype, made here with the onnx package."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    b = rng.standard_normal((3,)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])],
        "affine",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    save(repo / "affine", helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]),
         "max_batch_size = 16\nmax_queue_delay_us = 1000\ninstances = 2\n")

    write_dtypes_model(repo / "dtypes", "")
    return w, b


def write_dtypes_model(directory, config):
    """One Identity per datatype: in_<type> -> out_<type>, each [batch, 2]."""
    nodes, inputs, outputs = [], [], []
    for name, (_, onnx_type) in DTYPES.items():
        lower = name.lower()
        nodes.append(helper.make_node("Identity", [f"in_{lower}"], [f"out_{lower}"]))
        inputs.append(helper.make_tensor_value_info(f"in_{lower}", onnx_type, ["batch", 2]))
        outputs.append(helper.make_tensor_value_info(f"out_{lower}", onnx_type, ["batch", 2]))
    graph = helper.make_graph(nodes, "dtypes", inputs, outputs)
    save(directory, helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), config)


def save(directory, model, config):
    onnx.checker.check_model(model)
    (directory / "1").mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(directory / "1" / "model.onnx"))
    (directory / "config.toml").write_text(config)


def generated_models(client, repo):
    w, b = write_generated_models(repo)
    check(not client.is_model_ready("affine"), "a model written after start is not loaded yet")
    client.load_model("affine")
    client.load_model("dtypes")
    check(client.is_model_ready("affine") and client.is_model_ready("dtypes"), "load through the repository API")
    x = np.arange(12, dtype=np.float32).reshape(3, 4) / 7.0
    for binary in (True, False):
        y = infer(client, "affine", [("x", "FP32", x)], ["y"], binary).as_numpy("y")
        err = float(np.max(np.abs(y - (x @ w + b))))
        check(err <= TOLERANCE, f"affine matches numpy within 1e-5 (max error {err:.2e}, binary={binary})")

    dtype_round_trips(client, "dtypes")

    client.unload_model("affine")
    check(not client.is_model_ready("affine"), "unload through the repository API")
    index = {m["name"]: m for m in client.get_model_repository_index()}
    check(index["affine"]["state"] == "UNAVAILABLE", "the index shows the unloaded model unavailable")
    expect_error(lambda: infer(client, "affine", [("x", "FP32", x)], ["y"], True), "not ready", "inference on an unloaded model")


def dtype_round_trips(client, model):
    """Every datatype's extremes through the identity model, binary and JSON, exactly."""
    samples = {
        "BOOL": [[True, False], [False, True]],
        "UINT8": [[0, 255], [1, 2]],
        "UINT16": [[0, 65535], [3, 4]],
        "UINT32": [[0, 4294967295], [5, 6]],
        "UINT64": [[0, 2**64 - 1], [7, 8]],
        "INT8": [[-128, 127], [-1, 0]],
        "INT16": [[-32768, 32767], [-1, 0]],
        "INT32": [[-2**31, 2**31 - 1], [-1, 0]],
        "INT64": [[-2**63, 2**63 - 1], [-1, 0]],
        "FP16": [[0.5, -2.0], [1024.0, 0.25]],
        "FP32": [[0.5, -2.5], [1e10, 3.25]],
        "FP64": [[0.1, -2.5], [1e300, 3.25]],
    }
    arrays = [(f"in_{n.lower()}", n, np.array(v, dtype=DTYPES[n][0])) for n, v in samples.items()]
    names = [f"out_{n.lower()}" for n in samples]
    for binary in (True, False):
        result = infer(client, model, arrays, names, binary)
        for (_, datatype, array), out in zip(arrays, names):
            got = result.as_numpy(out)
            check(got.dtype == array.dtype and np.array_equal(got, array),
                  f"{model}: {datatype} round-trips exactly (binary={binary})")


def statistics(client):
    stats = client.get_inference_statistics("ocr")["model_stats"][0]
    check(stats["inference_count"] >= 4 and stats["inference_stats"]["success"]["count"] >= 2,
          f"ocr statistics count the work ({stats['inference_count']} inferences)")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--repo", required=True, type=pathlib.Path)
    parser.add_argument("--cases", required=True, type=pathlib.Path)
    args = parser.parse_args()
    client = httpclient.InferenceServerClient(url=args.url, network_timeout=120.0, connection_timeout=10.0)
    metadata_and_config(client)
    shared_models(client, json.loads(args.cases.read_text()))
    bad_requests(client)
    generated_models(client, args.repo)
    statistics(client)
    print("all checks passed")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        sys.exit(1)
