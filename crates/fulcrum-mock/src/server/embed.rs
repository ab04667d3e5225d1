//! Embedding vectors: unit-length, seeded by the input, in JSON floats or OpenAI's base64.

use serde_json::Value;

use crate::api::{ApiError, PromptRef};
use crate::engine::SplitMix64;

/// Most inputs in one request.
pub const MAX_INPUTS: usize = 2048;
/// Most floats in one response (inputs x dimension).
pub const MAX_FLOATS: usize = 1 << 22;

/// Refuses requests whose answer would be too large.
pub fn check_size(inputs: usize, dim: u32) -> Result<(), ApiError> {
    if inputs == 0 {
        return Err(ApiError::bad_request("`input` must not be empty."));
    }
    if inputs > MAX_INPUTS {
        return Err(ApiError::bad_request(format!("At most {MAX_INPUTS} inputs per request.")));
    }
    if inputs.saturating_mul(dim as usize) > MAX_FLOATS {
        return Err(ApiError::bad_request(format!("At most {MAX_FLOATS} floats (inputs x dimension) per request.")));
    }
    Ok(())
}

/// The vector of one input: the same input always gets the same vector.
pub fn vector(input: &PromptRef<'_>, dim: u32, base64: bool) -> Value {
    let seed = match input {
        PromptRef::Text(t) => fulcrum_core::hash::hash_bytes(t.as_bytes(), 0x656d_6264),
        PromptRef::Ids(ids) => {
            let bytes: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
            fulcrum_core::hash::hash_bytes(&bytes, 0x6964_7321)
        }
    };
    let mut rng = SplitMix64::new(seed);
    let mut v: Vec<f32> = (0..dim).map(|_| rng.next_normal() as f32).collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    if base64 {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        Value::String(encode_base64(&bytes))
    } else {
        Value::Array(v.into_iter().map(|x| Value::from(f64::from(x))).collect())
    }
}

/// Standard base64 with padding.
fn encode_base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_rfc_vectors() {
        for (plain, encoded) in
            [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foob", "Zm9vYg=="), ("fooba", "Zm9vYmE=")]
        {
            assert_eq!(encode_base64(plain.as_bytes()), encoded);
        }
    }

    #[test]
    fn vectors_are_unit_length_and_seeded_by_input() {
        let a = vector(&PromptRef::Text("hello"), 64, false);
        assert_eq!(a, vector(&PromptRef::Text("hello"), 64, false));
        assert_ne!(a, vector(&PromptRef::Text("world"), 64, false));
        let norm: f64 = a.as_array().unwrap().iter().map(|x| x.as_f64().unwrap().powi(2)).sum();
        assert!((norm - 1.0).abs() < 1e-4);
        let b = vector(&PromptRef::Ids(&[1, 2]), 3, true);
        assert_eq!(b.as_str().unwrap().len(), 16, "12 bytes");
    }

    #[test]
    fn sizes_are_bounded() {
        assert!(check_size(0, 8).is_err());
        assert!(check_size(MAX_INPUTS + 1, 1).is_err());
        assert!(check_size(MAX_INPUTS, 4096).is_err());
        assert!(check_size(4, 384).is_ok());
    }
}
