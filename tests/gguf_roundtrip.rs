//! GgufWriter → GgufFile round trips: every value type (nested and empty arrays included),
//! default and custom alignment, tensor views; the default model re-read and rewritten;
//! and llama.cpp loading a tiny LLaMA our writer produced.

mod common;

use std::borrow::Cow;

use ffnskip::gguf::{GgmlType, GgufFile, GgufWriter, Value, ValueType};

use common::tiny::{tiny_llama, N_VOCAB};
use common::Lcg;

/// One key per value type, plus nested, empty and edge-valued arrays.
fn every_value() -> Vec<(&'static str, Value)> {
    use Value as V;
    let strs = |v: &[&str]| {
        V::Array(
            ValueType::String,
            v.iter().map(|s| V::String(s.to_string())).collect(),
        )
    };
    vec![
        ("t.u8", V::U8(255)),
        ("t.i8", V::I8(-128)),
        ("t.u16", V::U16(65535)),
        ("t.i16", V::I16(-32768)),
        ("t.u32", V::U32(u32::MAX)),
        ("t.i32", V::I32(i32::MIN)),
        ("t.f32", V::F32(-1.5e-30)),
        ("t.f32.inf", V::F32(f32::INFINITY)),
        ("t.bool.true", V::Bool(true)),
        ("t.bool.false", V::Bool(false)),
        ("t.string", V::String("héllo, wörld ▁ 🦙\n\0end".into())),
        ("t.string.empty", V::String(String::new())),
        ("t.u64", V::U64(u64::MAX)),
        ("t.i64", V::I64(i64::MIN)),
        ("t.f64", V::F64(std::f64::consts::PI)),
        (
            "t.arr.u8",
            V::Array(ValueType::U8, vec![V::U8(0), V::U8(1), V::U8(255)]),
        ),
        (
            "t.arr.i8",
            V::Array(ValueType::I8, vec![V::I8(-1), V::I8(1)]),
        ),
        ("t.arr.u16", V::Array(ValueType::U16, vec![V::U16(7)])),
        (
            "t.arr.i16",
            V::Array(ValueType::I16, vec![V::I16(-7), V::I16(7)]),
        ),
        (
            "t.arr.u32",
            V::Array(ValueType::U32, (0..100).map(V::U32).collect()),
        ),
        ("t.arr.i32", V::Array(ValueType::I32, vec![V::I32(-5)])),
        (
            "t.arr.f32",
            V::Array(ValueType::F32, vec![V::F32(0.25), V::F32(-0.0)]),
        ),
        (
            "t.arr.bool",
            V::Array(ValueType::Bool, vec![V::Bool(true), V::Bool(false)]),
        ),
        ("t.arr.string", strs(&["a", "", "▁b"])),
        ("t.arr.u64", V::Array(ValueType::U64, vec![V::U64(1 << 40)])),
        (
            "t.arr.i64",
            V::Array(ValueType::I64, vec![V::I64(-(1 << 40))]),
        ),
        ("t.arr.f64", V::Array(ValueType::F64, vec![V::F64(1e300)])),
        ("t.arr.empty.u32", V::Array(ValueType::U32, vec![])),
        ("t.arr.empty.string", V::Array(ValueType::String, vec![])),
        ("t.arr.empty.array", V::Array(ValueType::Array, vec![])),
        (
            "t.arr.nested",
            V::Array(
                ValueType::Array,
                vec![
                    strs(&["x", "y"]),
                    V::Array(ValueType::I32, vec![V::I32(1), V::I32(2), V::I32(3)]),
                    V::Array(ValueType::F32, vec![]),
                    V::Array(
                        ValueType::Array,
                        vec![
                            V::Array(ValueType::U8, vec![V::U8(9)]),
                            V::Array(ValueType::U8, vec![]),
                        ],
                    ),
                ],
            ),
        ),
    ]
}

/// Tensors of several types and shapes with random bytes of the right length.
fn some_tensors(rng: &mut Lcg) -> Vec<(String, GgmlType, Vec<u64>, Vec<u8>)> {
    [
        ("a.f32", GgmlType::F32, vec![3]),
        ("b.f16", GgmlType::F16, vec![5, 3]),
        ("c.q4_0", GgmlType::Q4_0, vec![64, 3, 2]),
        ("d.q6_K", GgmlType::Q6_K, vec![256, 1, 1, 2]),
        ("e.i8", GgmlType::I8, vec![1]),
        ("f.bf16", GgmlType::BF16, vec![33]),
    ]
    .into_iter()
    .map(|(n, ty, shape)| {
        let rows: u64 = shape[1..].iter().product();
        let len = ty.row_bytes(shape[0]).unwrap() * rows;
        (n.to_string(), ty, shape, rng.bytes(len as usize))
    })
    .collect()
}

fn roundtrip(alignment: Option<u32>) {
    let mut rng = Lcg(11);
    let mut w = GgufWriter::new();
    if let Some(a) = alignment {
        w.set("general.alignment", Value::U32(a));
    }
    for (k, v) in every_value() {
        w.set(k, v);
    }
    let tensors = some_tensors(&mut rng);
    for (n, ty, shape, data) in &tensors {
        w.add_tensor(n, *ty, shape, data.as_slice()).unwrap();
    }
    let bytes = w.to_bytes();
    let align = u64::from(alignment.unwrap_or(32));
    assert_eq!(
        bytes.len() as u64 % align,
        0,
        "the file ends padded, as ggml writes it"
    );

    let f = GgufFile::from_bytes("rt.gguf", bytes).unwrap();
    assert_eq!((f.version, f.alignment), (3, align));
    assert_eq!(f.data_offset % align, 0);
    // Metadata: same keys, order and values (NaN-free, so == is exact bit equality but
    // for -0.0, checked below).
    let mut expected: Vec<(String, Value)> = Vec::new();
    if let Some(a) = alignment {
        expected.push(("general.alignment".into(), Value::U32(a)));
    }
    expected.extend(every_value().into_iter().map(|(k, v)| (k.to_string(), v)));
    assert_eq!(f.metadata(), expected.as_slice());
    let Some(Value::Array(_, zero)) = f.get("t.arr.f32") else {
        panic!()
    };
    assert!(matches!(zero[1], Value::F32(z) if z.to_bits() == (-0.0f32).to_bits()));
    assert_eq!(
        f.get("t.arr.nested").unwrap().type_desc(),
        "array[array[string]]",
        "type_desc follows the first element"
    );
    // Tensors: same order, shapes, types, bytes; offsets aligned and increasing.
    assert_eq!(f.tensors().len(), tensors.len());
    let mut prev_end = 0;
    for (t, (n, ty, shape, data)) in f.tensors().iter().zip(&tensors) {
        assert_eq!((&t.name, t.ty, &t.shape), (n, *ty, shape));
        assert_eq!(t.offset % align, 0, "{n}");
        assert!(t.offset >= prev_end);
        assert!(t.offset - prev_end < align, "{n}: padding only");
        prev_end = t.offset + t.n_bytes;
        assert_eq!(f.tensor_data(t), data.as_slice(), "{n}");
        assert_eq!(f.tensor_info(n), Some(t));
    }
}

#[test]
fn every_value_type_default_alignment() {
    roundtrip(None);
}

#[test]
fn every_value_type_alignment_64() {
    roundtrip(Some(64));
}

#[test]
fn every_value_type_alignment_32_explicit_and_4096() {
    roundtrip(Some(32));
    roundtrip(Some(4096));
    roundtrip(Some(1));
}

#[test]
fn writer_refuses_what_the_reader_rejects() {
    let err = |w: &GgufWriter| w.try_to_bytes().unwrap_err().to_string();
    let mut w = GgufWriter::new();
    w.set("general.alignment", Value::U64(64));
    assert_eq!(
        err(&w),
        "metadata key 'general.alignment' must be a power-of-two u32, found u64 64"
    );
    w.set("general.alignment", Value::U32(48));
    assert_eq!(
        err(&w),
        "metadata key 'general.alignment' must be a power-of-two u32, found u32 48"
    );
    let mut w = GgufWriter::new();
    w.set(
        "a",
        Value::Array(ValueType::U32, vec![Value::U32(1), Value::I32(2)]),
    );
    assert_eq!(
        err(&w),
        "metadata key 'a': element 1 is i32, expected u32 (the array's element type)"
    );
    let mut w = GgufWriter::new();
    w.set("", Value::U8(0));
    assert_eq!(err(&w), "metadata key is empty");
    let mut deep = Value::Array(ValueType::U8, vec![]);
    for _ in 0..8 {
        deep = Value::Array(ValueType::Array, vec![deep]);
    }
    let mut w = GgufWriter::new();
    w.set("deep", deep);
    assert_eq!(
        err(&w),
        "metadata key 'deep' nests arrays deeper than 8 levels"
    );

    let mut w = GgufWriter::new();
    let add = |w: &mut GgufWriter, name: &str, ty, shape: &[u64], n: usize| {
        w.add_tensor(name, ty, shape, vec![0u8; n])
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        add(&mut w, "q", GgmlType::Q4_0, &[33], 18),
        "tensor 'q': ne[0] = 33 is not a multiple of the q4_0 block size 32"
    );
    assert_eq!(
        add(&mut w, "z", GgmlType::F32, &[4, 0], 0),
        format!("tensor 'z': ne[1] = 0, expected 1 to {}", i64::MAX)
    );
    assert_eq!(
        add(&mut w, "e", GgmlType::F32, &[], 0),
        "tensor 'e': 0 dimensions, expected 1 to 4"
    );
    assert_eq!(
        add(&mut w, "s", GgmlType::F32, &[4], 12),
        "tensor 's': 12 bytes of data, expected 16 for f32 [4]"
    );
    assert_eq!(
        add(&mut w, "o", GgmlType::F32, &[1 << 40, 1 << 40], 0),
        "tensor 'o': size of shape [1099511627776, 1099511627776] overflows"
    );
    let long = "n".repeat(64);
    assert_eq!(
        add(&mut w, &long, GgmlType::F32, &[1], 4),
        format!("tensor '{long}': name is 64 bytes long, expected at most 63")
    );
    w.add_tensor("t", GgmlType::F32, &[1], vec![0u8; 4])
        .unwrap();
    assert_eq!(
        add(&mut w, "t", GgmlType::F32, &[1], 4),
        "duplicate tensor 't'"
    );
}

#[test]
fn write_file_is_atomic_and_readable() {
    let dir = std::env::temp_dir().join(format!("ffnskip-rt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("w.gguf");
    let mut w = GgufWriter::new();
    w.set("k", Value::String("v".into()));
    w.add_tensor("t", GgmlType::F32, &[2], 1.5f32.to_le_bytes().repeat(2))
        .unwrap();
    let names = |d: &std::path::Path| {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    w.write_file(&path).unwrap();
    assert_eq!(names(&dir), ["w.gguf"]);
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), w.to_bytes());
    assert_eq!(
        f.tensor_data(f.tensor_info("t").unwrap()),
        1.5f32.to_le_bytes().repeat(2).as_slice()
    );
    // Invalid metadata: nothing is left behind, not even a temporary file.
    w.set("general.alignment", Value::U32(3));
    let path2 = dir.join("bad.gguf");
    assert!(w.write_file(&path2).is_err());
    assert_eq!(names(&dir), ["w.gguf"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The default model, re-read and rewritten with GgufWriter, parses to the same metadata
/// and tensor bytes (and, having the same layout rules, to the same file).
#[test]
fn default_model_rewrite_is_identical() {
    let path = common::default_model();
    let f = GgufFile::open(&path).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in f.metadata() {
        w.set(k, v.clone());
    }
    for t in f.tensors() {
        w.add_tensor(&t.name, t.ty, &t.shape, Cow::Borrowed(f.tensor_data(t)))
            .unwrap();
    }
    let bytes = w.to_bytes();
    let g = GgufFile::from_bytes("rewritten.gguf", bytes.clone()).unwrap();
    assert_eq!(g.metadata(), f.metadata());
    assert_eq!(g.alignment, f.alignment);
    assert_eq!(g.tensors().len(), f.tensors().len());
    for (a, b) in f.tensors().iter().zip(g.tensors()) {
        assert_eq!(
            (&a.name, a.ty, &a.shape, a.n_bytes),
            (&b.name, b.ty, &b.shape, b.n_bytes)
        );
        assert!(
            f.tensor_data(a) == g.tensor_data(b),
            "tensor {} bytes differ",
            a.name
        );
    }
    // The original was written with the same layout rules (ggml/gguf-py: tensors in order,
    // each padded to the alignment, the last one included), so the rewrite is the same file.
    let original = std::fs::read(&path).unwrap();
    eprintln!(
        "default model: {} keys, {} tensors, {} bytes rewritten",
        f.metadata().len(),
        f.tensors().len(),
        bytes.len()
    );
    assert_eq!(bytes.len(), original.len());
    assert!(bytes == original, "rewrite differs from the original file");
    assert_eq!(g.data_offset, f.data_offset, "same header length");
}

// ---------------------------------------------------------------------------------------
// llama.cpp accepts our writer's output
// ---------------------------------------------------------------------------------------

#[test]
fn llama_cpp_loads_our_writer_output() {
    let dir = std::env::temp_dir().join(format!("ffnskip-tiny-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tiny.gguf");
    tiny_llama(&|_, s| Some(s)).write_file(&path).unwrap();

    let ours = GgufFile::open(&path).unwrap();
    let model = ffnskip::model::Llama::load(&ours).unwrap();
    assert_eq!(model.config.n_vocab, N_VOCAB as usize);

    let peer = ffnskip::peer::LlamaCpp::load(&path).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(peer.n_vocab(), N_VOCAB as usize);
    assert!(peer.is_eog(2));
    // It also evaluates: one step gives finite logits for every token.
    let mut ctx = peer
        .context(16, 1, ffnskip::peer::PeerMode::Reference { ubatch: 1 })
        .unwrap_or_else(|e| panic!("{e:#}"));
    let logits = ctx.eval(&[1, 5, 7], true).unwrap();
    assert_eq!(logits.len(), 3);
    assert!(logits
        .iter()
        .all(|l| l.len() == N_VOCAB as usize && l.iter().all(|x| x.is_finite())));
    drop(ctx);
    drop(peer);
    std::fs::remove_dir_all(&dir).unwrap();
}
