//! Typed metadata accessors. A missing optional key may default; a key that is present
//! with the wrong type or an out-of-range value is always an error naming the key.

use super::error::{ErrorKind, Result};
use super::reader::GgufFile;
use super::types::Value;

impl GgufFile {
    fn wrong_type(&self, key: &str, expected: &str, v: &Value) -> super::GgufError {
        self.error(ErrorKind::WrongType {
            key: key.to_string(),
            expected: expected.to_string(),
            found: v.type_desc(),
        })
    }

    fn required(&self, key: &str) -> Result<&Value> {
        self.get(key).ok_or_else(|| {
            self.error(ErrorKind::MissingKey {
                key: key.to_string(),
            })
        })
    }

    /// An unsigned integer key of any integer type whose value fits in u64.
    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let i = v
            .as_i128()
            .ok_or_else(|| self.wrong_type(key, "an unsigned integer", v))?;
        u64::try_from(i).map(Some).map_err(|_| {
            self.error(ErrorKind::BadValue {
                key: key.to_string(),
                expected: "a non-negative integer".into(),
                found: i.to_string(),
            })
        })
    }

    pub fn u64(&self, key: &str) -> Result<u64> {
        self.required(key)?;
        Ok(self.opt_u64(key)?.unwrap_or_default())
    }

    /// An unsigned integer key that must lie in `range` (used for dimensions and counts).
    pub fn usize_in(&self, key: &str, range: std::ops::RangeInclusive<u64>) -> Result<usize> {
        let v = self.u64(key)?;
        self.check_range(key, v, range)
    }

    pub fn opt_usize_in(
        &self,
        key: &str,
        range: std::ops::RangeInclusive<u64>,
    ) -> Result<Option<usize>> {
        match self.opt_u64(key)? {
            None => Ok(None),
            Some(v) => self.check_range(key, v, range).map(Some),
        }
    }

    fn check_range(
        &self,
        key: &str,
        v: u64,
        range: std::ops::RangeInclusive<u64>,
    ) -> Result<usize> {
        if !range.contains(&v) {
            return Err(self.error(ErrorKind::BadValue {
                key: key.to_string(),
                expected: format!("{} to {}", range.start(), range.end()),
                found: v.to_string(),
            }));
        }
        Ok(v as usize)
    }

    /// A float key stored as f32 or f64.
    pub fn opt_f32(&self, key: &str) -> Result<Option<f32>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(*x)),
            Some(Value::F64(x)) => Ok(Some(*x as f32)),
            Some(v) => Err(self.wrong_type(key, "f32", v)),
        }
    }

    pub fn f32(&self, key: &str) -> Result<f32> {
        self.required(key)?;
        Ok(self.opt_f32(key)?.unwrap_or_default())
    }

    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.wrong_type(key, "bool", v)),
        }
    }

    pub fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.wrong_type(key, "string", v)),
        }
    }

    pub fn str(&self, key: &str) -> Result<&str> {
        match self.required(key)? {
            Value::String(s) => Ok(s),
            v => Err(self.wrong_type(key, "string", v)),
        }
    }

    /// An array of strings (e.g. `tokenizer.ggml.tokens`).
    pub fn opt_str_array(&self, key: &str) -> Result<Option<Vec<&str>>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let Value::Array(_, items) = v else {
            return Err(self.wrong_type(key, "array[string]", v));
        };
        items
            .iter()
            .map(|x| match x {
                Value::String(s) => Ok(s.as_str()),
                _ => Err(self.wrong_type(key, "array[string]", v)),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// An array of numbers read as f32 (e.g. `tokenizer.ggml.scores`).
    pub fn opt_f32_array(&self, key: &str) -> Result<Option<Vec<f32>>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let Value::Array(_, items) = v else {
            return Err(self.wrong_type(key, "array[f32]", v));
        };
        items
            .iter()
            .map(|x| match x {
                Value::F32(f) => Ok(*f),
                Value::F64(f) => Ok(*f as f32),
                _ => Err(self.wrong_type(key, "array[f32]", v)),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// An array of integers (e.g. `tokenizer.ggml.token_type`).
    pub fn opt_i64_array(&self, key: &str) -> Result<Option<Vec<i64>>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let Value::Array(_, items) = v else {
            return Err(self.wrong_type(key, "array[integer]", v));
        };
        items
            .iter()
            .map(|x| {
                x.as_i128()
                    .and_then(|i| i64::try_from(i).ok())
                    .ok_or_else(|| self.wrong_type(key, "array[integer]", v))
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
}
