//! Malformed-GGUF corpus: every case is built here from raw bytes (a small field-by-field
//! builder, so we can write what `GgufWriter` refuses to), parsed with
//! `GgufFile::from_bytes`, and must give an `Err` with the exact message — never a panic.
//! Rules follow ggml's `gguf.cpp` (DESIGN.md §4, "Validate like ggml's gguf.cpp").
//! The second half checks model-level validation (`Llama::load`) on a tiny valid LLaMA
//! written with `GgufWriter`, and a fixed-seed byte-flipping loop.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};

use ffnskip::gguf::{GgufFile, GgufWriter, Value, ValueType};
use ffnskip::model::Llama;

// ---------------------------------------------------------------------------------------
// Raw byte builder
// ---------------------------------------------------------------------------------------

/// GGUF bytes written field by field (little-endian), with named marks at field starts.
#[derive(Clone, Default)]
struct Raw {
    b: Vec<u8>,
    marks: Vec<(String, usize)>,
}

// Value type tags (`enum gguf_type`).
const T_U8: u32 = 0;
const T_I16: u32 = 3;
const T_U32: u32 = 4;
const T_BOOL: u32 = 7;
const T_STR: u32 = 8;
const T_ARR: u32 = 9;
const T_U64: u32 = 10;
// Tensor type tags (`enum ggml_type`).
const F32: u32 = 0;
const Q4_0: u32 = 2;
const Q4_K: u32 = 12;

impl Raw {
    /// Magic, version and the two counts.
    fn header(version: u32, n_tensors: u64, n_kv: u64) -> Self {
        Raw::default()
            .mark("magic")
            .bytes(b"GGUF")
            .mark("version")
            .u32(version)
            .mark("tensor count")
            .u64(n_tensors)
            .mark("kv count")
            .u64(n_kv)
    }
    fn mark(mut self, name: &str) -> Self {
        self.marks.push((name.to_string(), self.b.len()));
        self
    }
    fn at(&self, name: &str) -> usize {
        self.marks
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no mark {name}"))
            .1
    }
    fn bytes(mut self, v: &[u8]) -> Self {
        self.b.extend_from_slice(v);
        self
    }
    fn u8(self, v: u8) -> Self {
        self.bytes(&[v])
    }
    fn i16(self, v: i16) -> Self {
        self.bytes(&v.to_le_bytes())
    }
    fn u32(self, v: u32) -> Self {
        self.bytes(&v.to_le_bytes())
    }
    fn u64(self, v: u64) -> Self {
        self.bytes(&v.to_le_bytes())
    }
    /// A GGUF string: u64 length + bytes (need not be UTF-8).
    fn str(self, s: impl AsRef<[u8]>) -> Self {
        let s = s.as_ref();
        self.u64(s.len() as u64).bytes(s)
    }
    /// Key + type tag; the caller appends the value.
    fn key(self, key: impl AsRef<[u8]>, ty: u32) -> Self {
        self.str(key).u32(ty)
    }
    fn kv_u32(self, key: &str, v: u32) -> Self {
        self.key(key, T_U32).u32(v)
    }
    fn kv_str(self, key: &str, v: &str) -> Self {
        self.key(key, T_STR).str(v)
    }
    /// A tensor info: name, n_dims, ne[..], type, offset.
    fn tensor(self, name: impl AsRef<[u8]>, shape: &[u64], ty: u32, offset: u64) -> Self {
        let mut r = self.str(name).u32(shape.len() as u32);
        for &d in shape {
            r = r.u64(d);
        }
        r.u32(ty).u64(offset)
    }
    /// Zero padding to a multiple of `align`.
    fn pad(mut self, align: usize) -> Self {
        let n = self.b.len().div_ceil(align) * align;
        self.b.resize(n, 0);
        self
    }
    fn zeros(mut self, n: usize) -> Self {
        self.b.resize(self.b.len() + n, 0);
        self
    }
    fn build(self) -> Vec<u8> {
        self.b
    }
}

/// Parses `bytes`; a panic inside the parser fails the test with the case name.
fn parse(case: &str, bytes: Vec<u8>) -> Result<GgufFile, String> {
    match catch_unwind(AssertUnwindSafe(|| {
        GgufFile::from_bytes("case.gguf", bytes)
    })) {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => panic!("{case}: the parser panicked"),
    }
}

/// Asserts that `bytes` fails to parse with exactly `case.gguf: {expected}`.
#[track_caller]
fn assert_err(case: &str, bytes: Vec<u8>, expected: &str) {
    match parse(case, bytes) {
        Ok(_) => panic!("{case}: parsed, expected the error: {expected}"),
        Err(e) => assert_eq!(e, format!("case.gguf: {expected}"), "case {case}"),
    }
}

/// One valid file: a single f32 tensor `t` [8] at offset 0, `kvs` key/values before it.
fn one_tensor(n_kv: u64, kvs: impl FnOnce(Raw) -> Raw, align: usize) -> Vec<u8> {
    kvs(Raw::header(3, 1, n_kv))
        .tensor("t", &[8], F32, 0)
        .pad(align)
        .zeros(32)
        .build()
}

/// The reference file for truncation: every section, laid out so each field can be cut
/// without first tripping the count-vs-remaining-bytes checks (the first key/value and the
/// first tensor are long enough to "pay" for the later ones).
fn reference() -> Raw {
    Raw::header(3, 2, 5)
        .mark("kv0")
        .kv_str("general.name", "a reference file with a long name, 40 c.")
        .mark("kv1 key length")
        .u64(5)
        .mark("kv1 key")
        .bytes(b"a.u32")
        .mark("kv1 type")
        .u32(T_U32)
        .mark("kv1 value")
        .u32(7)
        .mark("kv2")
        .str("a.arr")
        .u32(T_ARR)
        .mark("array elem type")
        .u32(T_I16)
        .mark("array length")
        .u64(3)
        .mark("array elements")
        .i16(1)
        .i16(2)
        .i16(-3)
        .mark("kv3")
        .str("a.strs")
        .u32(T_ARR)
        .u32(T_STR)
        .u64(2)
        .mark("string elem 0")
        .str("a first string that is long enough")
        .mark("string elem 1 length")
        .u64(2)
        .mark("string elem 1")
        .bytes(b"yz")
        .mark("kv4")
        .str("general.architecture")
        .u32(T_STR)
        .mark("string value length")
        .u64(5)
        .mark("string value")
        .bytes(b"llama")
        .mark("tensor0")
        .tensor("first.tensor.with.a.long.name.0123456789", &[8], F32, 0)
        .mark("tensor1 name length")
        .u64(1)
        .mark("tensor1 name")
        .bytes(b"w")
        .mark("tensor1 n_dims")
        .u32(2)
        .mark("tensor1 ne0")
        .u64(8)
        .mark("tensor1 ne1")
        .u64(2)
        .mark("tensor1 type")
        .u32(F32)
        .mark("tensor1 offset")
        .u64(32)
        .mark("header end")
        .pad(32)
        .mark("data")
        .zeros(32 + 64)
        .mark("end")
}

// ---------------------------------------------------------------------------------------
// Truncation
// ---------------------------------------------------------------------------------------

#[test]
fn reference_file_is_valid() {
    let r = reference();
    let f = parse("reference", r.clone().build()).expect("reference file parses");
    assert_eq!(f.metadata().len(), 5);
    assert_eq!(
        f.get("a.arr"),
        Some(&Value::Array(
            ValueType::I16,
            vec![Value::I16(1), Value::I16(2), Value::I16(-3)]
        ))
    );
    assert_eq!(f.tensors().len(), 2);
    assert_eq!(f.data_offset, r.at("data") as u64);
    assert_eq!(f.tensor_info("w").unwrap().shape, vec![8, 2]);
}

#[test]
fn every_prefix_of_a_valid_file_is_an_error() {
    let full = reference().build();
    for len in 0..full.len() {
        let r = parse(&format!("prefix {len}"), full[..len].to_vec());
        assert!(r.is_err(), "prefix of {len} of {} bytes parsed", full.len());
    }
    // The same over a file our writer made (tensor data and every metadata type).
    let full = tiny_llama(&|_, s| Some(s)).to_bytes();
    let f = parse("tiny", full.clone()).unwrap();
    let data_end = f.data_offset
        + f.tensors()
            .iter()
            .map(|t| t.offset + t.n_bytes)
            .max()
            .unwrap();
    for len in 0..full.len() {
        // Past the last tensor's data only the writer's trailing padding is missing.
        let header_or_data = len < data_end as usize;
        if header_or_data && len > f.data_offset as usize + 4096 && len % 509 != 0 {
            continue; // deep inside tensor data: sample
        }
        let r = parse(&format!("tiny prefix {len}"), full[..len].to_vec());
        assert_eq!(
            r.is_err(),
            header_or_data,
            "tiny prefix {len} of {}: {r:?}",
            full.len(),
            r = r.as_ref().err()
        );
    }
}

#[test]
fn truncation_messages_name_the_field() {
    let r = reference();
    // (cut inside this field, bytes kept of it, expected message)
    let cases: &[(&str, usize, &str)] = &[
        ("magic", 0, "truncated file: magic at offset 0 needs 4 bytes, only 0 remain"),
        ("magic", 3, "truncated file: magic at offset 0 needs 4 bytes, only 3 remain"),
        ("version", 2, "truncated file: version at offset 4 needs 4 bytes, only 2 remain"),
        ("tensor count", 7, "truncated file: tensor count at offset 8 needs 8 bytes, only 7 remain"),
        ("kv count", 1, "truncated file: metadata key/value count at offset 16 needs 8 bytes, only 1 remain"),
        // Too few bytes left for 5 key/values at all: caught before reading any.
        ("kv0", 20, "metadata key/value count is 5, but the file has room for at most 1"),
        ("kv1 key length", 3, "truncated file: length of key of metadata entry 1 at offset 96 needs 8 bytes, only 3 remain"),
        ("kv1 key", 4, "truncated file: key of metadata entry 1 at offset 104 needs 5 bytes, only 4 remain"),
        ("kv1 type", 1, "truncated file: value type of metadata key 'a.u32' at offset 109 needs 4 bytes, only 1 remain"),
        ("kv1 value", 3, "truncated file: value of metadata key 'a.u32' at offset 113 needs 4 bytes, only 3 remain"),
        ("array elem type", 2, "truncated file: array type of metadata key 'a.arr' at offset 134 needs 4 bytes, only 2 remain"),
        ("array length", 5, "truncated file: array length of metadata key 'a.arr' at offset 138 needs 8 bytes, only 5 remain"),
        // 3 i16 need 6 bytes: the length is checked against what remains before reading.
        ("array elements", 5, "array length of metadata key 'a.arr' is 3, but the file has room for at most 2"),
        ("string elem 0", 20, "truncated file: element 0 of metadata key 'a.strs' at offset 190 needs 34 bytes, only 12 remain"),
        ("string elem 1 length", 6, "truncated file: length of element 1 of metadata key 'a.strs' at offset 224 needs 8 bytes, only 6 remain"),
        ("string elem 1", 1, "truncated file: element 1 of metadata key 'a.strs' at offset 232 needs 2 bytes, only 1 remain"),
        ("kv4", 10, "truncated file: key of metadata entry 4 at offset 242 needs 20 bytes, only 2 remain"),
        ("string value length", 0, "truncated file: length of value of metadata key 'general.architecture' at offset 266 needs 8 bytes, only 0 remain"),
        ("string value", 4, "truncated file: value of metadata key 'general.architecture' at offset 274 needs 5 bytes, only 4 remain"),
        // Too few bytes left for 2 tensor infos (32 bytes each at least).
        ("tensor0", 10, "tensor count is 2, but the file has room for at most 0"),
        ("tensor1 name length", 7, "truncated file: length of name of tensor 1 at offset 351 needs 8 bytes, only 7 remain"),
        ("tensor1 name", 0, "truncated file: name of tensor 1 at offset 359 needs 1 bytes, only 0 remain"),
        ("tensor1 n_dims", 3, "truncated file: dimension count of tensor 'w' at offset 360 needs 4 bytes, only 3 remain"),
        ("tensor1 ne0", 0, "truncated file: ne[0] of tensor 'w' at offset 364 needs 8 bytes, only 0 remain"),
        ("tensor1 ne1", 4, "truncated file: ne[1] of tensor 'w' at offset 372 needs 8 bytes, only 4 remain"),
        ("tensor1 type", 2, "truncated file: type of tensor 'w' at offset 380 needs 4 bytes, only 2 remain"),
        ("tensor1 offset", 7, "truncated file: data offset of tensor 'w' at offset 384 needs 8 bytes, only 7 remain"),
        // Header complete, alignment padding cut: no data section at all.
        ("header end", 3, "tensor 'first.tensor.with.a.long.name.0123456789': data [0, 32) lies outside the data section of 0 bytes"),
        ("data", 40, "tensor 'w': data [32, 96) lies outside the data section of 40 bytes"),
        ("data", 95, "tensor 'w': data [32, 96) lies outside the data section of 95 bytes"),
    ];
    for &(field, keep, expected) in cases {
        let cut = r.at(field) + keep;
        assert_err(
            &format!("cut in {field} at {cut}"),
            r.b[..cut].to_vec(),
            expected,
        );
    }
    assert_eq!(r.at("end"), r.b.len());
}

// ---------------------------------------------------------------------------------------
// Header
// ---------------------------------------------------------------------------------------

#[test]
fn bad_magic() {
    let mut b = reference().build();
    b[..4].copy_from_slice(b"GGML");
    assert_err(
        "GGML",
        b.clone(),
        "not a GGUF file: magic is \"GGML\", expected \"GGUF\"",
    );
    b[..4].copy_from_slice(&[0, 0, 0, 0]);
    assert_err(
        "zeros",
        b,
        "not a GGUF file: magic is \"\\0\\0\\0\\0\", expected \"GGUF\"",
    );
    assert_err(
        "empty",
        vec![],
        "truncated file: magic at offset 0 needs 4 bytes, only 0 remain",
    );
}

#[test]
fn unsupported_versions() {
    let file = |v: u32| {
        let mut b = one_tensor(0, |r| r, 32);
        b[4..8].copy_from_slice(&v.to_le_bytes());
        b
    };
    assert_err(
        "v1",
        file(1),
        "unsupported GGUF version 1 (supported: 2, 3); GGUF v1 files predate 64-bit counts: convert them with a current llama.cpp",
    );
    assert_err(
        "v4",
        file(4),
        "unsupported GGUF version 4 (supported: 2, 3)",
    );
    assert_err(
        "v0",
        file(0),
        "unsupported GGUF version 0 (supported: 2, 3)",
    );
    assert_err(
        "byte-swapped v3",
        file(3u32.swap_bytes()),
        "unsupported GGUF version 50331648 (supported: 2, 3); the byte order looks swapped: big-endian GGUF files are not supported",
    );
    // Version 2 has the same layout as 3 and is accepted.
    assert!(parse("v2", file(2)).is_ok());
}

#[test]
fn absurd_counts() {
    for n in [u64::MAX, 1 << 40] {
        // 72 bytes follow the counts: room for 2 tensor infos (32 bytes at least each).
        let b = Raw::header(3, n, 0)
            .tensor("t", &[8], F32, 0)
            .pad(32)
            .zeros(32)
            .build();
        assert_err(
            "tensor count",
            b,
            &format!("tensor count is {n}, but the file has room for at most 2"),
        );
        let b = Raw::header(3, 0, n).kv_u32("a", 1).build();
        assert_err(
            "kv count",
            b,
            &format!("metadata key/value count is {n}, but the file has room for at most 1"),
        );
        let b = Raw::header(3, 0, 1)
            .key("a", T_ARR)
            .u32(T_U8)
            .u64(n)
            .u8(1)
            .u8(2)
            .build();
        assert_err(
            "array length",
            b,
            &format!(
                "array length of metadata key 'a' is {n}, but the file has room for at most 2"
            ),
        );
        // A string length is checked against the bytes left: "needs N bytes".
        let b = Raw::header(3, 0, 1)
            .u64(n)
            .bytes(b"key and more bytes")
            .build();
        assert_err("key length", b, &format!("truncated file: key of metadata entry 0 at offset 32 needs {n} bytes, only 18 remain"));
        let b = Raw::header(3, 0, 1)
            .key("k", T_STR)
            .u64(n)
            .bytes(b"abc")
            .build();
        assert_err("string length", b, &format!("truncated file: value of metadata key 'k' at offset 45 needs {n} bytes, only 3 remain"));
        let b = Raw::header(3, 1, 0).u64(n).bytes(&[0; 40]).build();
        assert_err(
            "tensor name length",
            b,
            &format!(
                "truncated file: name of tensor 0 at offset 32 needs {n} bytes, only 40 remain"
            ),
        );
    }
    // Array of arrays: each element needs at least 12 bytes.
    let b = Raw::header(3, 0, 1)
        .key("a", T_ARR)
        .u32(T_ARR)
        .u64(3)
        .u32(T_U8)
        .u64(0)
        .build();
    assert_err(
        "nested array length",
        b,
        "array length of metadata key 'a' is 3, but the file has room for at most 1",
    );
}

// ---------------------------------------------------------------------------------------
// Metadata
// ---------------------------------------------------------------------------------------

#[test]
fn duplicate_key() {
    let b = one_tensor(
        3,
        |r| r.kv_u32("a.x", 1).kv_str("a.y", "y").kv_u32("a.x", 2),
        32,
    );
    assert_err("duplicate key", b, "duplicate metadata key 'a.x'");
}

#[test]
fn empty_key() {
    let b = one_tensor(2, |r| r.kv_u32("a.x", 1).kv_u32("", 2), 32);
    assert_err("empty key", b, "metadata entry 1 has an empty key");
}

#[test]
fn unknown_value_types() {
    let b = one_tensor(1, |r| r.key("k", 13).u32(0), 32);
    assert_err(
        "type 13",
        b,
        "metadata key 'k' has unknown value type 13 (known: 0..=12)",
    );
    let b = one_tensor(1, |r| r.key("k", u32::MAX).u32(0), 32);
    assert_err(
        "type u32::MAX",
        b,
        "metadata key 'k' has unknown value type 4294967295 (known: 0..=12)",
    );
    let b = one_tensor(1, |r| r.key("k", T_ARR).u32(99).u64(0), 32);
    assert_err(
        "array of type 99",
        b,
        "metadata key 'k' has unknown value type 99 (known: 0..=12)",
    );
}

#[test]
fn invalid_utf8() {
    let b = one_tensor(1, |r| r.key(b"bad\xffkey", T_U32).u32(1), 32);
    assert_err("key", b, "key of metadata entry 0 is not valid UTF-8");
    let b = one_tensor(1, |r| r.key("k", T_STR).str(b"\xc3\x28"), 32);
    assert_err(
        "string value",
        b,
        "value of metadata key 'k' is not valid UTF-8",
    );
    let b = one_tensor(
        1,
        |r| {
            r.key("k", T_ARR)
                .u32(T_STR)
                .u64(2)
                .str("ok")
                .str(b"\xe2\x82")
        },
        32,
    );
    assert_err(
        "string element",
        b,
        "element 1 of metadata key 'k' is not valid UTF-8",
    );
    let b = Raw::header(3, 1, 0)
        .tensor(b"t\xff", &[8], F32, 0)
        .pad(32)
        .zeros(32)
        .build();
    assert_err("tensor name", b, "name of tensor 0 is not valid UTF-8");
}

#[test]
fn bool_must_be_0_or_1() {
    let b = one_tensor(1, |r| r.key("k", T_BOOL).u8(2), 32);
    assert_err(
        "bool 2",
        b,
        "metadata key 'k' = 2 is out of range: expected a bool (0 or 1)",
    );
    let b = one_tensor(
        1,
        |r| r.key("k", T_ARR).u32(T_BOOL).u64(2).u8(1).u8(255),
        32,
    );
    assert_err(
        "bool element 255",
        b,
        "metadata key 'k' = 255 is out of range: expected a bool (0 or 1)",
    );
    for v in [0, 1] {
        let f = parse("bool ok", one_tensor(1, |r| r.key("k", T_BOOL).u8(v), 32)).unwrap();
        assert_eq!(f.get("k"), Some(&Value::Bool(v == 1)));
    }
}

/// `levels` nested arrays, the innermost holding one u8.
fn nested(levels: u32) -> Vec<u8> {
    let mut r = Raw::header(3, 0, 1).key("deep", T_ARR);
    for _ in 1..levels {
        r = r.u32(T_ARR).u64(1);
    }
    r.u32(T_U8).u64(1).u8(42).build()
}

#[test]
fn array_nesting_depth() {
    let f = parse("8 levels", nested(8)).unwrap();
    let mut v = f.get("deep").unwrap();
    let mut depth = 0;
    while let Value::Array(_, items) = v {
        depth += 1;
        v = &items[0];
    }
    assert_eq!((depth, v), (8, &Value::U8(42)));
    assert_err(
        "9 levels",
        nested(9),
        "metadata key 'deep' nests arrays deeper than 8 levels",
    );
    assert_err(
        "1000 levels",
        nested(1000),
        "metadata key 'deep' nests arrays deeper than 8 levels",
    );
}

#[test]
fn bad_alignment() {
    for (a, found) in [(0u32, "0"), (3, "3"), (48, "48"), (u32::MAX, "4294967295")] {
        let b = one_tensor(1, |r| r.kv_u32("general.alignment", a), 32);
        assert_err(
            &format!("alignment {a}"),
            b,
            &format!("metadata key 'general.alignment' = {found} is not a power of two"),
        );
    }
    let b = one_tensor(1, |r| r.kv_str("general.alignment", "32"), 32);
    assert_err(
        "string",
        b,
        "metadata key 'general.alignment' must be a u32, found string",
    );
    let b = one_tensor(1, |r| r.key("general.alignment", T_U64).u64(32), 32);
    assert_err(
        "u64",
        b,
        "metadata key 'general.alignment' must be a u32, found u64",
    );
    let b = one_tensor(
        1,
        |r| r.key("general.alignment", T_ARR).u32(T_U32).u64(1).u32(32),
        32,
    );
    assert_err(
        "array",
        b,
        "metadata key 'general.alignment' must be a u32, found array[u32]",
    );
    // A valid custom alignment moves the data section.
    let f = parse(
        "alignment 64",
        one_tensor(1, |r| r.kv_u32("general.alignment", 64), 64),
    )
    .unwrap();
    assert_eq!((f.alignment, f.data_offset % 64), (64, 0));
    assert_eq!(f.data_offset, 128);
}

// ---------------------------------------------------------------------------------------
// Tensor infos
// ---------------------------------------------------------------------------------------

/// A file with the given tensor infos followed by `data` bytes of data.
fn tensors(infos: impl FnOnce(Raw) -> Raw, n: u64, data: usize) -> Vec<u8> {
    infos(Raw::header(3, n, 0)).pad(32).zeros(data).build()
}

#[test]
fn duplicate_tensor() {
    let b = tensors(
        |r| {
            r.tensor("t", &[8], F32, 0)
                .tensor("u", &[8], F32, 32)
                .tensor("t", &[8], F32, 64)
        },
        3,
        96,
    );
    assert_err("duplicate tensor", b, "duplicate tensor 't'");
}

#[test]
fn tensor_name_too_long() {
    let name = "n".repeat(64);
    let b = tensors(|r| r.tensor(&name, &[8], F32, 0), 1, 32);
    assert_err(
        "64-byte name",
        b,
        &format!("tensor '{name}': name is 64 bytes long, expected at most 63 (ggml's GGML_MAX_NAME - 1)"),
    );
    let name = "n".repeat(63);
    assert!(parse(
        "63-byte name",
        tensors(|r| r.tensor(&name, &[8], F32, 0), 1, 32)
    )
    .is_ok());
}

#[test]
fn tensor_placement() {
    let b = tensors(|r| r.tensor("t", &[8], F32, 4), 1, 64);
    assert_err(
        "misaligned",
        b,
        "tensor 't': data offset 4 is not a multiple of the alignment 32",
    );
    let b = Raw::header(3, 1, 1)
        .kv_u32("general.alignment", 64)
        .tensor("t", &[8], F32, 32)
        .pad(64)
        .zeros(64)
        .build();
    assert_err(
        "misaligned for 64",
        b,
        "tensor 't': data offset 32 is not a multiple of the alignment 64",
    );

    let b = tensors(
        |r| r.tensor("a", &[16], F32, 0).tensor("b", &[8], F32, 32),
        2,
        96,
    );
    assert_err(
        "overlap",
        b,
        "tensor 'a': data [0, 64) overlaps tensor 'b' which starts at 32",
    );
    // Listed out of order, same overlap (sorted by offset before checking).
    let b = tensors(
        |r| r.tensor("b", &[8], F32, 32).tensor("a", &[16], F32, 0),
        2,
        96,
    );
    assert_err(
        "overlap, unsorted",
        b,
        "tensor 'a': data [0, 64) overlaps tensor 'b' which starts at 32",
    );
    let b = tensors(
        |r| r.tensor("a", &[8], F32, 0).tensor("b", &[8], F32, 0),
        2,
        64,
    );
    assert_err(
        "same offset",
        b,
        "tensor 'a': data [0, 32) overlaps tensor 'b' which starts at 0",
    );
    // Out of order but disjoint is fine.
    assert!(parse(
        "unsorted",
        tensors(
            |r| r.tensor("b", &[8], F32, 32).tensor("a", &[8], F32, 0),
            2,
            64
        )
    )
    .is_ok());

    let b = tensors(|r| r.tensor("t", &[8], F32, 1024), 1, 64);
    assert_err(
        "beyond EOF",
        b,
        "tensor 't': data [1024, 1056) lies outside the data section of 64 bytes",
    );
    let b = tensors(|r| r.tensor("t", &[8], F32, 32), 1, 48);
    assert_err(
        "straddles EOF",
        b,
        "tensor 't': data [32, 64) lies outside the data section of 48 bytes",
    );
    let b = tensors(|r| r.tensor("t", &[8], F32, u64::MAX - 31), 1, 64);
    assert_err(
        "offset near u64::MAX",
        b,
        "tensor 't': data [18446744073709551584, 18446744073709551615) lies outside the data section of 64 bytes",
    );
    // 2^60 elements: the size fits in u64 but not in the file.
    let b = tensors(|r| r.tensor("t", &[1 << 40, 1 << 20], F32, 0), 1, 64);
    assert_err(
        "huge tensor",
        b,
        "tensor 't': data [0, 4611686018427387904) lies outside the data section of 64 bytes",
    );
}

#[test]
fn absurd_dimensions() {
    let one = |shape: &[u64], ty: u32| tensors(|r| r.tensor("t", shape, ty, 0), 1, 64);
    let max = i64::MAX;
    assert_err(
        "ne0 = 0",
        one(&[0], F32),
        &format!("tensor 't' has ne[0] = 0, expected 1 to {max}"),
    );
    assert_err(
        "ne1 = 0",
        one(&[8, 0], F32),
        &format!("tensor 't' has ne[1] = 0, expected 1 to {max}"),
    );
    assert_err(
        "ne > i64::MAX",
        one(&[8, 1 << 63], F32),
        &format!("tensor 't' has ne[1] = 9223372036854775808, expected 1 to {max}"),
    );
    assert_err(
        "ne = u64::MAX",
        one(&[u64::MAX], F32),
        &format!("tensor 't' has ne[0] = 18446744073709551615, expected 1 to {max}"),
    );
    assert_err(
        "n_dims 0",
        one(&[], F32),
        "tensor 't' has 0 dimensions, expected 1 to 4",
    );
    assert_err(
        "n_dims 5",
        one(&[8, 1, 1, 1, 1], F32),
        "tensor 't' has 5 dimensions, expected 1 to 4",
    );
    let b = Raw::header(3, 1, 0)
        .str("t")
        .u32(u32::MAX)
        .zeros(64)
        .build();
    assert_err(
        "n_dims u32::MAX",
        b,
        "tensor 't' has 4294967295 dimensions, expected 1 to 4",
    );
    // Element count overflows u64 / exceeds i64::MAX / byte count overflows.
    assert_err(
        "product overflow",
        one(&[1 << 32, 1 << 32], F32),
        "tensor 't': size of shape [4294967296, 4294967296] overflows",
    );
    assert_err(
        "product > i64::MAX",
        one(&[1 << 62, 2, 1, 1], F32),
        "tensor 't': size of shape [4611686018427387904, 2, 1, 1] overflows",
    );
    assert_err(
        "bytes overflow",
        one(&[1 << 31, 1 << 31], F32),
        "tensor 't': size of shape [2147483648, 2147483648] overflows",
    );
}

#[test]
fn unknown_and_misshapen_tensor_types() {
    let one = |shape: &[u64], ty: u32| tensors(|r| r.tensor("t", shape, ty, 0), 1, 256);
    for ty in [4, 5, 31, 36, 43, 1000, u32::MAX] {
        assert_err(
            &format!("type {ty}"),
            one(&[32], ty),
            &format!("tensor 't' has unknown type {ty}"),
        );
    }
    assert_err(
        "q4_0 ne0 = 33",
        one(&[33, 2], Q4_0),
        "tensor 't' of type q4_0: ne[0] = 33 is not a multiple of the block size 32",
    );
    assert_err(
        "q4_K ne0 = 128",
        one(&[128], Q4_K),
        "tensor 't' of type q4_K: ne[0] = 128 is not a multiple of the block size 256",
    );
    // ne[1] need not be a multiple of anything: [32, 3] q4_0 is 3 blocks of 18 bytes.
    let f = parse("q4_0 [32, 3]", one(&[32, 3], Q4_0)).unwrap();
    assert_eq!(f.tensors()[0].n_bytes, 54);
}

// ---------------------------------------------------------------------------------------
// Model-level checks on a tiny valid LLaMA
// ---------------------------------------------------------------------------------------

fn tiny_default() -> GgufWriter<'static> {
    tiny_llama(&|_, s| Some(s))
}

/// Loads the model in `w` and returns the error text (the file parses).
fn model_err(w: &GgufWriter) -> String {
    let f = GgufFile::from_bytes("tiny.gguf", w.to_bytes()).expect("tiny file parses");
    match Llama::load(&f) {
        Ok(_) => panic!("model loaded, expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn tiny_llama_loads() {
    let f = GgufFile::from_bytes("tiny.gguf", tiny_default().to_bytes()).unwrap();
    let m = Llama::load(&f).unwrap();
    assert_eq!(
        (
            m.config.n_layer,
            m.config.n_embd,
            m.config.n_vocab,
            m.config.head_dim
        ),
        (2, 64, 32, 16)
    );
}

#[test]
fn model_level_errors() {
    let w = tiny_llama(&|n, s| {
        if n == "blk.0.attn_q.weight" {
            Some(vec![N_EMBD, 32])
        } else {
            Some(s)
        }
    });
    assert_eq!(
        model_err(&w),
        "tiny.gguf: tensor 'blk.0.attn_q.weight' has shape [64, 32], expected [64, 64]"
    );
    // Transposed FFN matrix ([n_out, n_in] instead of ggml's [n_in, n_out]).
    let w = tiny_llama(&|n, s| {
        if n == "blk.1.ffn_down.weight" {
            Some(vec![N_EMBD, N_FF])
        } else {
            Some(s)
        }
    });
    assert_eq!(
        model_err(&w),
        "tiny.gguf: tensor 'blk.1.ffn_down.weight' has shape [64, 128], expected [128, 64]"
    );
    let w = tiny_llama(&|n, s| {
        if n == "blk.0.attn_norm.weight" {
            Some(vec![N_EMBD, 1])
        } else {
            Some(s)
        }
    });
    assert_eq!(
        model_err(&w),
        "tiny.gguf: tensor 'blk.0.attn_norm.weight' has shape [64, 1], expected [64]"
    );
    let w = tiny_llama(&|n, s| (n != "blk.1.ffn_up.weight").then_some(s));
    assert_eq!(
        model_err(&w),
        "tiny.gguf: required tensor 'blk.1.ffn_up.weight' is missing"
    );
    let w = tiny_llama(&|n, s| (n != "output_norm.weight").then_some(s));
    assert_eq!(
        model_err(&w),
        "tiny.gguf: required tensor 'output_norm.weight' is missing"
    );

    let edit = |f: &dyn Fn(&mut GgufWriter)| {
        let mut w = tiny_default();
        f(&mut w);
        model_err(&w)
    };
    assert_eq!(
        edit(&|w| w.remove("llama.block_count")),
        "tiny.gguf: required metadata key 'llama.block_count' is missing"
    );
    assert_eq!(
        edit(&|w| w.remove("general.architecture")),
        "tiny.gguf: required metadata key 'general.architecture' is missing"
    );
    assert_eq!(
        edit(&|w| w.set("llama.block_count", Value::String("2".into()))),
        "tiny.gguf: metadata key 'llama.block_count' has type string, expected an unsigned integer"
    );
    assert_eq!(
        edit(&|w| w.set("llama.block_count", Value::I32(-2))),
        "tiny.gguf: metadata key 'llama.block_count' = -2 is out of range: expected a non-negative integer"
    );
    assert_eq!(
        edit(&|w| w.set("llama.block_count", Value::U32(0))),
        "tiny.gguf: metadata key 'llama.block_count' = 0 is out of range: expected 1 to 4096"
    );
    assert_eq!(
        edit(&|w| w.set("llama.attention.layer_norm_rms_epsilon", Value::U32(0))),
        "tiny.gguf: metadata key 'llama.attention.layer_norm_rms_epsilon' has type u32, expected f32"
    );
    assert_eq!(
        edit(&|w| w.set("general.architecture", Value::String("gpt2".into()))),
        "tiny.gguf: general.architecture = 'gpt2' is not supported: ffnskip runs 'llama' and 'qwen2' models"
    );
    assert_eq!(
        edit(&|w| w.set("llama.rope.scaling.type", Value::String("yarn".into()))),
        "tiny.gguf: llama.rope.scaling.type = 'yarn' is not supported (supported: none, linear)"
    );
    assert_eq!(
        edit(&|w| w.set("llama.attention.head_count", Value::U32(5))),
        "tiny.gguf: metadata key 'llama.attention.head_count' = 5 is out of range: expected a divisor of llama.embedding_length = 64"
    );
    assert_eq!(
        edit(&|w| w.set("llama.attention.head_count_kv", Value::U32(3))),
        "tiny.gguf: metadata key 'llama.attention.head_count_kv' = 3 is out of range: expected a divisor of llama.attention.head_count = 4"
    );
    assert_eq!(
        edit(&|w| w.set("llama.block_count", Value::U32(3))),
        "tiny.gguf: required tensor 'blk.2.ffn_gate.weight' is missing"
    );
    assert_eq!(
        edit(&|w| w.set("llama.vocab_size", Value::U32(33))),
        "tiny.gguf: tensor 'token_embd.weight' has shape [64, 32], expected [64, 33]"
    );
}

// ---------------------------------------------------------------------------------------
// Byte flipping
// ---------------------------------------------------------------------------------------

use common::tiny::{tiny_llama, N_EMBD, N_FF};
use common::Lcg;

/// Flips 1–4 random bytes (mostly in the header) of `base`, `iters` times; sometimes also
/// truncates. Parsing must never panic; files that parse must load or fail cleanly as models.
fn flip_loop(
    name: &str,
    base: &[u8],
    header_len: usize,
    iters: usize,
    seed: u64,
) -> (usize, usize) {
    let mut rng = Lcg(seed);
    let (mut parsed, mut loaded) = (0, 0);
    for it in 0..iters {
        let mut b = base.to_vec();
        for _ in 0..1 + rng.below(4) {
            let pos = if rng.below(8) == 0 {
                rng.below(b.len())
            } else {
                rng.below(header_len)
            };
            b[pos] = match rng.below(4) {
                0 => b[pos] ^ (1 << rng.below(8)),
                1 => 0xff,
                2 => 0,
                _ => rng.next() as u8,
            };
        }
        if rng.below(16) == 0 {
            b.truncate(rng.below(b.len()));
        }
        let r = catch_unwind(AssertUnwindSafe(|| {
            let Ok(f) = GgufFile::from_bytes("fuzz.gguf", b) else {
                return (false, false);
            };
            for t in f.tensors() {
                assert_eq!(f.tensor_data(t).len() as u64, t.n_bytes);
            }
            (true, Llama::load(&f).is_ok())
        }));
        match r {
            Ok((p, l)) => {
                parsed += p as usize;
                loaded += l as usize;
            }
            Err(_) => panic!("{name}: iteration {it} (seed {seed}) panicked"),
        }
    }
    (parsed, loaded)
}

#[test]
fn byte_flips_never_panic() {
    let r = reference();
    let base = r.clone().build();
    let (p, _) = flip_loop("reference", &base, r.at("data"), 100_000, 1);
    eprintln!("reference file: {p} of 100000 mutants still parse");

    let tiny = tiny_default().to_bytes();
    let f = GgufFile::from_bytes("tiny.gguf", tiny.clone()).unwrap();
    let (p, l) = flip_loop("tiny llama", &tiny, f.data_offset as usize, 20_000, 2);
    eprintln!("tiny llama: {p} of 20000 mutants still parse, {l} still load as a model");
}
