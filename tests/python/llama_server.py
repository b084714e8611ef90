"""A real llama.cpp server (xllamacpp) on loopback, for the generator tests.

usage: llama_server.py MODEL.gguf PORT [PARALLEL [THREADS]]

One thread by default (two collapse to ~1 token/s on a 2-core machine), 127.0.0.1 only,
the model served as "smollm2", jinja chat templates. Runs until stdin closes,
so the test or benchmark that started it stops it by dropping the pipe.
"""
import sys

import xllamacpp as x

gguf, port = sys.argv[1], int(sys.argv[2])
parallel = int(sys.argv[3]) if len(sys.argv) > 3 else 2
threads = int(sys.argv[4]) if len(sys.argv) > 4 else 1
p = x.CommonParams()
p.model.path = gguf
p.model_alias = {"smollm2"}
p.hostnames = ["127.0.0.1"]
p.port = port
p.cpuparams.n_threads = threads
p.cpuparams_batch.n_threads = threads
p.use_jinja = True
p.n_parallel = parallel
p.n_ctx = 4096
server = x.Server(p)
print("listening", server.listening_address, flush=True)
sys.stdin.read()
