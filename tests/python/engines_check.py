"""Drives a running flotilla-agent whose models run on onnxruntime (and on `auto`) with Triton's
own Python client (tritonclient[http]).

Run by the Rust end-to-end test `engines::onnxruntime_serves_through_tritonclient_like_tract`,
which starts the agent and writes the expected outputs (computed by tract in-process) to a cases
file. Every check prints one line; the first failure raises.

    python engines_check.py --url 127.0.0.1:8000 --repo MODEL_DIR --cases cases.json
"""

import argparse
import json
import pathlib
import sys

import tritonclient.http as httpclient

from serving_check import check, dtype_round_trips, shared_models, write_dtypes_model

# onnxruntime and tract order floating-point sums differently; the engines agree within this.
ENGINE_TOLERANCE = 1e-3


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--repo", required=True, type=pathlib.Path)
    parser.add_argument("--cases", required=True, type=pathlib.Path)
    args = parser.parse_args()
    client = httpclient.InferenceServerClient(url=args.url, network_timeout=120.0, connection_timeout=10.0)

    shared_models(client, json.loads(args.cases.read_text()), tolerance=ENGINE_TOLERANCE)

    text = client.get_model_config("text")
    engine = text["engine"]
    check(text["backend"] == "onnxruntime" and engine["engine"] == "onnxruntime" and engine["provider"] == "CPU",
          f"text runs on onnxruntime's CPU provider ({engine})")
    check("libonnxruntime" in engine["library"], f"its config names the library loaded ({engine['library']})")
    check(client.get_model_metadata("text")["platform"] == "onnxruntime_onnx", "its metadata says onnxruntime_onnx")
    ocr = client.get_model_config("ocr")["engine"]
    check(engine["thread_pool"] == "host" and ocr["thread_pool"] == "host" and engine["threads"] == ocr["threads"] >= 1,
          f"models without threads of their own share the host's pool ({engine['threads']} and {ocr['threads']} threads)")
    own = client.get_model_config("own")["engine"]
    check(own["thread_pool"] == "model" and own["threads"] == 1,
          f"a model that sets intra_op_threads has pools of its own ({own})")

    auto = client.get_model_config("auto")["engine"]
    choice = auto["choice"]
    check(choice["chosen"] == auto["engine"] and "faster" in choice["reason"],
          f"auto chose {choice['chosen']}: {choice['reason']}")
    check(choice["tract_us"] > 0 and choice["onnxruntime_us"] > 0, "auto reports both engines' times")

    write_dtypes_model(args.repo / "dtypes_ort", 'backend = "onnxruntime"\n')
    client.load_model("dtypes_ort")
    dtype_round_trips(client, "dtypes_ort")

    stats = client.get_inference_statistics("text")["model_stats"][0]["inference_stats"]
    counts = {phase: stats[phase]["count"] for phase in ("compute_input", "compute_infer", "compute_output")}
    check(len(set(counts.values())) == 1 and counts["compute_infer"] == stats["success"]["count"],
          f"Triton's compute counts agree with each other and the successes ({counts})")
    print("all checks passed")


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # noqa: BLE001 - any failure is the test's failure
        print(f"FAILED: {e}", file=sys.stderr)
        sys.exit(1)
