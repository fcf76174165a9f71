//! Bench inputs for any model: a tensor of every input's datatype, and the binary-extension
//! request that carries them.
//!
//! Open sizes: the batch axis takes the rows; the others follow the shared data README (48x192
//! images for rank-4 inputs, 512 samples for rank-2 inputs), else the rows. Values: FP32
//! pseudo-random in [-1, 1); a scalar INT64 is a rate (16000, silero's sample rate); every other
//! datatype gets the agent's trial values (`agent::serving::auto::trial_tensor`: integers in
//! [0, 8), valid as token ids and categories).

use agent::serving::runner::Signature;
use agent::serving::tensor::{DataType, Tensor};

/// The shape of one input for `rows` rows.
fn shape_for(dims: &[i64], rows: usize) -> Vec<usize> {
    dims.iter()
        .enumerate()
        .map(|(axis, d)| match usize::try_from(*d) {
            Ok(d) => d,
            Err(_) if axis == 0 => rows,
            Err(_) if dims.len() == 4 && axis == 2 => 48,
            Err(_) if dims.len() == 4 && axis == 3 => 192,
            Err(_) if dims.len() == 2 => 512,
            Err(_) => rows,
        })
        .collect()
}

/// Inputs of `rows` rows for `signature`, in signature order.
pub fn bench_inputs(signature: &Signature, rows: usize) -> anyhow::Result<Vec<Tensor>> {
    let mut seed = 1u32;
    signature
        .inputs
        .iter()
        .enumerate()
        .map(|(i, io)| {
            let shape = shape_for(&io.dims, rows);
            let n: usize = shape.iter().product();
            let tensor = match io.datatype {
                DataType::F32 => {
                    let bytes = (0..n)
                        .flat_map(|_| {
                            seed ^= seed << 13;
                            seed ^= seed >> 17;
                            seed ^= seed << 5;
                            ((seed % 2000) as f32 / 1000.0 - 1.0).to_le_bytes()
                        })
                        .collect();
                    Tensor::from_bytes(io.datatype, shape, bytes)?
                }
                DataType::I64 if shape.is_empty() => {
                    Tensor::from_bytes(io.datatype, shape, 16_000i64.to_le_bytes().to_vec())?
                }
                _ => agent::serving::auto::trial_tensor(io, shape, i)
                    .map_err(|e| anyhow::anyhow!("input {}: {e}", io.name))?,
            };
            Ok(tensor)
        })
        .collect()
}

/// A binary-extension request for `inputs`, asking for every output in binary: the JSON
/// header's length and the whole body.
pub fn binary_request(signature: &Signature, inputs: &[Tensor]) -> (usize, Vec<u8>) {
    let mut binary = Vec::new();
    let mut header = Vec::new();
    for (io, t) in signature.inputs.iter().zip(inputs) {
        let bytes = t.to_binary();
        header.push(serde_json::json!({
            "name": io.name, "shape": t.shape(), "datatype": t.dtype().name(),
            "parameters": {"binary_data_size": bytes.len()},
        }));
        binary.extend(bytes);
    }
    let outputs: Vec<_> = signature
        .outputs
        .iter()
        .map(|o| serde_json::json!({"name": o.name, "parameters": {"binary_data": true}}))
        .collect();
    let head = serde_json::json!({"inputs": header, "outputs": outputs}).to_string();
    let header_len = head.len();
    let mut bytes = head.into_bytes();
    bytes.extend(binary);
    (header_len, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent::serving::runner::IoSpec;

    #[test]
    fn an_int32_token_input_is_generated() {
        let signature = Signature {
            inputs: vec![IoSpec {
                name: "tokens".into(),
                datatype: DataType::I32,
                dims: vec![-1, 512],
            }],
            outputs: vec![],
            max_batch_size: 8,
            batching_off_reason: None,
        };
        let inputs = bench_inputs(&signature, 3).expect("INT32 inputs are generated");
        assert_eq!((inputs[0].dtype(), inputs[0].shape()), (DataType::I32, &[3, 512][..]));
        let (header_len, body) = binary_request(&signature, &inputs);
        assert_eq!(body.len(), header_len + 3 * 512 * 4);
    }
}
