"""An MLServer custom runtime running one ONNX file on onnxruntime, written as an MLServer user
would (MLServer ships no ONNX runtime): an `MLModel` that decodes the request's tensors with
`NumpyCodec`, runs an onnxruntime session and encodes the outputs. `bench-peers` writes the
model-settings.json that points at it and starts `mlserver start`, one server at a time.
"""

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxRuntimeModel(MLModel):
    async def load(self) -> bool:
        path = self.settings.parameters.uri
        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {i.name: NumpyCodec.decode_input(i) for i in payload.inputs}
        results = self.session.run(None, feeds)
        outputs = [NumpyCodec.encode_output(name=n, payload=a) for n, a in zip(self.output_names, results)]
        return InferenceResponse(model_name=self.name, outputs=outputs)
