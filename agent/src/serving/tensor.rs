//! Tensors as the serving path carries them: KServe v2 datatypes, row-major little-endian bytes,
//! and the conversions to and from JSON, the binary tensor extension and tract.
//!
//! A [`Tensor`] keeps fixed-size elements as one byte vector in little-endian order (what the
//! binary extension sends and what tract stores on x86 and ARM), so batching is concatenating
//! byte ranges and splitting outputs is slicing them. `BYTES` elements are kept as a list of
//! byte strings.

use serde_json::Value;
use tract_onnx::prelude::{DatumType, Tensor as TractTensor, f16, tract_ndarray};

/// A KServe v2 datatype.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataType {
    /// `BOOL`, one byte per element, 0 or 1.
    Bool,
    /// `UINT8`.
    U8,
    /// `UINT16`.
    U16,
    /// `UINT32`.
    U32,
    /// `UINT64`.
    U64,
    /// `INT8`.
    I8,
    /// `INT16`.
    I16,
    /// `INT32`.
    I32,
    /// `INT64`.
    I64,
    /// `FP16`.
    F16,
    /// `FP32`.
    F32,
    /// `FP64`.
    F64,
    /// `BYTES`: variable-length byte strings.
    Bytes,
}

impl DataType {
    /// Every datatype, for error messages and tests.
    pub const ALL: [Self; 13] = [
        Self::Bool,
        Self::U8,
        Self::U16,
        Self::U32,
        Self::U64,
        Self::I8,
        Self::I16,
        Self::I32,
        Self::I64,
        Self::F16,
        Self::F32,
        Self::F64,
        Self::Bytes,
    ];

    /// The protocol name (`FP32`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Bool => "BOOL",
            Self::U8 => "UINT8",
            Self::U16 => "UINT16",
            Self::U32 => "UINT32",
            Self::U64 => "UINT64",
            Self::I8 => "INT8",
            Self::I16 => "INT16",
            Self::I32 => "INT32",
            Self::I64 => "INT64",
            Self::F16 => "FP16",
            Self::F32 => "FP32",
            Self::F64 => "FP64",
            Self::Bytes => "BYTES",
        }
    }

    /// Parses a protocol name.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.name() == name)
    }

    /// Triton's model-config spelling (`TYPE_FP32`; `TYPE_STRING` for BYTES).
    pub fn triton_config_name(self) -> String {
        match self {
            Self::Bytes => "TYPE_STRING".to_owned(),
            other => format!("TYPE_{}", other.name()),
        }
    }

    /// Bytes per element; `None` for BYTES.
    pub fn size(self) -> Option<usize> {
        Some(match self {
            Self::Bool | Self::U8 | Self::I8 => 1,
            Self::U16 | Self::I16 | Self::F16 => 2,
            Self::U32 | Self::I32 | Self::F32 => 4,
            Self::U64 | Self::I64 | Self::F64 => 8,
            Self::Bytes => return None,
        })
    }

    /// The tract datum type.
    pub fn to_tract(self) -> DatumType {
        match self {
            Self::Bool => DatumType::Bool,
            Self::U8 => DatumType::U8,
            Self::U16 => DatumType::U16,
            Self::U32 => DatumType::U32,
            Self::U64 => DatumType::U64,
            Self::I8 => DatumType::I8,
            Self::I16 => DatumType::I16,
            Self::I32 => DatumType::I32,
            Self::I64 => DatumType::I64,
            Self::F16 => DatumType::F16,
            Self::F32 => DatumType::F32,
            Self::F64 => DatumType::F64,
            Self::Bytes => DatumType::String,
        }
    }

    /// The KServe datatype for a tract datum type, if the protocol has one.
    pub fn from_tract(dt: DatumType) -> Option<Self> {
        Some(match dt {
            DatumType::Bool => Self::Bool,
            DatumType::U8 => Self::U8,
            DatumType::U16 => Self::U16,
            DatumType::U32 => Self::U32,
            DatumType::U64 => Self::U64,
            DatumType::I8 => Self::I8,
            DatumType::I16 => Self::I16,
            DatumType::I32 => Self::I32,
            DatumType::I64 => Self::I64,
            DatumType::F16 => Self::F16,
            DatumType::F32 => Self::F32,
            DatumType::F64 => Self::F64,
            DatumType::String => Self::Bytes,
            _ => return None,
        })
    }
}

impl std::fmt::Display for DataType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Element storage.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    /// Fixed-size elements, little-endian, row-major.
    Fixed(Vec<u8>),
    /// BYTES elements.
    Strings(Vec<Vec<u8>>),
}

/// A named-less tensor: datatype, shape and elements, consistent by construction.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    dtype: DataType,
    shape: Vec<usize>,
    payload: Payload,
}

/// Why tensor data could not be read. The message names what was wrong; the caller adds the
/// input's name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TensorError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, TensorError> {
    Err(TensorError(msg.into()))
}

/// Element count of a shape, refusing overflow.
pub fn element_count(shape: &[usize]) -> Result<usize, TensorError> {
    shape.iter().try_fold(1usize, |n, d| n.checked_mul(*d)).map_or_else(
        || err(format!("shape {shape:?} has more elements than this machine can address")),
        Ok,
    )
}

/// Bytes of `n` elements of `size` bytes, refusing overflow.
pub fn byte_count(shape: &[usize], n: usize, size: usize) -> Result<usize, TensorError> {
    n.checked_mul(size).map_or_else(
        || err(format!("shape {shape:?} of {size}-byte elements has more bytes than this machine can address")),
        Ok,
    )
}

impl Tensor {
    /// A tensor from elements already in storage form, checking they fill `shape` exactly.
    pub fn from_payload(
        dtype: DataType,
        shape: Vec<usize>,
        payload: Payload,
    ) -> Result<Self, TensorError> {
        let n = element_count(&shape)?;
        match (payload, dtype.size()) {
            (Payload::Fixed(bytes), Some(size)) => {
                let want = byte_count(&shape, n, size)?;
                if bytes.len() != want {
                    return err(format!(
                        "{} elements do not fill shape {shape:?} ({n} elements)",
                        bytes.len() / size
                    ));
                }
                if dtype == DataType::Bool && bytes.iter().any(|b| *b > 1) {
                    return err("BOOL data must be bytes 0 or 1");
                }
                Ok(Self { dtype, shape, payload: Payload::Fixed(bytes) })
            }
            (Payload::Strings(strings), None) => {
                if strings.len() != n {
                    return err(format!(
                        "{} elements do not fill shape {shape:?} ({n} elements)",
                        strings.len()
                    ));
                }
                Ok(Self { dtype, shape, payload: Payload::Strings(strings) })
            }
            _ => err(format!("{dtype} elements in the wrong storage")),
        }
    }

    /// A tensor of fixed-size elements from little-endian bytes.
    pub fn from_bytes(
        dtype: DataType,
        shape: Vec<usize>,
        bytes: Vec<u8>,
    ) -> Result<Self, TensorError> {
        let n = element_count(&shape)?;
        let Some(size) = dtype.size() else {
            return Self::from_bytes_elements(shape, &bytes);
        };
        let want = byte_count(&shape, n, size)?;
        if bytes.len() != want {
            return err(format!(
                "{} bytes of {dtype} data do not fill shape {shape:?} ({n} elements of {size} bytes = {want} bytes)",
                bytes.len(),
            ));
        }
        if dtype == DataType::Bool && bytes.iter().any(|b| *b > 1) {
            return err("BOOL data must be bytes 0 or 1");
        }
        Ok(Self { dtype, shape, payload: Payload::Fixed(bytes) })
    }

    /// A BYTES tensor from the binary extension's encoding: each element a 4-byte
    /// little-endian length followed by that many bytes.
    fn from_bytes_elements(shape: Vec<usize>, mut raw: &[u8]) -> Result<Self, TensorError> {
        let n = element_count(&shape)?;
        let mut out = Vec::with_capacity(n.min(raw.len() / 4 + 1));
        while !raw.is_empty() {
            if raw.len() < 4 {
                return err("BYTES data ends inside an element's 4-byte length");
            }
            let len = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]) as usize;
            raw = &raw[4..];
            if raw.len() < len {
                return err(format!(
                    "BYTES element {} claims {len} bytes but only {} remain",
                    out.len(),
                    raw.len()
                ));
            }
            out.push(raw[..len].to_vec());
            raw = &raw[len..];
        }
        if out.len() != n {
            return err(format!(
                "{} BYTES elements do not fill shape {shape:?} ({n} elements)",
                out.len()
            ));
        }
        Ok(Self { dtype: DataType::Bytes, shape, payload: Payload::Strings(out) })
    }

    /// Reads the `data` member of a JSON input: flat or nested arrays in row-major order.
    pub fn from_json(
        dtype: DataType,
        shape: Vec<usize>,
        data: &Value,
    ) -> Result<Self, TensorError> {
        let n = element_count(&shape)?;
        let mut flat = Vec::with_capacity(n.min(1 << 20));
        flatten_json(data, &mut flat, 0)?;
        if flat.len() != n {
            return err(format!(
                "{} elements do not fill shape {shape:?} ({n} elements)",
                flat.len()
            ));
        }
        if dtype == DataType::Bytes {
            let mut strings = Vec::with_capacity(n);
            for v in flat {
                match v {
                    Value::String(s) => strings.push(s.clone().into_bytes()),
                    other => return err(format!("BYTES elements must be strings, got {other}")),
                }
            }
            return Ok(Self { dtype, shape, payload: Payload::Strings(strings) });
        }
        let size = dtype.size().unwrap_or(1);
        let mut bytes = Vec::with_capacity(byte_count(&shape, n, size)?);
        for (i, v) in flat.into_iter().enumerate() {
            encode_json_element(dtype, v, &mut bytes)
                .map_err(|TensorError(m)| TensorError(format!("element {i}: {m}")))?;
        }
        Ok(Self { dtype, shape, payload: Payload::Fixed(bytes) })
    }

    /// The datatype.
    pub fn dtype(&self) -> DataType {
        self.dtype
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Bytes the elements take (BYTES: each string plus its 4-byte length).
    pub fn byte_len(&self) -> usize {
        match &self.payload {
            Payload::Fixed(b) => b.len(),
            Payload::Strings(s) => s.iter().map(|e| e.len().saturating_add(4)).sum(),
        }
    }

    /// The elements.
    pub fn payload(&self) -> &Payload {
        &self.payload
    }

    /// The binary extension's encoding of the elements.
    pub fn to_binary(&self) -> Vec<u8> {
        match &self.payload {
            Payload::Fixed(b) => b.clone(),
            Payload::Strings(s) => {
                let mut out = Vec::with_capacity(s.iter().map(|e| e.len() + 4).sum());
                for e in s {
                    out.extend_from_slice(
                        &u32::try_from(e.len()).unwrap_or(u32::MAX).to_le_bytes(),
                    );
                    out.extend_from_slice(e);
                }
                out
            }
        }
    }

    /// The elements as a flat JSON array.
    pub fn to_json(&self) -> Value {
        let mut out = Vec::new();
        self.write_json_data(&mut out);
        serde_json::from_slice(&out).unwrap_or(Value::Null)
    }

    /// Appends the elements to `out` as a flat JSON array, with no intermediate tree: integers
    /// and booleans as they are, floats in their shortest exact form (non-finite ones as
    /// `null`, which JSON has no other way to say), strings escaped (invalid UTF-8 replaced).
    pub fn write_json_data(&self, out: &mut Vec<u8>) {
        out.push(b'[');
        match &self.payload {
            Payload::Strings(s) => {
                for (i, e) in s.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    write_json_string(out, &String::from_utf8_lossy(e));
                }
            }
            Payload::Fixed(b) => {
                let size = self.dtype.size().unwrap_or(1);
                for (i, c) in b.chunks_exact(size).enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    write_json_element(out, self.dtype, c);
                }
            }
        }
        out.push(b']');
    }

    /// Rows along axis 0 (1 for a scalar).
    pub fn rows(&self) -> usize {
        self.shape.first().copied().unwrap_or(1)
    }

    /// Joins tensors along axis 0. All must share datatype and trailing dims.
    pub fn concat_rows(parts: &[&Self]) -> Result<Self, TensorError> {
        let Some(first) = parts.first() else { return err("nothing to concatenate") };
        if first.shape.is_empty() {
            return err("scalars cannot be batched");
        }
        let mut rows = 0;
        for p in parts {
            if p.dtype != first.dtype || p.shape.get(1..) != first.shape.get(1..) {
                return err(format!(
                    "cannot batch {} {:?} with {} {:?}",
                    first.dtype, first.shape, p.dtype, p.shape
                ));
            }
            rows = usize::checked_add(rows, p.rows())
                .map_or_else(|| err("batch rows overflow"), Ok)?;
        }
        let mut shape = first.shape.clone();
        shape[0] = rows;
        let payload = match &first.payload {
            Payload::Fixed(_) => {
                let mut out = Vec::new();
                for p in parts {
                    if let Payload::Fixed(b) = &p.payload {
                        out.extend_from_slice(b);
                    }
                }
                Payload::Fixed(out)
            }
            Payload::Strings(_) => {
                let mut out = Vec::new();
                for p in parts {
                    if let Payload::Strings(s) = &p.payload {
                        out.extend(s.iter().cloned());
                    }
                }
                Payload::Strings(out)
            }
        };
        Ok(Self { dtype: first.dtype, shape, payload })
    }

    /// Rows `start..start + count` along axis 0.
    pub fn slice_rows(&self, start: usize, count: usize) -> Result<Self, TensorError> {
        let end = start.checked_add(count).filter(|end| *end <= self.rows());
        let Some(end) = end.filter(|_| !self.shape.is_empty()) else {
            return err(format!(
                "rows {start}..{} are outside shape {:?}",
                start.saturating_add(count),
                self.shape
            ));
        };
        let per_row = element_count(&self.shape[1..])?;
        let mut shape = self.shape.clone();
        shape[0] = count;
        let range = |unit: usize| -> Option<std::ops::Range<usize>> {
            Some(start.checked_mul(unit)?..end.checked_mul(unit)?)
        };
        let outside = || TensorError(format!("rows {start}..{end} are outside the data"));
        let payload = match &self.payload {
            Payload::Fixed(b) => {
                let unit = self.dtype.size().unwrap_or(1).saturating_mul(per_row);
                let r = range(unit).ok_or_else(outside)?;
                Payload::Fixed(b.get(r).ok_or_else(outside)?.to_vec())
            }
            Payload::Strings(s) => {
                let r = range(per_row).ok_or_else(outside)?;
                Payload::Strings(s.get(r).ok_or_else(outside)?.to_vec())
            }
        };
        Ok(Self { dtype: self.dtype, shape, payload })
    }

    /// Converts to a tract tensor.
    pub fn to_tract(&self) -> Result<TractTensor, TensorError> {
        match &self.payload {
            Payload::Fixed(b) => {
                let mut t = TractTensor::zero_dt(self.dtype.to_tract(), &self.shape)
                    .map_err(|e| TensorError(format!("allocating tensor: {e}")))?;
                t.as_bytes_mut().copy_from_slice(b);
                Ok(t)
            }
            Payload::Strings(s) => {
                let strings: Vec<String> =
                    s.iter().map(|e| String::from_utf8_lossy(e).into_owned()).collect();
                let array = tract_ndarray::ArrayD::from_shape_vec(self.shape.clone(), strings)
                    .map_err(|e| TensorError(format!("shaping BYTES tensor: {e}")))?;
                Ok(TractTensor::from(array))
            }
        }
    }

    /// Converts from a tract tensor.
    pub fn from_tract(t: &TractTensor) -> Result<Self, TensorError> {
        let Some(dtype) = DataType::from_tract(t.datum_type()) else {
            return err(format!("tract type {:?} has no KServe datatype", t.datum_type()));
        };
        let shape = t.shape().to_vec();
        if dtype == DataType::Bytes {
            let view = t.try_as_plain_ram().map_err(|e| TensorError(e.to_string()))?;
            let s = view.as_slice::<String>().map_err(|e| TensorError(e.to_string()))?;
            let strings = s.iter().map(|e| e.as_bytes().to_vec()).collect();
            return Ok(Self { dtype, shape, payload: Payload::Strings(strings) });
        }
        Ok(Self { dtype, shape, payload: Payload::Fixed(t.as_bytes().to_vec()) })
    }

    /// Values as `f64` (fixed-size types only), for comparisons in tests and tools.
    pub fn to_f64(&self) -> Vec<f64> {
        match &self.payload {
            Payload::Strings(_) => Vec::new(),
            Payload::Fixed(b) => {
                let size = self.dtype.size().unwrap_or(1);
                b.chunks_exact(size).map(|c| element_f64(self.dtype, c)).collect()
            }
        }
    }
}

fn flatten_json<'a>(
    v: &'a Value,
    out: &mut Vec<&'a Value>,
    depth: usize,
) -> Result<(), TensorError> {
    if depth > 32 {
        return err("data is nested more than 32 levels deep");
    }
    match v {
        Value::Array(items) => {
            for item in items {
                flatten_json(item, out, depth + 1)?;
            }
            Ok(())
        }
        other => {
            out.push(other);
            Ok(())
        }
    }
}

fn encode_json_element(dtype: DataType, v: &Value, out: &mut Vec<u8>) -> Result<(), TensorError> {
    fn int(v: &Value) -> Result<i128, TensorError> {
        if let Some(i) = v.as_i64() {
            return Ok(i128::from(i));
        }
        if let Some(u) = v.as_u64() {
            return Ok(i128::from(u));
        }
        err(format!("expected an integer, got {v}"))
    }
    fn ranged<T: TryFrom<i128>>(v: &Value, dtype: DataType) -> Result<T, TensorError> {
        let i = int(v)?;
        T::try_from(i).map_or_else(|_| err(format!("{i} is out of range for {dtype}")), Ok)
    }
    fn float(v: &Value) -> Result<f64, TensorError> {
        match v {
            Value::Number(n) => n.as_f64().map_or_else(|| err("number out of range"), Ok),
            Value::String(s) if s == "NaN" => Ok(f64::NAN),
            Value::String(s) if s == "Infinity" || s == "inf" => Ok(f64::INFINITY),
            Value::String(s) if s == "-Infinity" || s == "-inf" => Ok(f64::NEG_INFINITY),
            other => err(format!("expected a number, got {other}")),
        }
    }
    match dtype {
        DataType::Bool => match v {
            Value::Bool(b) => out.push(u8::from(*b)),
            other => return err(format!("expected true or false, got {other}")),
        },
        DataType::U8 => out.extend(ranged::<u8>(v, dtype)?.to_le_bytes()),
        DataType::U16 => out.extend(ranged::<u16>(v, dtype)?.to_le_bytes()),
        DataType::U32 => out.extend(ranged::<u32>(v, dtype)?.to_le_bytes()),
        DataType::U64 => out.extend(ranged::<u64>(v, dtype)?.to_le_bytes()),
        DataType::I8 => out.extend(ranged::<i8>(v, dtype)?.to_le_bytes()),
        DataType::I16 => out.extend(ranged::<i16>(v, dtype)?.to_le_bytes()),
        DataType::I32 => out.extend(ranged::<i32>(v, dtype)?.to_le_bytes()),
        DataType::I64 => out.extend(ranged::<i64>(v, dtype)?.to_le_bytes()),
        DataType::F16 => out.extend(f16::from_f64(float(v)?).to_le_bytes()),
        #[allow(clippy::cast_possible_truncation)] // FP32 input is rounded to FP32 by definition
        DataType::F32 => out.extend((float(v)? as f32).to_le_bytes()),
        DataType::F64 => out.extend(float(v)?.to_le_bytes()),
        DataType::Bytes => return err("BYTES elements are not numbers"),
    }
    Ok(())
}

/// The first `N` bytes of an element (its size was checked when the tensor was built).
fn arr<const N: usize>(c: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&c[..N]);
    a
}

/// One little-endian element of a fixed-size `dtype` as `f64` (64-bit integers may round).
#[allow(clippy::cast_precision_loss)]
fn element_f64(dtype: DataType, c: &[u8]) -> f64 {
    match dtype {
        DataType::Bool => f64::from(u8::from(c[0] != 0)),
        DataType::U8 => f64::from(c[0]),
        DataType::U16 => f64::from(u16::from_le_bytes(arr(c))),
        DataType::U32 => f64::from(u32::from_le_bytes(arr(c))),
        DataType::U64 => u64::from_le_bytes(arr(c)) as f64,
        DataType::I8 => f64::from(i8::from_le_bytes(arr(c))),
        DataType::I16 => f64::from(i16::from_le_bytes(arr(c))),
        DataType::I32 => f64::from(i32::from_le_bytes(arr(c))),
        DataType::I64 => i64::from_le_bytes(arr(c)) as f64,
        DataType::F16 => f16::from_le_bytes(arr(c)).to_f64(),
        DataType::F32 => f64::from(f32::from_le_bytes(arr(c))),
        DataType::F64 => f64::from_le_bytes(arr(c)),
        DataType::Bytes => f64::NAN,
    }
}

/// Appends `text` as a JSON string literal.
pub fn write_json_string(out: &mut Vec<u8>, text: &str) {
    // Writing a `str` into a `Vec` cannot fail.
    let _ = serde_json::to_writer(&mut *out, text);
}

/// Appends one little-endian element of a fixed-size `dtype` as a JSON value.
fn write_json_element(out: &mut Vec<u8>, dtype: DataType, c: &[u8]) {
    fn int(out: &mut Vec<u8>, v: impl std::fmt::Display) {
        use std::io::Write as _;
        let _ = write!(out, "{v}");
    }
    fn float<F: serde::Serialize>(out: &mut Vec<u8>, v: F, finite: bool) {
        if finite {
            let _ = serde_json::to_writer(&mut *out, &v);
        } else {
            out.extend_from_slice(b"null");
        }
    }
    match dtype {
        DataType::Bool => out.extend_from_slice(if c[0] != 0 { b"true" } else { b"false" }),
        DataType::U8 => int(out, c[0]),
        DataType::U16 => int(out, u16::from_le_bytes(arr(c))),
        DataType::U32 => int(out, u32::from_le_bytes(arr(c))),
        DataType::U64 => int(out, u64::from_le_bytes(arr(c))),
        DataType::I8 => int(out, i8::from_le_bytes(arr(c))),
        DataType::I16 => int(out, i16::from_le_bytes(arr(c))),
        DataType::I32 => int(out, i32::from_le_bytes(arr(c))),
        DataType::I64 => int(out, i64::from_le_bytes(arr(c))),
        DataType::F16 => {
            let v = f16::from_le_bytes(arr(c)).to_f32();
            float(out, v, v.is_finite());
        }
        DataType::F32 => {
            let v = f32::from_le_bytes(arr(c));
            float(out, v, v.is_finite());
        }
        DataType::F64 => {
            let v = f64::from_le_bytes(arr(c));
            float(out, v, v.is_finite());
        }
        DataType::Bytes => out.extend_from_slice(b"null"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_fixed_datatype_round_trips_through_json_binary_and_tract() {
        let cases = [
            (DataType::Bool, json!([true, false, true, true])),
            (DataType::U8, json!([0, 1, 254, 255])),
            (DataType::U16, json!([0, 1, 65534, 65535])),
            (DataType::U32, json!([0, 1, 7, 4_294_967_295u64])),
            (DataType::U64, json!([0, 1, 7, u64::MAX])),
            (DataType::I8, json!([-128, -1, 0, 127])),
            (DataType::I16, json!([-32768, -1, 0, 32767])),
            (DataType::I32, json!([-2_147_483_648i64, -1, 0, 2_147_483_647])),
            (DataType::I64, json!([i64::MIN, -1, 0, i64::MAX])),
            (DataType::F16, json!([0.5, -2.0, 1024.0, 0.25])),
            (DataType::F32, json!([0.5, -2.5, 1e10, 3.25])),
            (DataType::F64, json!([0.1, -2.5, 1e300, 3.25])),
        ];
        for (dtype, data) in cases {
            let rows = json!([[data[0], data[1]], [data[2], data[3]]]);
            let t = Tensor::from_json(dtype, vec![2, 2], &rows)
                .unwrap_or_else(|e| panic!("{dtype}: {e}"));
            assert_eq!(t.to_json(), data, "{dtype}");
            let binary = Tensor::from_bytes(dtype, vec![2, 2], t.to_binary()).expect("binary");
            assert_eq!(binary, t, "{dtype}");
            let tract = Tensor::from_tract(&t.to_tract().expect("to tract")).expect("back");
            assert_eq!(tract, t, "{dtype}");
        }
    }

    #[test]
    fn bytes_round_trip() {
        let t = Tensor::from_json(DataType::Bytes, vec![3], &json!(["a", "", "héllo"]))
            .expect("strings");
        let binary = t.to_binary();
        assert_eq!(&binary[..5], &[1, 0, 0, 0, b'a']);
        assert_eq!(Tensor::from_bytes(DataType::Bytes, vec![3], binary).expect("binary"), t);
        assert_eq!(Tensor::from_tract(&t.to_tract().expect("tract")).expect("back"), t);
    }

    #[test]
    fn bad_data_is_named() {
        let e = Tensor::from_json(DataType::F32, vec![2, 2], &json!([1, 2, 3])).unwrap_err();
        assert!(e.0.contains("3 elements do not fill shape [2, 2]"), "{e}");
        let e = Tensor::from_json(DataType::U8, vec![1], &json!([256])).unwrap_err();
        assert!(e.0.contains("256 is out of range for UINT8"), "{e}");
        let e = Tensor::from_json(DataType::I32, vec![1], &json!(["x"])).unwrap_err();
        assert!(e.0.contains("expected an integer"), "{e}");
        let e = Tensor::from_bytes(DataType::F32, vec![2], vec![0; 7]).unwrap_err();
        assert!(e.0.contains("7 bytes of FP32 data"), "{e}");
        let e = Tensor::from_bytes(DataType::Bytes, vec![1], vec![9, 0, 0, 0, 1]).unwrap_err();
        assert!(e.0.contains("claims 9 bytes"), "{e}");
        let e = Tensor::from_bytes(DataType::Bool, vec![1], vec![2]).unwrap_err();
        assert!(e.0.contains("0 or 1"), "{e}");
        let e = Tensor::from_json(DataType::F32, vec![usize::MAX, 2], &json!([])).unwrap_err();
        assert!(e.0.contains("more elements"), "{e}");
    }

    /// Shapes from the wire whose element count fits but whose byte count wraps are refused,
    /// never compared after wrapping (2^62 FP32 elements * 4 bytes = 2^64 = 0 when wrapped).
    #[test]
    fn sizes_from_the_wire_never_wrap() {
        let huge = vec![1usize << 62];
        let e = Tensor::from_bytes(DataType::F32, huge.clone(), Vec::new()).unwrap_err();
        assert!(e.0.contains("more bytes than this machine can address"), "{e}");
        let e = Tensor::from_payload(DataType::F64, huge, Payload::Fixed(Vec::new())).unwrap_err();
        assert!(e.0.contains("more bytes"), "{e}");
        let t = Tensor::from_json(DataType::I32, vec![2, 1], &json!([1, 2])).expect("t");
        assert!(t.slice_rows(usize::MAX, 2).is_err());
        assert!(t.slice_rows(1, usize::MAX).is_err());
    }

    #[test]
    fn batching_concatenates_and_splits_rows() {
        let a = Tensor::from_json(DataType::I32, vec![1, 2], &json!([1, 2])).expect("a");
        let b = Tensor::from_json(DataType::I32, vec![2, 2], &json!([3, 4, 5, 6])).expect("b");
        let joined = Tensor::concat_rows(&[&a, &b]).expect("join");
        assert_eq!(joined.shape(), &[3, 2]);
        assert_eq!(joined.slice_rows(1, 2).expect("slice"), b);
        assert_eq!(joined.slice_rows(0, 1).expect("slice"), a);
        assert!(joined.slice_rows(2, 2).is_err());
        let other = Tensor::from_json(DataType::I32, vec![1, 3], &json!([1, 2, 3])).expect("c");
        assert!(Tensor::concat_rows(&[&a, &other]).is_err());
    }
}
