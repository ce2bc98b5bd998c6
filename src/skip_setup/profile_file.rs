//! Calibration profiles on disk: a JSON file (`calibrate -o`, `--skip-profile`) or
//! `ffnskip.*` metadata keys inside a GGUF (`calibrate --embed`), which `generate`, `chat`,
//! `bench` and `eval` pick up by themselves.

use std::path::Path;

use anyhow::Context;

use crate::gguf::{GgmlType, GgufFile, GgufWriter, Value, ValueType};
use crate::skip::compensation::{Compensation, FfnMap};
use crate::skip::{KldPoint, LayerStat, Policy, Profile, Suggestion};

/// Prefix of the low-rank compensation's F32 tensors: `{prefix}.{layer}.{offset,down,up}`,
/// offset `[n_embd]`, down and up `[n_embd, rank]` (ggml order: ne0 = n_embd).
const LOWRANK: &str = "ffnskip.lowrank";

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// `LayerStat` fields in key order: `ffnskip.profile.{ffn_cos,layer_cos}.{field}`.
const STAT_FIELDS: [&str; 5] = ["mean", "p10", "p50", "p90", "frac_ge_095"];

type F64Field = fn(&Suggestion) -> f64;

/// The f64 `Suggestion` fields, stored as `ffnskip.suggest.{field}` arrays (one value per
/// suggestion); `threshold` is the one f32 array.
const SUGGEST_F64: [(&str, F64Field); 4] = [
    ("ratio", |s| s.ratio),
    ("k", |s| s.k),
    ("simulated_ratio", |s| s.simulated_ratio),
    ("simulated_damage", |s| s.simulated_damage),
];

fn stat_field(s: &LayerStat, i: usize) -> f32 {
    [s.mean, s.p10, s.p50, s.p90, s.frac_ge_095][i]
}

fn f32_array(v: impl IntoIterator<Item = f32>) -> Value {
    Value::Array(ValueType::F32, v.into_iter().map(Value::F32).collect())
}

fn f64_array(v: impl IntoIterator<Item = f64>) -> Value {
    Value::Array(ValueType::F64, v.into_iter().map(Value::F64).collect())
}

/// Reads and validates a profile JSON file.
pub fn load_json(path: &Path) -> anyhow::Result<Profile> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read skip profile {}", path.display()))?;
    let mut p: Profile = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a ffnskip profile", path.display()))?;
    p.upgrade();
    p.validate()
        .with_context(|| format!("{}: invalid profile", path.display()))?;
    Ok(p)
}

/// Writes `p` as pretty-printed JSON, atomically.
pub fn save_json(p: &Profile, path: &Path) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(p)?;
    crate::outfile::write_atomic(path, (text + "\n").as_bytes())?;
    Ok(())
}

/// Writes `p` as `ffnskip.*` keys and (the low-rank compensation) `ffnskip.lowrank.*` tensors.
pub fn to_gguf(p: &Profile, w: &mut GgufWriter) -> anyhow::Result<()> {
    w.set("ffnskip.profile.version", Value::U32(p.version));
    w.set("ffnskip.profile.n_layer", Value::U32(p.n_layer as u32));
    w.set("ffnskip.profile.tokens", Value::U64(p.tokens as u64));
    w.set("ffnskip.profile.source", Value::String(p.source.clone()));
    for (prefix, stats) in [("ffn_cos", &p.ffn_cos), ("layer_cos", &p.layer_cos)] {
        for (i, field) in STAT_FIELDS.iter().enumerate() {
            w.set(
                &format!("ffnskip.profile.{prefix}.{field}"),
                f32_array(stats.iter().map(|s| stat_field(s, i))),
            );
        }
    }
    w.set(
        "ffnskip.profile.block_influence",
        f32_array(p.block_influence.iter().copied()),
    );
    w.set("ffnskip.cold_start", Value::U32(p.cold_start as u32));
    w.set("ffnskip.cold_end", Value::U32(p.cold_end as u32));
    w.set("ffnskip.full_every", Value::U32(p.full_every as u32));
    let s = &p.suggestions;
    for (field, get) in SUGGEST_F64 {
        w.set(
            &format!("ffnskip.suggest.{field}"),
            f64_array(s.iter().map(get)),
        );
    }
    w.set(
        "ffnskip.suggest.threshold",
        f32_array(s.iter().map(|s| s.threshold)),
    );
    if !p.kld_curve.is_empty() {
        let k = &p.kld_curve;
        w.set("ffnskip.kld.ratio", f64_array(k.iter().map(|k| k.ratio)));
        w.set(
            "ffnskip.kld.policy",
            Value::Array(
                ValueType::String,
                k.iter()
                    .map(|k| Value::String(k.policy.name().into()))
                    .collect(),
            ),
        );
        // 0 none, 1 mean, 2 lowrank (Compensation::ALL order).
        w.set(
            "ffnskip.kld.compensate",
            f64_array(k.iter().map(|k| {
                Compensation::ALL
                    .iter()
                    .position(|&c| c == k.compensation)
                    .unwrap_or(0) as f64
            })),
        );
        w.set(
            "ffnskip.kld.ffn_skip",
            f64_array(k.iter().map(|k| k.ffn_skip)),
        );
        w.set("ffnskip.kld.mean", f64_array(k.iter().map(|k| k.kld_mean)));
    }
    if !p.ffn_mean.is_empty() {
        // [n_layer][n_embd], layer after layer.
        w.set(
            "ffnskip.profile.ffn_mean",
            f32_array(p.ffn_mean.iter().flatten().copied()),
        );
    }
    if !p.ffn_damage.is_empty() {
        w.set(
            "ffnskip.profile.ffn_damage",
            f32_array(p.ffn_damage.iter().copied()),
        );
    }
    for (l, m) in p.ffn_lowrank.iter().enumerate() {
        let d = m.offset.len() as u64;
        let r = m.rank() as u64;
        w.add_tensor(
            &format!("{LOWRANK}.{l}.offset"),
            GgmlType::F32,
            &[d],
            f32_bytes(&m.offset),
        )?;
        if r > 0 {
            w.add_tensor(
                &format!("{LOWRANK}.{l}.down"),
                GgmlType::F32,
                &[d, r],
                f32_bytes(&m.down),
            )?;
            w.add_tensor(
                &format!("{LOWRANK}.{l}.up"),
                GgmlType::F32,
                &[d, r],
                f32_bytes(&m.up),
            )?;
        }
    }
    Ok(())
}

/// The low-rank compensation's tensors, if the file has them.
fn lowrank_from_gguf(f: &GgufFile, n: usize) -> anyhow::Result<Vec<FfnMap>> {
    let path = f.path().display();
    let tensor = |name: &str| -> anyhow::Result<Option<(Vec<u64>, Vec<f32>)>> {
        let Some(info) = f.tensor_info(name) else {
            return Ok(None);
        };
        anyhow::ensure!(
            info.ty == GgmlType::F32,
            "{path}: tensor '{name}' is {}, expected F32",
            info.ty
        );
        let data = f.tensor_data(info);
        let v = data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Ok(Some((info.shape.clone(), v)))
    };
    if f.tensor_info(&format!("{LOWRANK}.0.offset")).is_none() {
        return Ok(Vec::new());
    }
    (0..n)
        .map(|l| {
            let name = format!("{LOWRANK}.{l}.offset");
            let (_, offset) =
                tensor(&name)?.with_context(|| format!("{path}: tensor '{name}' is missing"))?;
            let down = tensor(&format!("{LOWRANK}.{l}.down"))?;
            let up = tensor(&format!("{LOWRANK}.{l}.up"))?;
            let (down, up) = match (down, up) {
                (None, None) => (Vec::new(), Vec::new()),
                (Some((sd, down)), Some((su, up))) if sd == su => (down, up),
                _ => anyhow::bail!(
                    "{path}: tensors '{LOWRANK}.{l}.down' and '.up' must both exist with equal shapes"
                ),
            };
            Ok(FfnMap { offset, down, up })
        })
        .collect()
}

/// Reads a profile written by [`to_gguf`]; `None` when the file has none.
pub fn from_gguf(f: &GgufFile) -> anyhow::Result<Option<Profile>> {
    let Some(version) = f.opt_u64("ffnskip.profile.version")? else {
        return Ok(None);
    };
    let path = f.path().display();
    let n = f.usize_in("ffnskip.profile.n_layer", 1..=65536)?;
    let f32s = |key: &str| -> anyhow::Result<Vec<f32>> {
        f.opt_f32_array(key)?
            .with_context(|| format!("{path}: key '{key}' is missing"))
    };
    let per_layer = |key: &str| -> anyhow::Result<Vec<f32>> {
        let v = f32s(key)?;
        anyhow::ensure!(
            v.len() == n,
            "{path}: key '{key}' has {} values, expected {n}",
            v.len()
        );
        Ok(v)
    };
    let f64s = |key: &str| -> anyhow::Result<Vec<f64>> {
        match f.get(key) {
            Some(Value::Array(ValueType::F64, items)) => items
                .iter()
                .map(|v| match v {
                    Value::F64(x) => Ok(*x),
                    _ => anyhow::bail!("{path}: key '{key}' is not an f64 array"),
                })
                .collect(),
            Some(v) => anyhow::bail!(
                "{path}: key '{key}' must be an array of f64, found {}",
                v.type_desc()
            ),
            None => anyhow::bail!("{path}: key '{key}' is missing"),
        }
    };
    let stats = |prefix: &str| -> anyhow::Result<Vec<LayerStat>> {
        let cols: Vec<Vec<f32>> = STAT_FIELDS
            .iter()
            .map(|field| per_layer(&format!("ffnskip.profile.{prefix}.{field}")))
            .collect::<anyhow::Result<_>>()?;
        Ok((0..n)
            .map(|l| LayerStat {
                mean: cols[0][l],
                p10: cols[1][l],
                p50: cols[2][l],
                p90: cols[3][l],
                frac_ge_095: cols[4][l],
            })
            .collect())
    };
    let ratio = f64s("ffnskip.suggest.ratio")?;
    let threshold = f32s("ffnskip.suggest.threshold")?;
    let k = f64s("ffnskip.suggest.k")?;
    let sim = f64s("ffnskip.suggest.simulated_ratio")?;
    let damage = f64s("ffnskip.suggest.simulated_damage")?;
    anyhow::ensure!(
        [threshold.len(), k.len(), sim.len(), damage.len()]
            .iter()
            .all(|&l| l == ratio.len()),
        "{path}: the ffnskip.suggest.* arrays differ in length"
    );
    let p = Profile {
        version: u32::try_from(version)
            .with_context(|| format!("{path}: ffnskip.profile.version {version} is too large"))?,
        n_layer: n,
        tokens: f.usize_in("ffnskip.profile.tokens", 0..=u64::MAX)?,
        source: f.str("ffnskip.profile.source")?.to_string(),
        ffn_cos: stats("ffn_cos")?,
        layer_cos: stats("layer_cos")?,
        block_influence: per_layer("ffnskip.profile.block_influence")?,
        cold_start: f.usize_in("ffnskip.cold_start", 0..=n as u64)?,
        cold_end: f.usize_in("ffnskip.cold_end", 0..=n as u64)?,
        full_every: f.usize_in("ffnskip.full_every", 0..=u64::from(u32::MAX))?,
        suggestions: (0..ratio.len())
            .map(|i| Suggestion {
                ratio: ratio[i],
                threshold: threshold[i],
                k: k[i],
                simulated_ratio: sim[i],
                simulated_damage: damage[i],
            })
            .collect(),
        kld_curve: match f.get("ffnskip.kld.ratio") {
            None => Vec::new(),
            Some(_) => {
                let ratio = f64s("ffnskip.kld.ratio")?;
                let policy: Vec<Policy> = match f.get("ffnskip.kld.policy") {
                    None => vec![Policy::Adaptive; ratio.len()],
                    Some(Value::Array(ValueType::String, items)) => items
                        .iter()
                        .map(|v| match v {
                            Value::String(s) => Policy::parse(s).with_context(|| {
                                format!("{path}: ffnskip.kld.policy: unknown policy '{s}'")
                            }),
                            _ => anyhow::bail!("{path}: ffnskip.kld.policy is not a string array"),
                        })
                        .collect::<anyhow::Result<_>>()?,
                    Some(v) => anyhow::bail!(
                        "{path}: key 'ffnskip.kld.policy' must be an array of strings, found {}",
                        v.type_desc()
                    ),
                };
                let (comp, skip, mean) = (
                    f64s("ffnskip.kld.compensate")?,
                    f64s("ffnskip.kld.ffn_skip")?,
                    f64s("ffnskip.kld.mean")?,
                );
                anyhow::ensure!(
                    [comp.len(), skip.len(), mean.len(), policy.len()]
                        .iter()
                        .all(|&l| l == ratio.len()),
                    "{path}: the ffnskip.kld.* arrays differ in length"
                );
                (0..ratio.len())
                    .map(|i| {
                        let c = comp[i];
                        let compensation = Compensation::ALL
                            .into_iter()
                            .enumerate()
                            .find(|&(j, _)| j as f64 == c)
                            .map(|(_, c)| c)
                            .with_context(|| {
                                format!(
                                    "{path}: ffnskip.kld.compensate holds {c}, expected 0, 1 or 2"
                                )
                            })?;
                        Ok(KldPoint {
                            policy: policy[i],
                            ratio: ratio[i],
                            compensation,
                            compensate: false,
                            ffn_skip: skip[i],
                            kld_mean: mean[i],
                        })
                    })
                    .collect::<anyhow::Result<_>>()?
            }
        },
        ffn_mean: match f.opt_f32_array("ffnskip.profile.ffn_mean")? {
            None => Vec::new(),
            Some(v) => {
                anyhow::ensure!(
                    !v.is_empty() && v.len().is_multiple_of(n),
                    "{path}: ffnskip.profile.ffn_mean has {} values, not n_layer = {n} rows",
                    v.len()
                );
                v.chunks_exact(v.len() / n).map(<[f32]>::to_vec).collect()
            }
        },
        ffn_damage: f
            .opt_f32_array("ffnskip.profile.ffn_damage")?
            .unwrap_or_default(),
        ffn_lowrank: lowrank_from_gguf(f, n)?,
    };
    p.validate()
        .with_context(|| format!("{path}: invalid embedded ffnskip profile"))?;
    Ok(Some(p))
}

/// Writes a copy of `src` to `out` with `p` embedded (replacing any earlier profile).
pub fn embed(p: &Profile, src: &GgufFile, out: &Path) -> anyhow::Result<()> {
    let mut w = GgufWriter::new();
    for (k, v) in src.metadata() {
        if !k.starts_with("ffnskip.") {
            w.set(k, v.clone());
        }
    }
    to_gguf(p, &mut w)?;
    for t in src
        .tensors()
        .iter()
        .filter(|t| !t.name.starts_with("ffnskip."))
    {
        w.add_tensor(&t.name, t.ty, &t.shape, src.tensor_data(t))
            .with_context(|| format!("copying tensor '{}'", t.name))?;
    }
    w.write_file(out)
        .with_context(|| format!("cannot write {}", out.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::skip::PROFILE_VERSION;

    fn profile() -> Profile {
        let stat = |l: usize| LayerStat {
            mean: 0.9 + l as f32 / 100.0,
            p10: 0.5,
            p50: 0.75,
            p90: 0.875,
            frac_ge_095: l as f32 / 4.0,
        };
        Profile {
            version: PROFILE_VERSION,
            n_layer: 4,
            tokens: 123,
            source: "synthetic".into(),
            ffn_cos: (0..4).map(stat).collect(),
            layer_cos: (1..5).map(stat).collect(),
            block_influence: vec![0.5, 0.25, 0.125, 0.0625],
            cold_start: 1,
            cold_end: 1,
            full_every: 6,
            suggestions: vec![Suggestion {
                ratio: 0.25,
                threshold: 0.96,
                k: 1.5,
                simulated_ratio: 0.2499,
                simulated_damage: 0.01,
            }],
            kld_curve: vec![
                KldPoint {
                    policy: Policy::Adaptive,
                    ratio: 0.1,
                    compensation: Compensation::None,
                    compensate: false,
                    ffn_skip: 0.0999,
                    kld_mean: 0.25,
                },
                KldPoint {
                    policy: Policy::Adaptive,
                    ratio: 0.1,
                    compensation: Compensation::Mean,
                    compensate: false,
                    ffn_skip: 0.1,
                    kld_mean: 0.125,
                },
                KldPoint {
                    policy: Policy::Placed,
                    ratio: 0.25,
                    compensation: Compensation::Lowrank,
                    compensate: false,
                    ffn_skip: 0.25,
                    kld_mean: 0.5,
                },
            ],
            // The compensation estimates travel with it: the means as metadata, the low-rank
            // maps (rank 2 at layer 0, rank 0 elsewhere) as F32 tensors.
            ffn_mean: (0..4)
                .map(|l| vec![l as f32, -0.5, 1.0 / (l + 3) as f32])
                .collect(),
            ffn_lowrank: (0..4)
                .map(|l| FfnMap {
                    offset: vec![0.5, l as f32, -1.0 / 3.0],
                    down: if l == 0 {
                        vec![1.0, 2.0, 3.0, -4.0, 5.5, 1e-7]
                    } else {
                        Vec::new()
                    },
                    up: if l == 0 {
                        vec![0.25, -2.0, 3.0, 4.0, 5.0, 6.0]
                    } else {
                        Vec::new()
                    },
                })
                .collect(),
            ffn_damage: vec![0.5, 0.01, 0.02, 0.25],
        }
    }

    fn gguf(w: &GgufWriter) -> GgufFile {
        GgufFile::from_bytes("p.gguf", w.to_bytes()).unwrap()
    }

    #[test]
    fn gguf_metadata_round_trip() {
        let p = profile();
        let mut w = GgufWriter::new();
        w.set("general.architecture", Value::String("llama".into()));
        assert_eq!(from_gguf(&gguf(&w)).unwrap(), None);
        to_gguf(&p, &mut w).unwrap();
        assert_eq!(from_gguf(&gguf(&w)).unwrap(), Some(p.clone()));
        // The low-rank maps are tensors with their shapes.
        let g = gguf(&w);
        let t = g.tensor_info("ffnskip.lowrank.0.down").unwrap();
        assert_eq!((t.ty, t.shape.as_slice()), (GgmlType::F32, &[3u64, 2][..]));
        assert!(g.tensor_info("ffnskip.lowrank.1.down").is_none());
        // A map with one of its tensors missing is an error that names it.
        let mut half = p.clone();
        half.ffn_lowrank.clear();
        let mut w2 = GgufWriter::new();
        to_gguf(&half, &mut w2).unwrap();
        for l in 0..4 {
            let m = &p.ffn_lowrank[l];
            w2.add_tensor(
                &format!("{LOWRANK}.{l}.offset"),
                GgmlType::F32,
                &[3],
                f32_bytes(&m.offset),
            )
            .unwrap();
        }
        w2.add_tensor(
            &format!("{LOWRANK}.0.down"),
            GgmlType::F32,
            &[3, 2],
            f32_bytes(&p.ffn_lowrank[0].down),
        )
        .unwrap();
        assert_eq!(
            from_gguf(&gguf(&w2)).unwrap_err().to_string(),
            "p.gguf: tensors 'ffnskip.lowrank.0.down' and '.up' must both exist with equal shapes"
        );
        // A profile missing one of its keys is an error that names the key.
        w.remove("ffnskip.suggest.threshold");
        let e = from_gguf(&gguf(&w)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "p.gguf: key 'ffnskip.suggest.threshold' is missing"
        );
    }

    #[test]
    fn json_round_trip_and_errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("ffnskip-profile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("p.json");
        let p = profile();
        save_json(&p, &path).unwrap();
        assert_eq!(load_json(&path).unwrap(), p);
        let mut bad = p;
        bad.cold_end = 4;
        save_json(&bad, &path).unwrap();
        let e = load_json(&path).unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            format!(
                "{}: invalid profile: cold_start 1 + cold_end 4 exceed n_layer 4",
                path.display()
            )
        );
        std::fs::remove_dir_all(&dir).unwrap();
        let e = load_json(&path).unwrap_err();
        assert!(e.to_string().starts_with("cannot read skip profile"), "{e}");
    }
}
