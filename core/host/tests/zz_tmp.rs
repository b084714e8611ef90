mod common;
use common::*;
#[test]
fn types() {
    let path = rir_models::resolve(SMOLLM, &rir_models::default_cache()).unwrap();
    let mut f = std::fs::File::open(&path).unwrap();
    let c = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let mut m = std::collections::BTreeMap::new();
    for (n, t) in &c.tensor_infos {
        let key = format!("{:?}", t.ggml_dtype);
        m.entry(key).or_insert_with(Vec::new).push(format!("{n}{:?}", t.shape.dims()));
    }
    for (k, v) in m { eprintln!("{k}: {} e.g. {:?}", v.len(), &v[..v.len().min(4)]); }
}
