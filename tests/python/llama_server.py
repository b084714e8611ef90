"""A real llama.cpp server (xllamacpp) on loopback, for the generator and encoder tests.

usage: llama_server.py MODEL.gguf PORT [PARALLEL [THREADS [N_CTX]]] [--embedding]

One thread by default (two collapse to ~1 token/s on a 2-core machine), 127.0.0.1 only,
the model served as "smollm2", jinja chat templates. With --embedding the model is an
embedding model (nomic-embed-text's GGUF) served on /v1/embeddings and /embedding as
"embedder", each input in one batch of up to 2,048 tokens. Runs until stdin closes,
so the test or benchmark that started it stops it by dropping the pipe.
"""
import sys

import xllamacpp as x

embedding = "--embedding" in sys.argv
args = [a for a in sys.argv[1:] if a != "--embedding"]
gguf, port = args[0], int(args[1])
parallel = int(args[2]) if len(args) > 2 else 2
threads = int(args[3]) if len(args) > 3 else 1
n_ctx = int(args[4]) if len(args) > 4 else 4096
p = x.CommonParams()
p.model.path = gguf
p.model_alias = {"embedder" if embedding else "smollm2"}
p.hostnames = ["127.0.0.1"]
p.port = port
p.cpuparams.n_threads = threads
p.cpuparams_batch.n_threads = threads
p.use_jinja = True
p.n_parallel = parallel
if embedding:
    # An embedding input must fit one physical batch; nomic-embed's context is 2,048.
    p.embedding = True
    p.n_ctx = 2048 * parallel
    p.n_batch = 2048
    p.n_ubatch = 2048
else:
    # The whole context, shared by the slots (rir bench generate's prefill
    # rows ask for 8 x 2,048 prompt tokens at once).
    p.n_ctx = n_ctx
server = x.Server(p)
print("listening", server.listening_address, flush=True)
sys.stdin.read()
