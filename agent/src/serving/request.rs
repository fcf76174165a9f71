//! The KServe v2 JSON inference request header, parsed straight into typed buffers.
//!
//! No `serde_json::Value` tree is built: tensor `data` goes element by element into
//! little-endian bytes of the input's datatype when `datatype` comes before `data` in the input
//! object (Triton's clients write it so), which costs at most the final tensor's size beside the
//! body. When `data` comes first, elements are kept as compact scalars (16 bytes each) until the
//! datatype is known. Unknown members are skipped without being stored. Every error names the
//! input (by position and, once known, name) and the element.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use tract_onnx::prelude::f16;

use super::tensor::{DataType, Payload};

/// Deepest nesting of `data` arrays accepted.
pub const MAX_DATA_DEPTH: usize = 32;

/// The request header.
#[derive(Debug, Default)]
pub struct InferRequest {
    /// `id`, echoed in the reply.
    pub id: Option<RequestId>,
    /// `parameters.priority`.
    pub priority: Option<u64>,
    /// `parameters.timeout`, microseconds.
    pub timeout_us: Option<u64>,
    /// `parameters.binary_data_output`.
    pub binary_data_output: bool,
    /// `inputs`, in request order.
    pub inputs: Vec<InputHeader>,
    /// `outputs`, when given.
    pub outputs: Option<Vec<OutputHeader>>,
}

/// A request id: KServe says a string; numbers are echoed as numbers.
#[derive(Debug, Clone, PartialEq)]
pub enum RequestId {
    /// A string id.
    Text(String),
    /// A numeric id.
    Number(serde_json::Number),
}

impl RequestId {
    /// The id as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Self::Text(s) => serde_json::Value::String(s.clone()),
            Self::Number(n) => serde_json::Value::Number(n.clone()),
        }
    }
}

/// One entry of `inputs`.
#[derive(Debug, Default)]
pub struct InputHeader {
    /// `name`.
    pub name: String,
    /// `shape`.
    pub shape: Vec<u64>,
    /// `datatype` as given.
    pub datatype: String,
    /// `parameters.binary_data_size`.
    pub binary_data_size: Option<u64>,
    /// `data`, when given.
    pub data: Option<Data>,
}

/// One entry of `outputs`.
#[derive(Debug, Deserialize)]
pub struct OutputHeader {
    /// `name`.
    pub name: String,
    /// `parameters`.
    #[serde(default)]
    pub parameters: OutputParameters,
}

/// An output's `parameters`; other members are ignored.
#[derive(Debug, Default, Deserialize)]
pub struct OutputParameters {
    /// `binary_data`.
    pub binary_data: Option<bool>,
}

/// Elements of a `data` member, flattened in row-major order.
#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    /// Already encoded as the datatype that preceded `data`.
    Typed {
        /// The datatype the bytes are in.
        dtype: DataType,
        /// The elements.
        payload: Payload,
        /// How many.
        count: usize,
    },
    /// Read before the datatype was known.
    Loose(Vec<Scalar>),
}

/// A JSON scalar kept until its datatype is known.
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar {
    /// `true` / `false`.
    Bool(bool),
    /// A negative integer.
    Int(i64),
    /// A non-negative integer.
    UInt(u64),
    /// A number with a fraction or exponent.
    Float(f64),
    /// A string.
    Str(Box<str>),
}

/// Parses the JSON header of an inference request.
pub fn parse(json: &[u8]) -> Result<InferRequest, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(json);
    let request = RequestSeed.deserialize(&mut de)?;
    de.end()?;
    Ok(request)
}

impl Data {
    /// The elements as `dtype`: typed data must already be `dtype`; loose data is encoded now.
    pub fn into_payload(self, dtype: DataType) -> Result<(Payload, usize), String> {
        match self {
            Self::Typed { dtype: have, payload, count } if have == dtype => Ok((payload, count)),
            Self::Typed { dtype: have, .. } => {
                Err(format!("data was read as {have} but the datatype is {dtype}"))
            }
            Self::Loose(list) => {
                let mut sink = Typed::new(dtype, list.len());
                for s in list {
                    match s {
                        Scalar::Bool(b) => sink.bool(b),
                        Scalar::Int(i) => sink.int(i128::from(i)),
                        Scalar::UInt(u) => sink.int(i128::from(u)),
                        Scalar::Float(f) => sink.float(f),
                        Scalar::Str(s) => sink.string(s.into()),
                    }?;
                }
                Ok(sink.finish())
            }
        }
    }
}

// === the element sinks ===

/// Encodes elements of one datatype as they arrive.
struct Typed {
    dtype: DataType,
    bytes: Vec<u8>,
    strings: Vec<Vec<u8>>,
    count: usize,
}

impl Typed {
    fn new(dtype: DataType, hint: usize) -> Self {
        let hint = hint.min(1 << 20);
        match dtype.size() {
            Some(size) => Self {
                dtype,
                bytes: Vec::with_capacity(hint.saturating_mul(size)),
                strings: Vec::new(),
                count: 0,
            },
            None => Self { dtype, bytes: Vec::new(), strings: Vec::with_capacity(hint), count: 0 },
        }
    }

    fn finish(self) -> (Payload, usize) {
        let payload = if self.dtype == DataType::Bytes {
            Payload::Strings(self.strings)
        } else {
            Payload::Fixed(self.bytes)
        };
        (payload, self.count)
    }

    fn fail<T>(&self, what: impl fmt::Display) -> Result<T, String> {
        Err(format!("element {}: {what}", self.count))
    }

    fn done(&mut self) -> Result<(), String> {
        self.count += 1;
        Ok(())
    }

    fn bool(&mut self, b: bool) -> Result<(), String> {
        if self.dtype != DataType::Bool {
            return self.fail(format!("expected {}, got {b}", self.expected()));
        }
        self.bytes.push(u8::from(b));
        self.done()
    }

    fn int(&mut self, i: i128) -> Result<(), String> {
        fn put<T: TryFrom<i128>, const N: usize>(
            i: i128,
            out: &mut Vec<u8>,
            le: fn(T) -> [u8; N],
        ) -> bool {
            T::try_from(i).map(|v| out.extend(le(v))).is_ok()
        }
        let out = &mut self.bytes;
        let fits = match self.dtype {
            DataType::U8 => put(i, out, u8::to_le_bytes),
            DataType::U16 => put(i, out, u16::to_le_bytes),
            DataType::U32 => put(i, out, u32::to_le_bytes),
            DataType::U64 => put(i, out, u64::to_le_bytes),
            DataType::I8 => put(i, out, i8::to_le_bytes),
            DataType::I16 => put(i, out, i16::to_le_bytes),
            DataType::I32 => put(i, out, i32::to_le_bytes),
            DataType::I64 => put(i, out, i64::to_le_bytes),
            // Integers are exact in the float types up to their precision, as JSON intends.
            #[allow(clippy::cast_precision_loss)]
            DataType::F16 | DataType::F32 | DataType::F64 => return self.float(i as f64),
            DataType::Bool | DataType::Bytes => {
                return self.fail(format!("expected {}, got {i}", self.expected()));
            }
        };
        if !fits {
            return self.fail(format!("{i} is out of range for {}", self.dtype));
        }
        self.done()
    }

    fn float(&mut self, f: f64) -> Result<(), String> {
        match self.dtype {
            DataType::F16 => self.bytes.extend(f16::from_f64(f).to_le_bytes()),
            // FP32 input is rounded to FP32 by definition.
            #[allow(clippy::cast_possible_truncation)]
            DataType::F32 => self.bytes.extend((f as f32).to_le_bytes()),
            DataType::F64 => self.bytes.extend(f.to_le_bytes()),
            _ => return self.fail(format!("expected {}, got {f}", self.expected())),
        }
        self.done()
    }

    fn string(&mut self, s: String) -> Result<(), String> {
        let special = match s.as_str() {
            "NaN" => Some(f64::NAN),
            "Infinity" | "inf" => Some(f64::INFINITY),
            "-Infinity" | "-inf" => Some(f64::NEG_INFINITY),
            _ => None,
        };
        match (self.dtype, special) {
            (DataType::Bytes, _) => {
                self.strings.push(s.into_bytes());
                self.done()
            }
            (DataType::F16 | DataType::F32 | DataType::F64, Some(f)) => self.float(f),
            _ => {
                let shown: String = s.chars().take(32).collect();
                self.fail(format!("expected {}, got the string {shown:?}", self.expected()))
            }
        }
    }

    fn expected(&self) -> &'static str {
        match self.dtype {
            DataType::Bool => "true or false",
            DataType::Bytes => "a string (BYTES)",
            DataType::F16 | DataType::F32 | DataType::F64 => "a number",
            _ => "an integer",
        }
    }
}

/// Where `data` elements go: typed when the datatype came first.
enum Sink {
    Typed(Typed),
    Loose(Vec<Scalar>),
}

impl Sink {
    fn into_data(self) -> Data {
        match self {
            Self::Typed(t) => {
                let dtype = t.dtype;
                let (payload, count) = t.finish();
                Data::Typed { dtype, payload, count }
            }
            Self::Loose(list) => Data::Loose(list),
        }
    }
}

struct DataSeed<'a> {
    sink: &'a mut Sink,
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for DataSeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl DataSeed<'_> {
    fn put<E: de::Error>(
        self,
        typed: impl FnOnce(&mut Typed) -> Result<(), String>,
        loose: impl FnOnce() -> Scalar,
    ) -> Result<(), E> {
        match self.sink {
            Sink::Typed(t) => typed(t).map_err(E::custom),
            Sink::Loose(list) => {
                list.push(loose());
                Ok(())
            }
        }
    }
}

impl<'de> Visitor<'de> for DataSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("tensor data: numbers, booleans or strings, in flat or nested arrays")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if self.depth >= MAX_DATA_DEPTH {
            return Err(de::Error::custom(format!(
                "data is nested more than {MAX_DATA_DEPTH} levels deep"
            )));
        }
        let sink = self.sink;
        while seq.next_element_seed(DataSeed { sink: &mut *sink, depth: self.depth + 1 })?.is_some()
        {
        }
        Ok(())
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.put(|t| t.bool(v), || Scalar::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.put(|t| t.int(i128::from(v)), || Scalar::Int(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.put(|t| t.int(i128::from(v)), || Scalar::UInt(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.put(|t| t.float(v), || Scalar::Float(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.put(|t| t.string(v.to_owned()), || Scalar::Str(v.into()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<(), E> {
        match self.sink {
            Sink::Typed(t) => t.string(v).map_err(E::custom),
            Sink::Loose(list) => {
                list.push(Scalar::Str(v.into_boxed_str()));
                Ok(())
            }
        }
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Err(E::custom("null is not a tensor element"))
    }

    fn visit_map<A: MapAccess<'de>>(self, _map: A) -> Result<(), A::Error> {
        Err(de::Error::custom(
            "tensor data holds an object; elements must be numbers, booleans or strings",
        ))
    }
}

// === the request and its inputs ===

struct RequestSeed;

impl<'de> DeserializeSeed<'de> for RequestSeed {
    type Value = InferRequest;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<InferRequest, D::Error> {
        d.deserialize_map(self)
    }
}

/// `parameters` of the request; other members are ignored.
#[derive(Deserialize, Default)]
struct RequestParameters {
    #[serde(default, deserialize_with = "priority")]
    priority: Option<u64>,
    #[serde(default, deserialize_with = "timeout")]
    timeout: Option<u64>,
    #[serde(default, deserialize_with = "binary_output")]
    binary_data_output: Option<bool>,
}

fn named<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
    must: &str,
) -> Result<Option<T>, D::Error> {
    Option::<T>::deserialize(d).map_err(|e| de::Error::custom(format!("{must} ({e})")))
}

fn priority<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    named(d, "parameters.priority must be a positive integer")
}

fn timeout<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    named(d, "parameters.timeout must be microseconds as a non-negative integer")
}

fn binary_output<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    named(d, "parameters.binary_data_output must be true or false")
}

impl<'de> Visitor<'de> for RequestSeed {
    type Value = InferRequest;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a KServe v2 inference request object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<InferRequest, A::Error> {
        let mut out = InferRequest::default();
        let mut seen_inputs = false;
        while let Some(key) = map.next_key::<Key>()? {
            match key.0.as_str() {
                "id" => out.id = Some(map.next_value_seed(IdSeed)?),
                "parameters" => {
                    let p: Option<RequestParameters> = map.next_value()?;
                    let p = p.unwrap_or_default();
                    out.priority = p.priority;
                    out.timeout_us = p.timeout;
                    out.binary_data_output = p.binary_data_output.unwrap_or(false);
                }
                "inputs" => {
                    out.inputs = map.next_value_seed(InputsSeed)?;
                    seen_inputs = true;
                }
                "outputs" => {
                    let list: Option<Vec<OutputHeader>> = map
                        .next_value()
                        .map_err(|e| de::Error::custom(format!("\"outputs\": {e}")))?;
                    out.outputs = list;
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        if !seen_inputs {
            return Err(de::Error::custom("request JSON needs an \"inputs\" array"));
        }
        Ok(out)
    }
}

/// An object key, owned (keys with escapes cannot be borrowed).
struct Key(String);

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Self)
    }
}

struct IdSeed;

impl<'de> DeserializeSeed<'de> for IdSeed {
    type Value = RequestId;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<RequestId, D::Error> {
        d.deserialize_any(self)
    }
}

impl Visitor<'_> for IdSeed {
    type Value = RequestId;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"id\" as a string")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<RequestId, E> {
        Ok(RequestId::Text(v.to_owned()))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<RequestId, E> {
        Ok(RequestId::Number(v.into()))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<RequestId, E> {
        Ok(RequestId::Number(v.into()))
    }
}

struct InputsSeed;

impl<'de> DeserializeSeed<'de> for InputsSeed {
    type Value = Vec<InputHeader>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<InputHeader>, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for InputsSeed {
    type Value = Vec<InputHeader>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"inputs\" as an array of input objects")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<InputHeader>, A::Error> {
        let mut out = Vec::new();
        while let Some(input) = seq.next_element_seed(InputSeed { index: out.len() })? {
            out.push(input);
        }
        Ok(out)
    }
}

struct InputSeed {
    index: usize,
}

impl<'de> DeserializeSeed<'de> for InputSeed {
    type Value = InputHeader;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<InputHeader, D::Error> {
        d.deserialize_map(self)
    }
}

/// An input's `parameters`; other members are ignored.
#[derive(Deserialize, Default)]
struct InputParameters {
    binary_data_size: Option<u64>,
}

impl<'de> Visitor<'de> for InputSeed {
    type Value = InputHeader;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "inputs[{}] as an object", self.index)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<InputHeader, A::Error> {
        let i = self.index;
        let mut out = InputHeader::default();
        let mut has_name = false;
        let mut has_shape = false;
        let mut dtype: Option<DataType> = None;
        // Names the input in messages once its name is known.
        let at = |out: &InputHeader, has_name: bool| {
            if has_name { format!("input {:?}", out.name) } else { format!("inputs[{i}]") }
        };
        while let Some(key) = map.next_key::<Key>()? {
            match key.0.as_str() {
                "name" => {
                    out.name = map.next_value().map_err(|e| {
                        de::Error::custom(format!("inputs[{i}].name must be a string ({e})"))
                    })?;
                    has_name = true;
                }
                "shape" => {
                    out.shape = map.next_value().map_err(|e| {
                        de::Error::custom(format!(
                            "{}: \"shape\" must be an array of non-negative integers ({e})",
                            at(&out, has_name)
                        ))
                    })?;
                    has_shape = true;
                }
                "datatype" => {
                    out.datatype = map.next_value().map_err(|e| {
                        de::Error::custom(format!(
                            "{}: \"datatype\" must be a string ({e})",
                            at(&out, has_name)
                        ))
                    })?;
                    dtype = DataType::parse(&out.datatype);
                }
                "parameters" => {
                    let p: Option<InputParameters> = map.next_value().map_err(|e| {
                        de::Error::custom(format!(
                            "{}: parameters.binary_data_size must be a byte count ({e})",
                            at(&out, has_name)
                        ))
                    })?;
                    out.binary_data_size = p.unwrap_or_default().binary_data_size;
                }
                "data" => {
                    if out.data.is_some() {
                        return Err(de::Error::custom(format!(
                            "{}: \"data\" is given twice",
                            at(&out, has_name)
                        )));
                    }
                    let mut sink = match dtype {
                        Some(d) => Sink::Typed(Typed::new(d, 0)),
                        None => Sink::Loose(Vec::new()),
                    };
                    let where_ = at(&out, has_name);
                    map.next_value_seed(DataSeed { sink: &mut sink, depth: 0 })
                        .map_err(|e| de::Error::custom(format!("{where_}: {e}")))?;
                    out.data = Some(sink.into_data());
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        if !has_name {
            return Err(de::Error::custom(format!("inputs[{i}] has no \"name\"")));
        }
        if !has_shape {
            return Err(de::Error::custom(format!("input {:?} has no \"shape\"", out.name)));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serving::tensor::Tensor;
    use serde_json::json;

    fn tensor_of(body: &str) -> Result<Tensor, String> {
        let r = parse(body.as_bytes()).map_err(|e| e.to_string())?;
        let input = r.inputs.into_iter().next().ok_or("no input")?;
        let dtype = DataType::parse(&input.datatype).ok_or("datatype")?;
        let shape: Vec<usize> = input.shape.iter().map(|d| usize::try_from(*d).unwrap()).collect();
        let (payload, _) = input.data.ok_or("no data")?.into_payload(dtype)?;
        Tensor::from_payload(dtype, shape, payload).map_err(|e| e.0)
    }

    /// Every datatype, typed (datatype first) and loose (data first), nested and flat, gives
    /// exactly what the `Value`-based reader gives.
    #[test]
    fn every_datatype_typed_and_loose_matches_the_value_reader() {
        let cases = [
            ("BOOL", json!([true, false, true, true])),
            ("UINT8", json!([0, 1, 254, 255])),
            ("UINT16", json!([0, 1, 65534, 65535])),
            ("UINT32", json!([0, 1, 7, 4_294_967_295u64])),
            ("UINT64", json!([0, 1, 7, u64::MAX])),
            ("INT8", json!([-128, -1, 0, 127])),
            ("INT16", json!([-32768, -1, 0, 32767])),
            ("INT32", json!([-2_147_483_648i64, -1, 0, 2_147_483_647])),
            ("INT64", json!([i64::MIN, -1, 0, i64::MAX])),
            ("FP16", json!([0.5, -2.0, 1024, "NaN"])),
            ("FP32", json!([0.5, -2.5, 1e10, "-Infinity"])),
            ("FP64", json!([0.1, -2.5, 1e300, 3])),
            ("BYTES", json!(["a", "", "héllo", "\u{0}"])),
        ];
        for (name, flat) in cases {
            let dtype = DataType::parse(name).expect("datatype");
            let want = Tensor::from_json(dtype, vec![2, 2], &flat).expect("value reader");
            let nested = json!([[flat[0], flat[1]], [flat[2], flat[3]]]);
            for data in [&flat, &nested] {
                let typed = format!(
                    r#"{{"inputs":[{{"name":"x","shape":[2,2],"datatype":"{name}","data":{data}}}]}}"#
                );
                let loose = format!(
                    r#"{{"inputs":[{{"data":{data},"name":"x","datatype":"{name}","shape":[2,2]}}]}}"#
                );
                for body in [typed, loose] {
                    let got = tensor_of(&body).unwrap_or_else(|e| panic!("{body}: {e}"));
                    // NaN != NaN: compare the encodings.
                    assert_eq!(got.to_binary(), want.to_binary(), "{body}");
                    assert_eq!(got.shape(), &[2, 2]);
                }
            }
        }
    }

    #[test]
    fn header_members() {
        let r = parse(
            br#"{"id":"r1","extra":{"deep":[1,[2]]},"parameters":{"priority":2,"timeout":500,"binary_data_output":true,"other":"x"},
                "inputs":[{"name":"a","shape":[1],"datatype":"FP32","parameters":{"binary_data_size":4,"x":1}}],
                "outputs":[{"name":"o","parameters":{"binary_data":false}}]}"#,
        )
        .expect("parses");
        assert_eq!(r.id, Some(RequestId::Text("r1".into())));
        assert_eq!((r.priority, r.timeout_us, r.binary_data_output), (Some(2), Some(500), true));
        assert_eq!(r.inputs[0].binary_data_size, Some(4));
        assert!(r.inputs[0].data.is_none());
        let outputs = r.outputs.expect("outputs");
        assert_eq!(
            (outputs[0].name.as_str(), outputs[0].parameters.binary_data),
            ("o", Some(false))
        );
        let r = parse(br#"{"id":7,"inputs":[]}"#).expect("numeric id");
        assert_eq!(r.id.map(|i| i.to_json()), Some(json!(7)));
    }

    #[test]
    fn malformed_input_is_named() {
        let cases: &[(&str, &str)] = &[
            (
                r#"{"inputs":[{"name":"x","shape":[1],"datatype":"UINT8","data":[256]}]}"#,
                "element 0: 256 is out of range for UINT8",
            ),
            (
                r#"{"inputs":[{"name":"x","shape":[2],"datatype":"INT32","data":[1,1.5]}]}"#,
                "element 1: expected an integer, got 1.5",
            ),
            (
                r#"{"inputs":[{"name":"x","shape":[1],"datatype":"BOOL","data":[1]}]}"#,
                "expected true or false",
            ),
            (
                r#"{"inputs":[{"name":"x","shape":[1],"datatype":"BYTES","data":[1]}]}"#,
                "expected a string (BYTES)",
            ),
            (
                r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":["one"]}]}"#,
                "got the string \"one\"",
            ),
            (
                r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[null]}]}"#,
                "null is not a tensor element",
            ),
            (
                r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[{"a":1}]}]}"#,
                "holds an object",
            ),
            (
                r#"{"inputs":[{"name":"x","shape":[-1],"datatype":"FP32","data":[1]}]}"#,
                "input \"x\": \"shape\" must be an array of non-negative integers",
            ),
            (
                r#"{"inputs":[{"shape":[1],"datatype":"FP32","data":[1]}]}"#,
                "inputs[0] has no \"name\"",
            ),
            (
                r#"{"inputs":[{"name":"x","datatype":"FP32","data":[1]}]}"#,
                "input \"x\" has no \"shape\"",
            ),
            (
                r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","parameters":{"binary_data_size":-4}}]}"#,
                "binary_data_size must be a byte count",
            ),
            (
                r#"{"parameters":{"priority":"high"},"inputs":[]}"#,
                "parameters.priority must be a positive integer",
            ),
            (
                r#"{"parameters":{"timeout":-1},"inputs":[]}"#,
                "parameters.timeout must be microseconds",
            ),
            (r#"{"outputs":[{"nom":"o"}],"inputs":[]}"#, "\"outputs\""),
            (r#"{"id":[1],"inputs":[]}"#, "\"id\" as a string"),
            (r#"{"inputs":{}}"#, "\"inputs\" as an array"),
            (r#"{}"#, "needs an \"inputs\" array"),
            (r#"{"inputs":[]} trailing"#, "trailing characters"),
            (r#"[1]"#, "inference request object"),
        ];
        for (body, needle) in cases {
            let e = parse(body.as_bytes()).map(|_| ()).expect_err(body).to_string();
            assert!(e.contains(needle), "{body}: {needle:?} not in {e:?}");
        }
        let deep = format!(
            r#"{{"inputs":[{{"name":"x","shape":[1],"datatype":"FP32","data":{}1{}}}]}}"#,
            "[".repeat(40),
            "]".repeat(40)
        );
        let e = parse(deep.as_bytes()).map(|_| ()).expect_err("deep").to_string();
        assert!(e.contains("nested more than 32"), "{e}");
        // Loose data meets its datatype afterwards: the element is named then.
        let r =
            parse(br#"{"inputs":[{"data":[1,300],"name":"x","shape":[2],"datatype":"UINT8"}]}"#)
                .expect("parses");
        let input = r.inputs.into_iter().next().expect("input");
        let e = input.data.expect("data").into_payload(DataType::U8).expect_err("range");
        assert!(e.contains("element 1: 300 is out of range for UINT8"), "{e}");
    }

    /// Typed data costs the tensor's size, not a tree of values: 1 Mi FP32 elements take 4 MiB.
    #[test]
    fn typed_data_is_compact() {
        let n = 1 << 20;
        let mut body =
            String::from(r#"{"inputs":[{"name":"x","shape":[1048576],"datatype":"FP32","data":["#);
        for i in 0..n {
            if i > 0 {
                body.push(',');
            }
            body.push_str("0.5");
        }
        body.push_str("]}]}");
        let r = parse(body.as_bytes()).expect("parses");
        let input = r.inputs.into_iter().next().expect("input");
        match input.data.expect("data") {
            Data::Typed { payload: Payload::Fixed(b), count, .. } => {
                assert_eq!(count, n);
                assert_eq!(b.len(), n * 4);
                assert!(b.capacity() <= n * 8, "capacity {}", b.capacity());
            }
            other => panic!("not typed: {:?}", std::mem::discriminant(&other)),
        }
    }
}
