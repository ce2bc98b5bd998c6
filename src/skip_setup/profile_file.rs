//! Calibration profiles on disk: a JSON file (`calibrate -o`, `--skip-profile`) or
//! `ffnskip.*` metadata keys inside a GGUF (`calibrate --embed`), which `generate`, `chat`,
//! `bench` and `eval` pick up by themselves.

use std::path::Path;

use anyhow::Context;

use crate::gguf::{GgufFile, GgufWriter, Value, ValueType};
use crate::skip::{KldPoint, LayerStat, Profile, Suggestion};

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
    let p: Profile = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a ffnskip profile", path.display()))?;
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

/// Writes `p` as `ffnskip.*` keys.
pub fn to_gguf(p: &Profile, w: &mut GgufWriter) {
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
            "ffnskip.kld.compensate",
            f64_array(k.iter().map(|k| f64::from(u8::from(k.compensate)))),
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
                let (comp, skip, mean) = (
                    f64s("ffnskip.kld.compensate")?,
                    f64s("ffnskip.kld.ffn_skip")?,
                    f64s("ffnskip.kld.mean")?,
                );
                anyhow::ensure!(
                    [comp.len(), skip.len(), mean.len()]
                        .iter()
                        .all(|&l| l == ratio.len()),
                    "{path}: the ffnskip.kld.* arrays differ in length"
                );
                (0..ratio.len())
                    .map(|i| KldPoint {
                        ratio: ratio[i],
                        compensate: comp[i] != 0.0,
                        ffn_skip: skip[i],
                        kld_mean: mean[i],
                    })
                    .collect()
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
    to_gguf(p, &mut w);
    for t in src.tensors() {
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
                    ratio: 0.1,
                    compensate: false,
                    ffn_skip: 0.0999,
                    kld_mean: 0.25,
                },
                KldPoint {
                    ratio: 0.1,
                    compensate: true,
                    ffn_skip: 0.1,
                    kld_mean: 0.125,
                },
            ],
            // The compensation estimates travel with it.
            ffn_mean: (0..4)
                .map(|l| vec![l as f32, -0.5, 1.0 / (l + 3) as f32])
                .collect(),
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
        to_gguf(&p, &mut w);
        assert_eq!(from_gguf(&gguf(&w)).unwrap(), Some(p));
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
