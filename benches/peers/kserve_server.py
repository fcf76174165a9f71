"""A KServe (Python `kserve` package) model server running one ONNX file on onnxruntime, written
as a KServe user would: a `kserve.Model` whose `predict` runs an onnxruntime session on the
request's tensors and returns v2 outputs. Started by `bench-peers`, one server at a time.

    python kserve_server.py --model_name NAME --model_path FILE.onnx --http_port PORT
"""

import argparse
import uuid

import kserve
import numpy as np
import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer
from kserve.utils.utils import from_np_dtype


class OnnxModel(Model):
    def __init__(self, name, path):
        super().__init__(name)
        self.path = path
        self.session = None
        self.load()

    def load(self):
        self.session = ort.InferenceSession(self.path, providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.ready = True
        return self.ready

    def predict(self, payload: InferRequest, headers=None, response_headers=None):
        feeds = {i.name: i.as_numpy() for i in payload.inputs}
        results = self.session.run(None, feeds)
        outputs = []
        for name, array in zip(self.output_names, results):
            array = np.asarray(array)
            out = InferOutput(name=name, shape=list(array.shape), datatype=from_np_dtype(array.dtype))
            out.set_data_from_numpy(array, binary_data=False)
            outputs.append(out)
        return InferResponse(model_name=self.name, infer_outputs=outputs, response_id=payload.id or str(uuid.uuid4()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(parents=[kserve.model_server.parser])
    parser.add_argument("--model_path", required=True)
    args, _ = parser.parse_known_args()
    ModelServer(http_port=args.http_port, grpc_port=args.grpc_port).start([OnnxModel(args.model_name, args.model_path)])
