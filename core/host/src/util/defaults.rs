//! serde defaults for keys added to stage configs after run directories
//! existed: the value, and a test that skips serializing it when unchanged,
//! so the stage keys (hashes of the serialized config) made before hold.

/// `#[serde(default = "crate::util::defaults::usize_of::<N>")]`
pub fn usize_of<const N: usize>() -> usize {
    N
}

/// `#[serde(skip_serializing_if = "crate::util::defaults::is_usize::<N>")]`
pub fn is_usize<const N: usize>(v: &usize) -> bool {
    *v == N
}
