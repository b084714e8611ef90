"""Independent BERT encoder in numpy, for checking rir's encoders.

usage: bert_reference.py MODEL_DIR TEXTS.json OUT.npy MAX_LENGTH POOLING NORMALIZE

Reads the safetensors weights and config.json itself and runs the forward pass
with numpy (float64) one text at a time (no padding involved); tokenises with
the `tokenizers` package from the same tokenizer.json.
"""
import json
import math
import sys

import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

model_dir, texts_path, out_path, max_length, pooling, normalize = sys.argv[1:7]
max_length = int(max_length)
normalize = normalize == "true"

cfg = json.load(open(f"{model_dir}/config.json"))
w = {k: v.astype(np.float64) for k, v in load_file(f"{model_dir}/model.safetensors").items() if v.dtype != np.int64}
w = {k[5:] if k.startswith("bert.") else k: v for k, v in w.items()}
eps = cfg.get("layer_norm_eps", 1e-12)
heads = cfg["num_attention_heads"]

tok = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
tok.no_padding()
tok.enable_truncation(max_length)


def layer_norm(x, p):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w[p + ".weight"] + w[p + ".bias"]


def linear(x, p):
    return x @ w[p + ".weight"].T + w[p + ".bias"]


def erf(x):
    # Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7): far below what a cosine of 0.9999 can see.
    t = 1.0 / (1.0 + 0.3275911 * np.abs(x))
    y = 1.0 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t * np.exp(-x * x)
    return np.sign(x) * y


def gelu(x):
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def encode(text):
    e = tok.encode(text)
    ids, types = np.array(e.ids), np.array(e.type_ids)
    n = len(ids)
    x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:n] + w["embeddings.token_type_embeddings.weight"][types]
    x = layer_norm(x, "embeddings.LayerNorm")
    d = x.shape[1] // heads
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}"
        q = linear(x, p + ".attention.self.query").reshape(n, heads, d).transpose(1, 0, 2)
        k = linear(x, p + ".attention.self.key").reshape(n, heads, d).transpose(1, 0, 2)
        v = linear(x, p + ".attention.self.value").reshape(n, heads, d).transpose(1, 0, 2)
        s = q @ k.transpose(0, 2, 1) / math.sqrt(d)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        ctx = (s @ v).transpose(1, 0, 2).reshape(n, heads * d)
        x = layer_norm(linear(ctx, p + ".attention.output.dense") + x, p + ".attention.output.LayerNorm")
        h = gelu(linear(x, p + ".intermediate.dense"))
        x = layer_norm(linear(h, p + ".output.dense") + x, p + ".output.LayerNorm")
    if pooling == "cls":
        v = x[0]
    elif pooling == "mean":
        v = x.mean(0)
    else:  # last_token
        v = x[-1]
    if normalize:
        v = v / np.linalg.norm(v)
    return v


texts = json.load(open(texts_path))
np.save(out_path, np.stack([encode(t) for t in texts]).astype(np.float32))
