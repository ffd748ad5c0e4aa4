"""opdlm.gather.full_weights on 2 gloo processes: for a plain, DDP, FSDP1 (flat and original
parameters) and FSDP2 model, untied (Llama) and tied (Qwen2), every rank gets exactly the unsharded
model's parameters, each whole and equal, under its Hugging Face name, tied weights once."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))
from gather_worker import ARCHS, BUCKET, WRAPS, model  # noqa: E402

from opdlm.gather import full_weights  # noqa: E402

pytestmark = pytest.mark.slow  # 2 processes

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gathered(tmp_path_factory):
    out = tmp_path_factory.mktemp("gather")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "dist" / "gather_worker.py"), str(out), str(port)],
                              env={**os.environ, "RANK": str(r), "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE,
                              text=True) for r in (0, 1)]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(e[-3000:] for e in errs)
    return out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("how", WRAPS)
def test_every_rank_gets_the_unsharded_weights_by_name(gathered, arch, how):
    want = dict(model(arch).named_parameters())  # (named_parameters: tied weights once, the embedding's name)
    for r in (0, 1):
        got = torch.load(gathered / f"{arch}_{how}" / f"rank{r}.pt")
        names = [n for n, _ in got]
        assert sorted(names) == sorted(want) and len(names) == len(set(names)), (r, names)
        for n, t in got:
            assert torch.equal(t, want[n].detach()), (r, n)
    if arch == "qwen2":
        assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names


@pytest.mark.parametrize("arch", ARCHS)
def test_fsdp2_gathers_one_bucket_at_a_time(gathered, arch):
    """The full tensors alive at once (gathered, not yet handed out) never exceed one bucket (or one
    parameter larger than a bucket), and the stream interleaves gathers with hand-outs."""
    largest = max(p.numel() * p.element_size() for p in model(arch).parameters())
    for r in (0, 1):
        trace = torch.load(gathered / f"{arch}_fsdp2" / f"trace{r}.pt")
        alive = peak = 0
        for event, size in trace:
            alive += size if event == "gather" else -size
            peak = max(peak, alive)
        assert alive == 0 and 0 < peak <= max(BUCKET, largest), (peak, BUCKET, largest)
        runs = sum(1 for a, b in zip(trace, trace[1:]) if a[0] == "yield" and b[0] == "gather")
        assert runs >= 5, runs  # many buckets, not one gather of everything
        assert sum(s for e, s in trace if e == "gather") > 3 * peak


def test_a_plain_model_streams_its_own_tensors_without_copies():
    m = model("llama")
    got = list(full_weights(m, bucket_bytes=1))
    assert [n for n, _ in got] == [n for n, _ in m.named_parameters()]
    assert all(t.data_ptr() == p.data_ptr() for (_, t), (_, p) in zip(got, m.named_parameters()))
    with pytest.raises(ValueError, match="bucket_bytes: must be >= 1, got 0"):
        next(full_weights(m, bucket_bytes=0))
